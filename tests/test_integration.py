"""Diffusers integration on tiny random models of every supported family (CPU, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import diffattn
from diffattn.kernels import BlockSparseLayout
from diffattn.methods import MethodConfig, VideoSparseMethod, register_method
from diffattn.methods.sparse import kernel_attention
from diffattn.processors.state import StepTracker
from tests import tiny_models as T
from tests.probes import RecordConfig, RecordMethod
from tests.tolerances import MODEL_TOL


# -------------------------------------------------------------------- methods used only by these tests
@dataclass(frozen=True)
class _FullVideoConfig(MethodConfig):
    """A video method whose video part is a full layout: exercises the text split/merge path."""

    block_size: int = 16


@register_method
class _FullVideoMethod(VideoSparseMethod):
    name = "_test_full_video"
    config_cls = _FullVideoConfig

    def video_attention(self, q, k, v, ctx):
        n = q.shape[-2]
        layout = BlockSparseLayout.dense(1, 1, n, n, 16, 16)
        ctx.record(density=1.0)
        return kernel_attention(q, k, v, layout, ctx.scale, "torch")


def _close(a, b):
    atol, rtol = MODEL_TOL
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


CASES = [(name, grid) for name, tiny in T.TINY.items() for grid in tiny.grids]
IDS = [f"{n}-F{g[0]}H{g[1]}W{g[2]}" for n, g in CASES]


@pytest.fixture(scope="module")
def models():
    return {name: T.build(name) for name in T.TINY}


# ------------------------------------------------------------------------------ equivalence and restore
@pytest.mark.parametrize("name,grid", CASES, ids=IDS)
def test_dense_equals_model_and_remove_restores(models, name, grid):
    model = models[name]
    kw = T.inputs(name, grid)
    before = dict(model.attn_processors)
    ref = T.run(model, kw)
    diffattn.apply(model, "dense", min_tokens=0)
    out = T.run(model, kw)
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    after = dict(model.attn_processors)
    assert all(after[k] is before[k] for k in before), "remove must put back the very same processors"
    assert torch.equal(T.run(model, kw), ref)
    _close(out, ref)
    n_targets = sum(T.TINY[name].build is not None and model_spec_target(model, k) for k in before)
    assert len(rows) == n_targets and all("fallback" not in r for r in rows)


def model_spec_target(model, key):
    spec = diffattn.processors.spec_for(model)
    return spec.is_target(key[: -len(".processor")])


@pytest.mark.parametrize("name,grid", CASES, ids=IDS)
def test_grid_and_text_span(models, name, grid):
    model = models[name]
    kw = T.inputs(name, grid)
    method = diffattn.apply(model, "_test_record", min_tokens=0)
    assert isinstance(method, RecordConfig)
    T.run(model, kw)
    state = diffattn.processors.sparse.state_of(model)
    calls = state.methods[0].calls
    diffattn.remove(model)
    text = T.TINY[name].text_first
    f, h, w = grid
    assert calls, "no attention call reached the method"
    for c in calls:
        if name == "unet":
            # UNets see the latent grid at each resolution of the down/up path.
            assert c["grid"] in {(1, h, w), (1, -(-h // 2), -(-w // 2))}
        else:
            assert c["grid"] == grid
        expected_text = 0 if text is None else kw["encoder_hidden_states"].shape[1]
        assert c["text_len"] == expected_text
        assert c["batch"] == 2
    if name == "unet":
        assert {c["grid"] for c in calls} == {(1, h, w), (1, -(-h // 2), -(-w // 2))}


@pytest.mark.parametrize("name", ["hunyuanvideo", "cogvideox", "flux"])
def test_text_split_merge_equals_model(models, name):
    """Joint [text, video] / [video, text] sequences: sparse-video + dense-text merge is exact."""
    model = models[name]
    grid = T.TINY[name].grids[0]
    kw = T.inputs(name, grid)
    ref = T.run(model, kw)
    diffattn.apply(model, "_test_full_video", min_tokens=0)
    out = T.run(model, kw)
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    _close(out, ref)
    assert rows and all("fallback" not in r for r in rows)


@pytest.mark.parametrize("name", list(T.TINY))
def test_set_attn_processor_route(models, name):
    model = models[name]
    grid = T.TINY[name].grids[0]
    kw = T.inputs(name, grid)
    before = {k: type(p) for k, p in model.attn_processors.items()}
    ref = T.run(model, kw)
    model.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig(), min_tokens=0))
    out = T.run(model, kw)
    rows = diffattn.stats(model).rows
    assert rows and all(r["grid"] is not None for r in rows)
    diffattn.remove(model)
    _close(out, ref)
    assert {k: type(p) for k, p in model.attn_processors.items()} == before
    assert torch.equal(T.run(model, kw), ref)


def test_processor_keeps_inner_signature(models):
    """diffusers drops keyword arguments a processor's __call__ does not name."""
    import inspect

    model = models["cogvideox"]
    diffattn.apply(model, "dense", min_tokens=0)
    proc = model.transformer_blocks[0].attn1.processor
    assert "image_rotary_emb" in inspect.signature(proc.__call__).parameters
    assert hasattr(proc, "_attention_backend") and hasattr(proc, "_parallel_config")
    diffattn.remove(model)
    shared = diffattn.SparseAttnProcessor("dense")
    params = inspect.signature(shared.__call__).parameters
    for name in ("encoder_hidden_states", "attention_mask", "image_rotary_emb", "rotary_emb"):
        assert name in params


