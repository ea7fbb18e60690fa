"""The contract every registered method keeps, checked on a tiny model of its family with its small example.

apply -> four denoising steps -> the stats rows say the method ran (and planned sparsity at the last
step) -> remove restores the very processors and the dense output. The output differs from dense by a
bounded amount, and a method that computes through the block-sparse kernel gives the output of its own
plan computed by the plain-PyTorch oracle (``dense_masked_attention`` with the layout's token mask)
instead of the kernel. With its lossless example a method reproduces the dense model at every step:
a token put in the wrong place (permutation, text merge, padding) fails there, where the residual
stream of a random tiny model would hide it in the bounded distance.
"""

from __future__ import annotations

import pytest
import torch

import diffattn
from diffattn.kernels import dense_masked_attention
from diffattn.methods import describe
from tests import tiny_models as T
from tests.tolerances import MODEL_TOL

# One model per family: HunyuanVideo has joint text after the video, with padded text keys. Per family
# the denoising steps run: four on video (searches and calibrations at steps 0 and 2, a cached plan at
# 1 and 3), two on the UNet (its methods plan alike at every step).
MODELS = {"video": ("hunyuanvideo", (3, 8, 8)), "unet": ("unet", (1, 16, 16))}
TIMESTEPS = {"video": (900, 700, 500, 300), "unet": (900, 500)}
# Relative L2 distance of the last step's output from dense, at most: every small example keeps most
# of the attention, so a broken permutation, text merge or padding mask shows as an O(1) error.
MAX_REL_L2 = 0.3


@pytest.fixture(scope="module")
def models():
    """Per family: the tiny model, its inputs and its dense outputs at every step."""
    out = {}
    for family, (name, grid) in MODELS.items():
        model = T.build(name)
        kw = T.inputs(name, grid)
        out[family] = (model, kw, T.run_steps(model, kw, TIMESTEPS[family]))
    return out


def _counting(calls: list, attention):
    def counted(q, k, v, layout, **kw):
        calls.append(layout)
        return attention(q, k, v, layout, **kw)

    return counted


def _oracle(q, k, v, layout, scale=None, return_lse=True, backend="auto"):
    o, lse = dense_masked_attention(q, k, v, token_mask=layout.to_token_mask(q.shape[-2], k.shape[-2]), scale=scale)
    return (o, lse) if return_lse else o


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_method_has_a_family_model_and_a_small_example():
    for name in diffattn.methods():
        about = describe(name)
        assert set(about.families) & set(MODELS), f"{name}: families {about.families} have no tiny model here"
        for example in (about.small_example, about.lossless_example):
            about.config(diffattn.methods.Variant(example))  # a valid config


def test_a_methods_benchmarks_extend_its_parents():
    from diffattn.methods.base import DEFAULTS, Variant
    from diffattn.methods.sparse import VideoSparseMethod

    class Sweeping(VideoSparseMethod):
        benchmarks = {"quality": (Variant({"a": 1}, "a=1"),)}

    class NotTiny(Sweeping):
        benchmarks = {"tiny": ()}

    assert VideoSparseMethod.benchmarks == {"kernel": DEFAULTS, "tiny": DEFAULTS}
    assert Sweeping.benchmarks == {"kernel": DEFAULTS, "tiny": DEFAULTS, "quality": (Variant({"a": 1}, "a=1"),)}
    assert NotTiny.benchmarks == {"kernel": DEFAULTS, "quality": (Variant({"a": 1}, "a=1"),)}
    assert describe("radial").benchmarks["kernel"] == DEFAULTS and "tiny" in describe("adaspa").benchmarks


