"""AdaSpa: exact block masses, the planner against loop references, and the search/caching schedule."""

import functools

import pytest
import torch

from diffattn.methods import adaspa as adaspa_module
from diffattn.kernels import block_mass, dense_masked_attention
from diffattn.methods import AdaSpaConfig, AdaSpaMethod
from diffattn.patterns.adaspa import (
    block_recall,
    head_adaptive_sparsity,
    plan_adaspa,
    recall_block_mask,
    topk_block_mask,
)
from tests.contexts import video_ctx
from tests.tolerances import assert_close

GRID = (2, 5, 13)  # 130 video tokens: 5 blocks of 32, the last one 2 tokens long
BLOCK = 32
NUM_STEPS = 10  # warm-up until step 2, searches at steps 2 and 6 (10 and 30 of 50, scaled)


_cfg = functools.partial(AdaSpaConfig, sparsity=0.6, block_size=BLOCK, backend="torch")
_ctx = functools.partial(video_ctx, num_steps=NUM_STEPS, grid=GRID)


def _qkv(b=2, h=4, n=130, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A locality bias makes masses uneven, so top-k choices are unambiguous.
    pos = torch.arange(n, dtype=torch.float32)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g)
    q[..., 0] = 3 * torch.cos(pos / 20)
    k[..., 0] = 3 * torch.cos(pos / 20)
    q[..., 1] = 3 * torch.sin(pos / 20)
    k[..., 1] = 3 * torch.sin(pos / 20)
    v = torch.randn(b, h, n, d, generator=g)
    return q, k, v


def _explicit_probs(q, k, scale):
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)


def _tile_sums(p, bq, bk):
    """Loop reference: sum of p over every (query block, key block) tile."""
    b, h, nq, nk = p.shape
    mq, mk = -(-nq // bq), -(-nk // bk)
    out = torch.zeros(b, h, mq, mk)
    for i in range(mq):
        for j in range(mk):
            out[:, :, i, j] = p[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].sum(dim=(-1, -2))
    return out


# ----------------------------------------------------------------------------------- block mass
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "nq,nk,bq,bk", [(100, 100, 32, 32), (130, 77, 32, 16), (45, 150, 16, 64)],
    ids=lambda x: str(x),
)
def test_block_mass_equals_explicit_softmax(nq, nk, bq, bk, backend):
    b, h, d, scale = 2, 3, 16, 0.3
    q, k = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d)
    s = q @ k.transpose(-1, -2) * scale
    lse = torch.logsumexp(s, -1)
    mass = block_mass(q, k, lse, bq, bk, scale, backend=backend)
    expected = _tile_sums(torch.softmax(s, -1), bq, bk)
    assert_close(mass, expected, torch.float32)
    # With the true LSE a row of blocks holds one unit of mass per valid query.
    rows = torch.tensor([min(bq, nq - i * bq) for i in range(mass.shape[2])], dtype=torch.float32)
    assert_close(mass.sum(-1), rows.expand_as(mass.sum(-1)), torch.float32)


# ----------------------------------------------------------------------------------- planner
def test_topk_mask_keeps_the_heaviest_blocks_per_row():
    mass = torch.rand(2, 3, 6, 9)
    keep = torch.tensor([[1, 4, 9], [2, 3, 5]])
    mask = topk_block_mask(mass, keep)
    for b in range(2):
        for h in range(3):
            for r in range(6):
                top = set(torch.argsort(mass[b, h, r], descending=True)[: keep[b, h]].tolist())
                assert set(mask[b, h, r].nonzero().flatten().tolist()) == top


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99, 0.999])
def test_recall_mode_keeps_fewest_blocks_reaching_target(target):
    mass = torch.rand(2, 2, 5, 11, dtype=torch.float64) ** 4
    mass[0, 0, 0] = 0.0  # a row without mass still keeps one block
    mask = recall_block_mask(mass, target)
    for b in range(2):
        for h in range(2):
            for r in range(5):
                row = mass[b, h, r]
                vals, order = torch.sort(row, descending=True)
                need, acc = 0, 0.0
                while need < len(vals) and (need == 0 or acc < target * float(row.sum())):
                    acc += float(vals[need])
                    need += 1
                assert set(mask[b, h, r].nonzero().flatten().tolist()) == set(order[:need].tolist())