def test_cross_attention_and_short_sequences_pass_through(models):
    model = models["wan"]
    kw = T.inputs("wan", (3, 4, 6))
    ref = T.run(model, kw)
    cross_before = model.blocks[0].attn2.processor
    diffattn.apply(model, "dense", min_tokens=10_000)
    assert model.blocks[0].attn2.processor is cross_before
    out = T.run(model, kw)
    assert torch.equal(out, ref)  # every sequence is below min_tokens: the model's own SDPA ran
    assert len(diffattn.stats(model)) == 0
    diffattn.remove(model)


def test_apply_twice_replaces_cleanly(models):
    model = models["wan"]
    before = dict(model.attn_processors)
    diffattn.apply(model, "dense", min_tokens=0)
    diffattn.apply(model, "_test_record", min_tokens=0)
    proc = model.blocks[0].attn1.processor
    assert isinstance(proc, diffattn.SparseAttnProcessor) and proc.inner is before["blocks.0.attn1.processor"]
    assert proc.method.name == "_test_record"
    diffattn.remove(model)
    assert all(model.attn_processors[k] is before[k] for k in before)


def test_resolution_change_updates_context(models):
    model = models["wan"]
    diffattn.apply(model, "_test_record", min_tokens=0)
    for grid in [(3, 4, 6), (2, 5, 3), (3, 4, 6)]:
        T.run(model, T.inputs("wan", grid, batch=1 if grid[0] == 2 else 2))
    calls = diffattn.processors.sparse.state_of(model).methods[0].calls
    diffattn.remove(model)
    seen = [(c["grid"], c["batch"]) for c in calls[::2]]
    assert seen == [((3, 4, 6), 2), ((2, 5, 3), 1), ((3, 4, 6), 2)]


# ------------------------------------------------------------------------------ pipeline: steps, CFG