@pytest.mark.parametrize("name", diffattn.methods())
def test_method_contract_on_a_tiny_model(name, models, monkeypatch):
    from diffattn.methods import sparse

    about = describe(name)
    family = next(f for f in MODELS if f in about.families)
    model, kw, dense = models[family]
    steps = TIMESTEPS[family]
    before = dict(model.attn_processors)

    calls: list = []
    monkeypatch.setattr(sparse, "block_sparse_attention", _counting(calls, sparse.block_sparse_attention))
    diffattn.apply(model, name, min_tokens=0, num_steps=len(steps), **about.small_example)
    assert any(p is not before[k] for k, p in model.attn_processors.items())
    out = T.run_steps(model, kw, steps)
    rows = diffattn.stats(model).rows
    diffattn.remove(model)

    assert {k: id(p) for k, p in model.attn_processors.items()} == {k: id(p) for k, p in before.items()}
    assert torch.equal(T.run(model, kw), dense[-1])
    assert all(torch.isfinite(o).all() for o in out)
    last = [r for r in rows if r["step"] == len(steps) - 1]
    assert last and {r["step"] for r in rows} == set(range(len(steps)))
    assert not any(r.get("warmup") or r.get("fallback") for r in last), last
    if name == "dense":
        assert all(r["density"] == 1.0 for r in rows)
        for got, want in zip(out, dense):
            torch.testing.assert_close(got, want, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    else:
        # UNet layers below the top resolution stay dense by default: some layer, not every one, is sparse.
        assert all(0.0 < r["density"] <= 1.0 for r in last) and any(r["density"] < 1.0 for r in last), last
        assert 0.0 < _rel(out[-1], dense[-1]) < MAX_REL_L2

    if not calls:
        # Token merging computes with SDPA among merged tokens: test_tome/test_agent hold its references.
        assert family == "unet", f"{name} made no block-sparse kernel call"
        return
    if name == "dense":
        return  # compared with the dense model itself above
    monkeypatch.setattr(sparse, "block_sparse_attention", _oracle)
    diffattn.apply(model, name, min_tokens=0, num_steps=len(steps), **about.small_example)
    reference = T.run_steps(model, kw, steps)
    diffattn.remove(model)
    for got, want in zip(out, reference):
        torch.testing.assert_close(got, want, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])



@pytest.mark.parametrize("name", [n for n in diffattn.methods() if n != "dense"])
def test_lossless_example_reproduces_the_dense_model(name, models):
    about = describe(name)
    family = next(f for f in MODELS if f in about.families)
    model, kw, dense = models[family]
    diffattn.apply(model, name, min_tokens=0, num_steps=len(TIMESTEPS[family]), **about.lossless_example)
    out = T.run_steps(model, kw, TIMESTEPS[family])
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    assert rows and not any(r.get("fallback") for r in rows)
    for got, want in zip(out, dense):
        torch.testing.assert_close(got, want, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])


def _has_fields(name: str, *fields: str) -> bool:
    return set(fields) <= {f for f in describe(name).config_cls.__dataclass_fields__}


@pytest.mark.parametrize("name", [n for n in diffattn.methods() if _has_fields(n, "dense_layers", "dense_steps")])
def test_warmup_layers_and_steps_run_dense(name, monkeypatch):
    from diffattn.methods import AttnContext, Variant, get_method_class, sparse

    about = describe(name)
    cfg = about.config(Variant({**about.small_example, "dense_layers": 1, "dense_steps": 25}))
    grid = (8, 4, 6)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8 * 4 * 6, 16) for _ in range(3))
    rows: list[dict] = []

    def at(method, layer: int, step: int) -> torch.Tensor:
        ctx = AttnContext(layer=f"l{layer}", layer_index=layer, grid=grid, step=step, num_steps=50,
                          record=lambda **kw: rows.append(kw))
        return method.attend(q, k, v, ctx)

    method = get_method_class(name)(cfg)
    dense, _ = dense_masked_attention(q, k, v)
    for layer, step in ((0, 40), (1, 24)):
        torch.testing.assert_close(at(method, layer, step), dense, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
        assert rows[-1]["warmup"] is True and rows[-1]["density"] == 1.0
    sparse_out = at(method, 1, 25)
    assert "warmup" not in rows[-1] and rows[-1]["density"] < 1.0
    monkeypatch.setattr(sparse, "block_sparse_attention", _oracle)
    want = at(get_method_class(name)(cfg), 1, 25)
    torch.testing.assert_close(sparse_out, want, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    assert _rel(sparse_out, dense) > 1e-2
