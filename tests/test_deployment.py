"""diffattn inside a Diffusers deployment: state that travels with the model, the pipeline's schedule
on both routes, the user's attention backend, and combinations that must refuse to run."""

from __future__ import annotations

import copy

import pytest
import torch

import diffattn
from diffattn.processors.sparse import state_of

from . import tiny_models as T


def _sparse_rows(rows):
    return [r for r in rows if "fallback" not in r]


def test_deepcopy_carries_independent_sparse_state():
    model = T.build("wan")
    kw = T.inputs("wan", (3, 4, 6))
    before = {k: type(p) for k, p in model.attn_processors.items()}
    diffattn.apply(model, "radial", min_tokens=0, dense_layers=0, dense_steps=0)
    twin = copy.deepcopy(model)
    out = T.run(model, kw)
    out_twin = T.run(twin, kw)
    torch.testing.assert_close(out_twin, out, rtol=0, atol=0)
    rows, rows_twin = diffattn.stats(model).rows, diffattn.stats(twin).rows
    assert len(rows_twin) == len(rows) == 2
    assert all(r["density"] < 1.0 for r in rows_twin), "the copy must run the sparse method"
    with twin.cache_context("uncond", step_index=0, num_inference_steps=4):
        T.run(twin, kw)
    assert [r["branch"] for r in diffattn.stats(twin).rows[2:]] == [1, 1], "the copy must hear its own context"
    assert len(diffattn.stats(model).rows) == 2, "the copy's calls must not land in the original's stats"
    assert state_of(twin) is not state_of(model)
    diffattn.remove(twin)
    assert {k: type(p) for k, p in twin.attn_processors.items()} == before
    assert torch.equal(T.run(twin, kw), T.run(T.build("wan"), kw))
    diffattn.remove(model)


def test_deepcopy_before_the_first_forward_on_the_processor_route():
    model = T.build("wan")
    model.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig(), min_tokens=0))
    twin = copy.deepcopy(model)
    kw = T.inputs("wan", (3, 4, 6))
    T.run(model, kw)
    T.run(twin, kw)
    assert len(diffattn.stats(model)) == len(diffattn.stats(twin)) == 2
    diffattn.remove(model)
    diffattn.remove(twin)


def test_processor_route_leaves_no_process_wide_hook():
    from torch.nn.modules import module as nn_module

    model = T.build("hunyuanvideo")
    kw = T.inputs("hunyuanvideo", (3, 4, 6))
    hooks_before = len(nn_module._global_forward_pre_hooks)
    model.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig(), min_tokens=0))
    T.run(model, kw)
    assert len(nn_module._global_forward_pre_hooks) == hooks_before
    rows = diffattn.stats(model).rows
    assert rows and all(r["grid"] == (3, 4, 6) and r["step"] == 0 for r in rows)
    T.run(model, {**kw, "timestep": torch.full((2,), 300)})
    assert {r["step"] for r in diffattn.stats(model).rows} == {0, 1}
    diffattn.remove(model)


def test_forward_on_meta_tensors():
    with torch.device("meta"):
        model = T.build("wan")
    diffattn.apply(model, "dense", min_tokens=0)
    kw = {k: v.to("meta") for k, v in T.inputs("wan", (3, 4, 6)).items()}
    out = T.run(model, kw)
    assert out.device.type == "meta" and out.shape == kw["hidden_states"].shape
    diffattn.remove(model)


def _pipe_call(pipe, steps):
    torch.manual_seed(3)
    pe, ne = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    return pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=5, height=32, width=48, guidance_scale=5.0,
        num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).frames


def test_set_attn_processor_route_follows_the_pipeline_schedule():
    """The pipeline publishes step_index / num_inference_steps in its cache context, and the processor
    route hears it from the first forward on: with 8 steps radial's 3 warm-up steps (of 50) scale to
    none, so step 0 is already sparse, and the run matches apply(pipe) exactly."""
    cfg = diffattn.RadialConfig(dense_layers=0, dense_steps=3)
    a = T.wan_pipeline()
    diffattn.apply(a, cfg, min_tokens=0)
    out_a = _pipe_call(a, 8)
    b = T.wan_pipeline()
    b.transformer.set_attn_processor(diffattn.SparseAttnProcessor(cfg, min_tokens=0))
    out_b = _pipe_call(b, 8)
    rows = diffattn.stats(b).rows
    assert [(r["step"], r["branch"]) for r in rows[::2]] == [(s, br) for s in range(8) for br in range(2)]
    assert not any(r.get("warmup") for r in rows) and all(r["density"] < 1.0 for r in rows)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    diffattn.remove(a)
    diffattn.remove(b)