def test_wan_pipeline_steps_and_cfg_branches():
    pipe = T.wan_pipeline()
    pe, ne = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    diffattn.apply(pipe, "_test_record", min_tokens=0)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=5, height=32, width=48,
                guidance_scale=5.0, output_type="pt")
    pipe(num_inference_steps=3, **call)
    method = diffattn.processors.sparse.state_of(pipe.transformer).methods[0]
    calls = list(method.calls)
    # Wan runs cond and uncond as two transformer calls per step: branches 0 and 1.
    assert [(c["step"], c["branch"]) for c in calls[::2]] == [(s, b) for s in range(3) for b in range(2)]
    assert all(c["num_steps"] == 3 and c["grid"] == (2, 2, 3) for c in calls)
    keys = {(c["key"], c["step"]) for c in calls}
    assert len(keys) == len(calls), "each (layer, branch) must have its own cache key within a step"
    assert {c["key"][1] for c in calls} == {0, 1}
    # A second generation starts again at step 0 and resets method state.
    method.calls.clear()
    pipe(num_inference_steps=2, **call)
    assert [(c["step"], c["branch"]) for c in method.calls[::2]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert method.resets == 1
    rows = diffattn.stats(pipe).rows
    assert {r["generation"] for r in rows} == {1, 2}
    diffattn.remove(pipe)


def test_step_tracker_without_scheduler():
    tr = StepTracker(num_steps=4)
    seq = [999, 999, 700, 700, 400, 400, 999, 700]
    got = [tr.advance(torch.tensor([t]))[:2] for t in seq]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 0), (1, 0)]
    assert tr.generation == 2


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs(models):
    with pytest.raises(TypeError, match="Diffusers pipeline"):
        diffattn.apply(object(), "dense")
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        diffattn.apply(models["wan"], "nope")
    with pytest.raises(TypeError, match="block_size"):
        diffattn.apply(models["wan"], "dense", block_size="64")
    with pytest.raises(TypeError, match="no field"):
        diffattn.apply(models["wan"], "dense", blok_size=64)
    with pytest.raises(ValueError, match="stats|apply"):
        diffattn.stats(models["ltx"])


def test_unsupported_model_and_spec_opt_in():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()
    with pytest.raises(ValueError, match="not a supported model.*WanTransformer3DModel.*spec="):
        diffattn.apply(model, "dense")
    spec = diffattn.ModelSpec(
        "sd3", ("SD3Transformer2DModel",), r"transformer_blocks\.\d+\.attn", text_first=False,
        grid=lambda m, a: (1, a["hidden_states"].shape[-2] // 2, a["hidden_states"].shape[-1] // 2),
    )
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
              pooled_projections=torch.randn(2, 8), timestep=torch.tensor([10, 10]))
    with torch.no_grad():
        ref = model(**kw).sample
        diffattn.apply(model, "dense", spec=spec, min_tokens=0)
        out = model(**kw).sample
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    _close(out, ref)
    assert rows and rows[0]["grid"] == (1, 4, 4) and rows[0]["text_len"] == 5


def test_capture_layouts_records_the_computed_block_mask(models):
    model = models["wan"]
    kw = T.inputs("wan", (3, 4, 6))
    diffattn.apply(model, "_test_full_video", min_tokens=0, capture_layouts=True)
    T.run(model, kw)
    rows = diffattn.stats(model).rows
    text = diffattn.stats(model).to_json()
    diffattn.apply(model, "_test_full_video", min_tokens=0)
    T.run(model, kw)
    plain = diffattn.stats(model).rows
    diffattn.remove(model)
    n_blocks = -(-(3 * 4 * 6) // 16)
    assert all(r["block_mask"].shape == (1, 1, n_blocks, n_blocks) and bool(r["block_mask"].all()) for r in rows)
    assert "block_mask" not in text and all("block_mask" not in r for r in plain)


def test_methods_call_and_subpackage_share_a_name(models):
    import importlib

    assert diffattn.methods() == diffattn.methods.method_names()
    assert "dense" in diffattn.methods()
    assert importlib.import_module("diffattn.methods.sparse").DenseMethod is diffattn.methods.DenseMethod
    model = models["ltx"]
    with pytest.raises(ValueError, match="apply"):
        diffattn.method_of(model)
    diffattn.apply(model, "dense", block_size=32)
    method = diffattn.method_of(model)
    assert method.name == "dense" and method.config.block_size == 32
    diffattn.remove(model)


def test_private_methods_are_not_listed():
    assert "_test_record" not in diffattn.methods() and "dense" in diffattn.methods()
    assert diffattn.methods.get_method_class("_test_record") is RecordMethod