@pytest.mark.parametrize("s", [0.8, 0.5, 0.9, 0.2])
@pytest.mark.parametrize("heads", [1, 4, 7, 24])
def test_head_adaptive_allocation_keeps_the_mean(heads, s):
    recall = torch.rand(3, heads)
    recall[1] = 0.99  # every head easy: n capped at H // 2
    recall[2] = 0.1  # no head easy: nothing moves
    out = head_adaptive_sparsity(recall, s, threshold=0.8)
    torch.testing.assert_close(out.mean(-1), torch.full((3,), s, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(out[2], torch.full((heads,), s, dtype=torch.float64))
    delta = min((1 - s) / 2, s)
    for b in range(3):
        n = min(int((recall[b] > 0.8).sum()), heads // 2)
        order = torch.argsort(recall[b], descending=True, stable=True)
        expect = torch.full((heads,), s, dtype=torch.float64)
        expect[order[:n]] += delta
        expect[order[heads - n :]] -= delta
        torch.testing.assert_close(out[b], expect, atol=1e-12, rtol=0)
    if s == 0.8 and heads >= 2:
        assert torch.isclose(out[1].max(), torch.tensor(0.9, dtype=torch.float64))
        assert torch.isclose(out[1].min(), torch.tensor(0.7, dtype=torch.float64))


def test_plan_head_adaptive_block_counts_keep_the_mean():
    mass = torch.rand(1, 4, 10, 10) ** 3
    mask, info = plan_adaspa(mass, sparsity=0.6, head_adaptive=True, recall_threshold=0.0)
    counts = mask.sum(-1)  # every row of a head has the same count
    assert (counts == counts[..., :1]).all()
    assert sorted(counts[0, :, 0].tolist()) == [2, 2, 6, 6]  # 0.8, 0.8, 0.4, 0.4 sparsity
    assert float(mask.float().mean()) == pytest.approx(0.4)
    assert torch.equal(info["recall"], block_recall(mass, mask))


# ------------------------------------------------------------------------------ method schedule
def test_recorded_recall_matches_explicit_softmax():
    q, k, v = _qkv()
    records = []
    method = AdaSpaMethod(_cfg())
    method.attend(q, k, v, _ctx(2, records))
    layout = method.state.entries[("l0", 0)].layout
    p = _explicit_probs(q, k, 16**-0.5)
    keep = layout.to_token_mask(130, 130).expand_as(p)
    expected = ((p * keep).sum(dim=(-1, -2)) / p.sum(dim=(-1, -2))).mean()
    assert records[-1]["recall"] == pytest.approx(float(expected), abs=1e-5)
    assert records[-1]["search"] and records[-1]["search_kind"] == "fused"


def test_fused_search_step_returns_dense_attention():
    q, k, v = _qkv()
    o = AdaSpaMethod(_cfg()).attend(q, k, v, _ctx(2))
    ref, _ = dense_masked_attention(q, k, v)
    assert_close(o, ref, torch.float32)


def test_lse_cached_search_with_true_lse_equals_fused_search():
    q0, k0, v0 = _qkv(seed=0)
    q1, k1, v1 = _qkv(seed=1)
    cached = AdaSpaMethod(_cfg())
    cached.attend(q0, k0, v0, _ctx(2))
    entry = cached.state.entries[("l0", 0)]
    # Give the cache the true LSE of the new inputs: the cached search must then plan as a fused one.
    entry.lse = torch.logsumexp(q1 @ k1.transpose(-1, -2) * 16**-0.5, -1)
    records = []
    o = cached.attend(q1, k1, v1, _ctx(6, records))
    assert records[-1]["search_kind"] == "cached"
    fused = AdaSpaMethod(_cfg())
    fused.attend(q1, k1, v1, _ctx(2))
    assert torch.equal(entry.layout.to_block_mask(), fused.state.entries[("l0", 0)].layout.to_block_mask())
    ref, _ = dense_masked_attention(q1, k1, v1, entry.layout)
    assert_close(o, ref, torch.float32)


def test_no_search_on_non_search_steps(monkeypatch):
    calls = []
    real = adaspa_module.block_mass

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adaspa_module, "block_mass", counting)
    q, k, v = _qkv(b=1, h=2)
    method = AdaSpaMethod(_cfg())
    records = []
    for step in range(NUM_STEPS):
        for layer in ("l0", "l1"):
            for branch in (0, 1):
                method.attend(q, k, v, _ctx(step, records, layer=layer, branch=branch))
    searches = [(r["step"], r["search_kind"]) for r in records if r.get("search")]
    assert sorted(set(searches)) == [(2, "fused"), (6, "cached")]
    assert len(searches) == 8 and len(calls) == 8  # two searches for each of 4 (layer, branch) keys
    assert all(r.get("warmup") for r in records if r["step"] < 2)
    reused = [r for r in records if r["step"] >= 2 and not r.get("search")]
    assert len(reused) == 4 * (NUM_STEPS - 4) and all(r["cache_hit"] for r in reused)
    for stats in method.stats.values():
        assert (stats["fused_searches"], stats["cached_searches"], stats["cache_hits"]) == (1, 1, 6)


def test_without_lse_cache_every_search_is_fused():
    q, k, v = _qkv(b=1, h=2)
    method = AdaSpaMethod(_cfg(lse_cache=False))
    records = []
    for step in range(NUM_STEPS):
        method.attend(q, k, v, _ctx(step, records))
    assert [r["search_kind"] for r in records if r.get("search")] == ["fused", "fused"]


def test_branches_do_not_share_caches():
    x0, x1 = _qkv(seed=0), _qkv(seed=1)
    method = AdaSpaMethod(_cfg())
    records = []
    method.attend(*x0, _ctx(2, records, branch=0))
    method.attend(*x1, _ctx(3, records, branch=1))  # first call of branch 1: must search, not reuse
    assert [r["search_kind"] for r in records] == ["fused", "fused"]
    for branch, x in ((0, x0), (1, x1)):
        fresh = AdaSpaMethod(_cfg())
        fresh.attend(*x, _ctx(2))
        mine = method.state.entries[("l0", branch)].layout
        assert torch.equal(mine.to_block_mask(), fresh.state.entries[("l0", 0)].layout.to_block_mask())
        o = method.attend(*x, _ctx(4, branch=branch))
        assert_close(o, dense_masked_attention(*x, mine)[0], torch.float32)
    assert not torch.equal(
        method.state.entries[("l0", 0)].layout.to_block_mask(),
        method.state.entries[("l0", 1)].layout.to_block_mask(),
    )


@pytest.mark.parametrize(
    "change",
    ["grid-same-length", "length", "batch", "heads", "text_len", "dtype"],
)
def test_shape_change_rebuilds(change):
    method = AdaSpaMethod(_cfg())
    q, k, v = _qkv(b=2, h=4)
    method.attend(q, k, v, _ctx(2))
    grid, text_len = GRID, 0
    if change == "grid-same-length":
        grid = (2, 13, 5)
    elif change == "length":
        grid = (3, 5, 13)
        q, k, v = _qkv(n=195)
    elif change == "batch":
        q, k, v = (t[:1] for t in (q, k, v))
    elif change == "heads":
        q, k, v = (t[:, :2] for t in (q, k, v))
    elif change == "text_len":
        text_len = 5
        q, k, v = _qkv(n=135)
    elif change == "dtype":
        q, k, v = (t.double().float().to(torch.bfloat16) for t in (q, k, v))
    records = []
    o = method.attend(q, k, v, _ctx(3, records, grid=grid, text_len=text_len))
    assert records[-1]["search_kind"] == "fused" and method.state.rebuilds == 1
    assert o.shape == q.shape
    # Unchanged shapes do not rebuild.
    method.attend(q, k, v, _ctx(4, grid=grid, text_len=text_len))
    assert method.state.rebuilds == 1


def test_new_run_rebuilds_and_reset_forgets():
    q, k, v = _qkv()
    method = AdaSpaMethod(_cfg())
    for step in (2, 3):
        method.attend(q, k, v, _ctx(step))
    records = []
    method.attend(q, k, v, _ctx(2, records))  # the step went backwards: a new generation
    assert records[-1]["search_kind"] == "fused" and method.state.rebuilds == 1
    method.reset()
    assert method.stats == {}


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
@pytest.mark.parametrize("mode", ["topk", "recall"])
def test_output_equals_masked_reference_with_chosen_layout(mode, text_first):
    t = 7
    q, k, v = _qkv(n=130 + t)
    method = AdaSpaMethod(_cfg(mode=mode, target_recall=0.9))
    method.attend(q, k, v, _ctx(2, text_len=t, text_first=text_first))
    o = method.attend(q, k, v, _ctx(3, text_len=t, text_first=text_first))
    layout = method.state.entries[("l0", 0)].layout
    n = 130 + t
    vs = slice(t, n) if text_first else slice(0, 130)
    full = torch.ones(2, 4, n, n, dtype=torch.bool)
    video = torch.ones(2, 4, n, n, dtype=torch.bool)
    video[:, :, vs, vs] = layout.to_token_mask(130, 130)
    full = full & video
    ref, _ = dense_masked_attention(q, k, v, token_mask=full)
    assert_close(o, ref, torch.float32)
    assert 0.0 < layout.density < 1.0


def test_recall_mode_reaches_target_per_row():
    q, k, v = _qkv()
    records = []
    method = AdaSpaMethod(_cfg(mode="recall", target_recall=0.9))
    method.attend(q, k, v, _ctx(2, records))
    layout = method.state.entries[("l0", 0)].layout
    p = _explicit_probs(q, k, 16**-0.5)
    mass = _tile_sums(p, BLOCK, BLOCK)
    row_recall = (mass * layout.to_block_mask()).sum(-1) / mass.sum(-1)
    assert (row_recall >= 0.9 - 1e-5).all()
    assert records[-1]["recall"] >= 0.9 - 1e-5


@pytest.mark.parametrize(
    "field,value", [("sparsity", 1.0), ("target_recall", 0.0), ("search_steps", ()), ("block_size", 48)]
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaSpaConfig(**{field: value})


def test_config_json_round_trip():
    cfg = AdaSpaConfig(search_steps=(10, 20, 40), mode="recall")
    assert AdaSpaConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------- through diffattn.apply
# CogVideoX puts its text before the video; tests/test_methods_contract.py runs a model with text after it.
@pytest.mark.parametrize("name", ["cogvideox"])
def test_adaspa_through_apply_on_tiny_models(name):
    import diffattn
    from tests import tiny_models as T
    from tests.tolerances import MODEL_TOL

    model = T.build(name)
    grid = T.TINY[name].grids[0]
    timesteps = [900, 700, 500, 300]  # 4 steps: warm-up until 1, searches at 1 and 2
    dense = T.run_steps(model, T.inputs(name, grid), timesteps)
    # Keeping every block must reproduce the model exactly, through search, cache and text merge.
    diffattn.apply(model, "adaspa", sparsity=0.0, head_adaptive=False, block_size=16, backend="torch",
                   min_tokens=0, num_steps=4)
    full = T.run_steps(model, T.inputs(name, grid), timesteps)
    diffattn.remove(model)
    for a, b in zip(full, dense):
        torch.testing.assert_close(a, b, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    diffattn.apply(model, "adaspa", sparsity=0.6, block_size=16, backend="torch", min_tokens=0, num_steps=4)
    sparse = T.run_steps(model, T.inputs(name, grid), timesteps)
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    layers = {r["layer"] for r in rows}
    by_step = {s: [r for r in rows if r["step"] == s] for s in range(4)}
    assert all(r.get("warmup") for r in by_step[0])
    assert [r.get("search_kind") for r in by_step[1]] == ["fused"] * len(layers)
    assert [r.get("search_kind") for r in by_step[2]] == ["cached"] * len(layers)
    assert all(r["search"] is False and r["cache_hit"] and r["density"] < 1 for r in by_step[3])
    torch.testing.assert_close(sparse[1], dense[1], atol=MODEL_TOL[0], rtol=MODEL_TOL[1])  # fused = dense
    assert all(torch.isfinite(o).all() for o in sparse) and not torch.allclose(sparse[3], dense[3])