def test_cache_context_gives_branch_and_step():
    model = T.build("wan")
    diffattn.apply(model, "dense", min_tokens=0)
    kw = T.inputs("wan", (3, 4, 6))
    for step in range(2):
        for name in ("cond", "uncond"):
            with model.cache_context(name, step_index=step, num_inference_steps=2):
                T.run(model, kw)  # the same timestep every call: only the context tells the steps apart
    rows = diffattn.stats(model).rows
    assert [(r["step"], r["branch"]) for r in rows[::2]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with model.cache_context("cond", step_index=0, num_inference_steps=2):
        T.run(model, kw)
    assert diffattn.stats(model).rows[-1]["generation"] == 2
    diffattn.remove(model)


def test_passthrough_keeps_the_users_attention_backend(monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    seen = []
    original = _AttentionBackendRegistry._backends[name]

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    model = T.build("wan")
    kw = T.inputs("wan", (3, 4, 6))
    ref = T.run(model, kw)
    model.set_attention_backend("_native_math")
    diffattn.apply(model, "dense", min_tokens=10_000)
    seen.clear()
    out = T.run(model, kw)
    # 2 self-attention calls (passed through) + 2 cross-attention calls (not diffattn's)
    assert len(seen) == 4
    torch.testing.assert_close(out, ref)
    diffattn.remove(model)


def test_apply_on_a_compiled_model_patches_the_inner_model():
    model = T.build("wan")
    compiled = torch.compile(model)
    diffattn.apply(compiled, "dense", min_tokens=0)
    assert isinstance(model.blocks[0].attn1.processor, diffattn.SparseAttnProcessor)
    T.run(model, T.inputs("wan", (3, 4, 6)))
    assert len(diffattn.stats(compiled)) == 2
    diffattn.remove(compiled)
    assert not isinstance(model.blocks[0].attn1.processor, diffattn.SparseAttnProcessor)


def test_adaspa_search_on_a_skipped_step_happens_at_the_next_computed_step():
    """A step cache (e.g. one skipping the block at AdaSpa's search step) must not drop the search."""
    model = T.build("wan")
    diffattn.apply(model, "adaspa", min_tokens=0, block_size=16, warmup_steps=0, search_steps=(0, 20))
    kw = T.inputs("wan", (3, 4, 6))
    for step in (0, 1, 3):  # 10 steps: the second search is planned at step 4 of 10 ... skip it
        with model.cache_context("cond", step_index=step, num_inference_steps=10):
            T.run(model, kw)
    with model.cache_context("cond", step_index=5, num_inference_steps=10):
        T.run(model, kw)  # step 4 was skipped by the cache
    rows = [r for r in diffattn.stats(model).rows if r["step"] == 5]
    assert rows and all(r["search"] and r["search_planned_at"] == 4 for r in rows)
    assert not any(r["search"] for r in diffattn.stats(model).rows if r["step"] in (1, 3))
    diffattn.remove(model)


_SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "_unique2", "masked_select"}


class _CountSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in _SYNCING
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "family,method,fields",
    [
        ("wan", "dense", {}),
        ("wan", "radial", dict(dense_layers=0, dense_steps=0)),
        ("wan", "gna", {}),
        ("wan", "paro", dict(calibration_steps=(0,), block_size=16)),
        ("wan", "adaspa", dict(warmup_steps=0, block_size=16)),
        ("cogvideox", "dense", {}),
        ("cogvideox", "radial", dict(dense_layers=0, dense_steps=0)),
        ("hunyuanvideo", "dense", {}),
        ("hunyuanvideo", "radial", dict(dense_layers=0, dense_steps=0)),
        ("hunyuanvideo", "gna", {}),
        ("hunyuanvideo", "paro", dict(calibration_steps=(0,), block_size=16)),
        ("hunyuanvideo", "adaspa", dict(warmup_steps=0, block_size=16)),
    ],
)
def test_steady_state_attention_does_not_wait_on_the_host(family, method, fields):
    """At most one host-synchronising op per attention call once plans exist (the step tracker's one
    timestep read per forward included)."""
    model = T.build(family)
    diffattn.apply(model, method, min_tokens=0, **fields)
    kw = T.inputs(family, (3, 4, 6))
    T.run(model, kw)
    T.run(model, {**kw, "timestep": kw["timestep"] // 2})
    counter = _CountSyncs()
    with counter:
        T.run(model, {**kw, "timestep": kw["timestep"] // 4})
    calls = [r for r in diffattn.stats(model).rows if r["step"] == 2]
    assert calls and all("fallback" not in r and not r.get("search") for r in calls)
    assert counter.count <= len(calls), f"{counter.count} host syncs in {len(calls)} attention calls"
    diffattn.remove(model)


def test_adaspa_search_survives_a_diffusers_taylorseer_cache():
    """TaylorSeer (warm-up 2, interval 2) skips attn1 at steps 2, 4, 6 of 8; the second search is
    planned at step 4 (25 of 50) and runs at step 5, the next one computed."""
    from diffusers import TaylorSeerCacheConfig

    pipe = T.wan_pipeline()
    pipe.transformer.enable_cache(
        TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, cache_identifiers=[r"blocks\.\d+\.attn1"])
    )
    diffattn.apply(pipe, "adaspa", min_tokens=0, block_size=16, warmup_steps=0, search_steps=(0, 25))
    _pipe_call(pipe, 8)
    rows = diffattn.stats(pipe).rows
    assert {r["step"] for r in rows} == {0, 1, 3, 5, 7}
    searched = sorted({(r["step"], r.get("search_planned_at")) for r in rows if r["search"]})
    assert searched == [(0, None), (5, 4)]
    diffattn.remove(pipe)
    pipe.transformer.disable_cache()


def test_dtype_change_and_save_pretrained_of_a_patched_model(tmp_path):
    from diffusers import WanTransformer3DModel

    model = T.build("wan")
    diffattn.apply(model, "radial", min_tokens=0, dense_layers=0, dense_steps=0)
    kw = T.inputs("wan", (3, 4, 6))
    model.to(torch.bfloat16)
    out = T.run(model, {k: v.to(torch.bfloat16) for k, v in kw.items()})
    assert out.dtype == torch.bfloat16 and len(diffattn.stats(model)) == 2
    assert all(r["density"] < 1.0 for r in diffattn.stats(model).rows)
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert not any(isinstance(p, diffattn.SparseAttnProcessor) for p in loaded.attn_processors.values())
    diffattn.remove(model)
    assert set(dict(model.named_modules())) == set(dict(loaded.named_modules()))
