"""PARO: exact permutations, order choice on known block-diagonal patterns, masks, calibration files,
and the method's (quantized) output against references."""

import functools
import math

import pytest
import torch

from diffattn.kernels import BlockSparseLayout, dense_masked_attention
from diffattn.kernels.naive_quant import naive_quantized_attention
from diffattn.methods import PAROConfig, PAROMethod
from diffattn.patterns.paro import (
    AXIS_ORDERS,
    calibrate_paro,
    head_permutations,
    inverse_permutation,
    order_permutation,
    permute_heads,
    threshold_block_mask,
)
from diffattn.patterns.synthetic import synthetic_qkv
from tests.contexts import video_ctx
from tests.tolerances import QUANT_REL_L2, assert_close, assert_quant_close

GRID = (3, 5, 7)  # 105 video tokens: 4 blocks of 32, the last one 9 tokens long
BLOCK = 32
NUM_STEPS = 10  # calibration steps 5 and 25 of 50 -> 1 and 5


_cfg = functools.partial(PAROConfig, density=0.5, block_size=BLOCK, backend="torch")
_ctx = functools.partial(video_ctx, num_steps=NUM_STEPS, grid=GRID)


def _coords_in_order(grid, order):
    """Loop reference: frame-major indices listed with order[0] slowest, order[2] fastest."""
    sizes = dict(zip("FHW", grid))
    out = []
    for a in range(sizes[order[0]]):
        for b in range(sizes[order[1]]):
            for c in range(sizes[order[2]]):
                pos = dict(zip(order, (a, b, c)))
                out.append((pos["F"] * grid[1] + pos["H"]) * grid[2] + pos["W"])
    return out


@pytest.mark.parametrize("order", AXIS_ORDERS)
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 4, 9), (6, 1, 2)], ids=lambda g: "x".join(map(str, g)))
def test_permutation_matches_loop_and_round_trips_exactly(grid, order):
    perm = order_permutation(grid, order)
    assert perm.tolist() == _coords_in_order(grid, order)
    x = torch.randn(2, 1, math.prod(grid), 8, dtype=torch.float64)
    y = permute_heads(permute_heads(x, perm[None]), inverse_permutation(perm)[None])
    assert torch.equal(y, x)


def test_per_head_permutations_round_trip_exactly():
    orders = list(AXIS_ORDERS)
    perms = head_permutations(GRID, orders)
    x = torch.randn(2, 6, 105, 16).to(torch.bfloat16)
    xp = permute_heads(x, perms)
    for h, o in enumerate(orders):
        assert torch.equal(xp[:, h], x[:, h, order_permutation(GRID, o)])
    assert torch.equal(permute_heads(xp, inverse_permutation(perms)), x)
    lse = torch.randn(2, 6, 105)
    assert torch.equal(permute_heads(permute_heads(lse, perms), inverse_permutation(perms)), lse)


def _block_diagonal_in(order, grid=(8, 8, 8), d=64, amp=12.0, seed=0):
    """q, k of one head attending within groups (a, b // 2) of its axis order (a, b, c): in that order
    each group is 16 consecutive tokens (one 16-token block); in every other order it spreads out."""
    g = torch.Generator().manual_seed(seed)
    sizes = dict(zip("FHW", grid))
    emb = torch.randn(sizes[order[0]] * sizes[order[1]] // 2, d, generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    f, h, w = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    pos = {"F": f.flatten(), "H": h.flatten(), "W": w.flatten()}
    group = pos[order[0]] * (sizes[order[1]] // 2) + pos[order[1]] // 2
    base = emb[group] * math.sqrt(amp * math.sqrt(d))
    q = base + 0.1 * torch.randn(base.shape, generator=g)
    k = base + 0.1 * torch.randn(base.shape, generator=g)
    return q, k


def test_chosen_order_is_the_known_block_diagonal_one():
    grid = (8, 8, 8)
    truth = ["HWF", "FHW", "WFH", "FWH", "WHF", "HFW"]
    pairs = [_block_diagonal_in(o, grid, seed=i) for i, o in enumerate(truth)]
    q = torch.stack([p[0] for p in pairs])[None].repeat(2, 1, 1, 1)
    k = torch.stack([p[1] for p in pairs])[None].repeat(2, 1, 1, 1)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) / 8, -1)
    chosen, mask, info = calibrate_paro(q, k, lse, grid, density=0.25, block=16, backend="torch")
    assert chosen == truth
    # In its own order each head is block-diagonal: the diagonal tiles hold (nearly) all the mass.
    assert (info["recall"] > 0.99).all()
    eye = torch.eye(32, dtype=torch.bool)
    assert (mask & eye).sum() == 6 * 32
    # The winner's score beats every other order by at least one tile (not a tie-break).
    best = info["scores"].min(0).values
    runner_up = info["scores"].sort(0).values[1]
    assert (runner_up - best >= 1).all()


@pytest.mark.parametrize("density", [0.2, 0.35, 0.5])
def test_threshold_mask_keeps_heaviest_tiles_and_every_row(density):
    mass = torch.rand(3, 7, 9) ** 3
    mass[0, 2] = 0.0
    mass[0, 2, 4] = 1e-9  # a light row: its heaviest tile still kept
    mask = threshold_block_mask(mass, density)
    keep = math.ceil(density * 63)
    for h in range(3):
        top = set(torch.topk(mass[h].flatten(), keep).indices.tolist())
        rows = {r * 9 + int(mass[h, r].argmax()) for r in range(7)}
        assert set(mask[h].flatten().nonzero().flatten().tolist()) == top | rows
    assert mask.any(-1).all()


def _reference_output(q, k, v, method, key, text_len=0, text_first=True):
    """Dense masked attention with each head's permuted block mask mapped back to frame-major order."""
    c = method.state.entries[key]
    n_video = math.prod(c.grid)
    perms = head_permutations(c.grid, c.orders)
    layout = BlockSparseLayout.from_block_mask(c.mask[None], BLOCK, BLOCK, n_video, n_video)
    permuted = layout.to_token_mask(n_video, n_video)[0]  # [H, N, N] in each head's order
    video = torch.zeros_like(permuted)
    for h in range(permuted.shape[0]):
        p = perms[h]
        video[h][p[:, None], p[None, :]] = permuted[h]
    n = n_video + text_len
    vs = slice(text_len, n) if text_first else slice(0, n_video)
    full = torch.ones(1, permuted.shape[0], n, n, dtype=torch.bool)
    full[0, :, vs, vs] = video
    return dense_masked_attention(q, k, v, token_mask=full)[0]


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_method_output_equals_masked_reference(text_first):
    t = 6
    qv, kv, vv = synthetic_qkv(GRID, batch=2, heads=4, head_dim=32, seed=1)
    text = [torch.randn(2, 4, t, 32) for _ in range(3)]
    q, k, v = (torch.cat([x, y] if text_first else [y, x], dim=2) for x, y in zip(text, (qv, kv, vv)))
    method = PAROMethod(_cfg())
    records = []
    o_cal = method.attend(q, k, v, _ctx(1, records, text_len=t, text_first=text_first))
    assert records[-1]["search_kind"] == "calibration"
    assert_close(o_cal, dense_masked_attention(q, k, v)[0], torch.float32)  # calibration step is dense
    o = method.attend(q, k, v, _ctx(2, records, text_len=t, text_first=text_first))
    assert records[-1]["search"] is False and 0 < records[-1]["density"] < 1
    ref = _reference_output(q, k, v, method, ("l0", 0, 0), t, text_first)
    assert_close(o, ref, torch.float32)


def test_halves_keep_separate_masks():
    x0 = synthetic_qkv(GRID, heads=4, head_dim=32, seed=2)
    x1 = synthetic_qkv(GRID, heads=4, head_dim=32, seed=3, kinds=("global", "spatial", "temporal", "local"))
    method = PAROMethod(_cfg())
    records = []
    for step in range(NUM_STEPS):
        method.attend(*(x0 if step < 5 else x1), _ctx(step, records))
    kinds = [(r["step"], r.get("search_kind")) for r in records if r.get("search")]
    assert kinds == [(1, "calibration"), (5, "calibration")]
    assert records[0].get("warmup")
    assert method.state.calibrations == 2
    assert sorted(method.state.entries) == [("l0", 0, 0), ("l0", 0, 1)]
    m0, m1 = method.state.mask(("l0", 0, 0)), method.state.mask(("l0", 0, 1))
    assert not torch.equal(m0, m1) or method.state.orders(("l0", 0, 0)) != method.state.orders(("l0", 0, 1))
    for step, key in ((4, ("l0", 0, 0)), (9, ("l0", 0, 1))):
        assert_close(method.attend(*x1, _ctx(step)), _reference_output(*x1, method, key), torch.float32)


def _calibrated_run(tmp_path):
    xs = {(layer, br): synthetic_qkv(GRID, heads=4, head_dim=32, seed=10 + 2 * li + br)
          for li, layer in enumerate(("l0", "l1")) for br in (0, 1)}
    method = PAROMethod(_cfg())
    for step in range(NUM_STEPS):
        for (layer, br), x in xs.items():
            method.attend(*x, _ctx(step, layer=layer, branch=br))
    path = tmp_path / "paro.pt"
    method.save_calibration(path)
    return method, xs, path


def test_calibration_save_load_reproduces_masks(tmp_path):
    method, xs, path = _calibrated_run(tmp_path)
    loaded = PAROMethod(_cfg(calibration=str(path)))
    assert sorted(loaded.state.entries) == sorted(method.state.entries) and len(method.state.entries) == 8
    for key in method.state.entries:
        assert loaded.state.orders(key) == method.state.orders(key)
        assert torch.equal(loaded.state.mask(key), method.state.mask(key))
    records = []
    for step in range(NUM_STEPS):
        for (layer, br), x in xs.items():
            o = loaded.attend(*x, _ctx(step, records, layer=layer, branch=br))
            if step in (3, 8):
                assert torch.equal(o, method.attend(*x, _ctx(step, layer=layer, branch=br)))
    assert loaded.state.calibrations == 0
    assert not any(r.get("search") for r in records)  # a second run skips calibration entirely


def test_calibration_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_calibration"):
        PAROMethod(_cfg(calibration=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="nothing to save"):
        PAROMethod(_cfg()).save_calibration(tmp_path / "x.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PARO calibration file"):
        PAROMethod(_cfg(calibration=str(garbage)))
    _, xs, path = _calibrated_run(tmp_path)
    with pytest.raises(ValueError, match="density"):
        PAROMethod(_cfg(density=0.3, calibration=str(path)))
    loaded = PAROMethod(_cfg(calibration=str(path)))
    x = xs[("l0", 0)]
    with pytest.raises(ValueError, match="no entry for layer 'l9'"):
        loaded.attend(*x, _ctx(3, layer="l9"))
    other = synthetic_qkv((3, 7, 5), heads=4, head_dim=32)
    with pytest.raises(ValueError, match="grid"):
        loaded.attend(*other, _ctx(3, grid=(3, 7, 5)))


def test_shape_change_recalibrates_without_a_file():
    method = PAROMethod(_cfg())
    method.attend(*synthetic_qkv(GRID, heads=4, head_dim=32), _ctx(1))
    records = []
    other = synthetic_qkv((3, 7, 5), heads=4, head_dim=32)
    o = method.attend(*other, _ctx(2, records, grid=(3, 7, 5)))
    assert records[-1]["search_kind"] == "calibration" and method.state.rebuilds == 1
    assert_close(o, dense_masked_attention(*other)[0], torch.float32)


@pytest.mark.parametrize("bits", [(8, 8), (8, 4)], ids=["int8-int8", "int8-int4"])
def test_quantized_path(bits):
    x = synthetic_qkv(GRID, batch=2, heads=4, head_dim=32, seed=4)
    fp = PAROMethod(_cfg())
    fp.attend(*x, _ctx(1))
    quant = PAROMethod(_cfg(qk_bits=bits[0], pv_bits=bits[1]))
    quant.attend(*x, _ctx(1))
    key = ("l0", 0, 0)
    assert quant.state.orders(key) == fp.state.orders(key)
    o_fp, o_q = fp.attend(*x, _ctx(2)), quant.attend(*x, _ctx(2))
    # The oracle: each head's tokens put in its calibrated order by plain indexing, the dense quantized
    # attention of kernels/naive_quant.py under the calibrated mask, the rows put back.
    c = quant.state.entries[key]
    perms = head_permutations(GRID, c.orders)
    heads = range(perms.shape[0])
    ordered = [torch.stack([t[:, hd, perms[hd]] for hd in heads], 1) for t in x]
    layout = BlockSparseLayout.from_block_mask(c.mask[None], BLOCK, BLOCK, 105, 105)
    op, _ = naive_quantized_attention(*ordered, layout, None, *bits)
    want = torch.empty_like(op)
    keep_perm = layout.to_token_mask()[0]
    keep = torch.empty_like(keep_perm)
    for hd in heads:
        p = perms[hd]
        want[:, hd, p] = op[:, hd]
        keep[hd, p[:, None], p[None, :]] = keep_perm[hd]
    assert_quant_close(o_q, want, x[2], keep[None], bits[1])
    rel = float((o_q - o_fp).norm() / o_fp.norm())
    assert 0 < rel <= QUANT_REL_L2[bits]["structured"]


@pytest.mark.parametrize(
    "field,value",
    [("density", 0.0), ("calibration_steps", (25, 5)), ("orders", ("FHW", "XYZ")), ("pv_bits", 2), ("block_size", 100)],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PAROConfig(**{field: value})


def test_config_json_round_trip():
    cfg = PAROConfig(density=0.3, qk_bits=8, pv_bits=4, calibration="calib.pt", orders=("FHW", "HWF"))
    assert PAROConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------- through diffattn.apply
# CogVideoX puts its text before the video; tests/test_methods_contract.py runs a model with text after it.
@pytest.mark.parametrize("name", ["cogvideox"])
def test_paro_through_apply_on_tiny_models(name, tmp_path):
    import diffattn
    from diffattn.processors.sparse import state_of
    from tests import tiny_models as T
    from tests.tolerances import MODEL_TOL

    model = T.build(name)
    grid = T.TINY[name].grids[0]
    timesteps = [900, 700, 500, 300]  # 4 steps: calibrations at steps 0 and 2
    dense = T.run_steps(model, T.inputs(name, grid), timesteps)
    # Density 1 keeps every tile: permute, attend, unpermute must reproduce the model.
    diffattn.apply(model, "paro", density=1.0, block_size=16, backend="torch", min_tokens=0, num_steps=4)
    full = T.run_steps(model, T.inputs(name, grid), timesteps)
    diffattn.remove(model)
    for a, b in zip(full, dense):
        torch.testing.assert_close(a, b, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])

    diffattn.apply(model, "paro", density=0.4, block_size=16, backend="torch", min_tokens=0, num_steps=4)
    first = T.run_steps(model, T.inputs(name, grid), timesteps)
    rows = diffattn.stats(model).rows
    path = tmp_path / f"{name}.pt"
    state_of(model).methods[0].save_calibration(path)
    diffattn.remove(model)
    assert {r["step"] for r in rows if r.get("search_kind") == "calibration"} == {0, 2}
    assert all(r["density"] < 1 for r in rows if r["step"] in (1, 3))

    diffattn.apply(model, "paro", density=0.4, block_size=16, backend="torch", min_tokens=0, num_steps=4,
                   calibration=str(path))
    second = T.run_steps(model, T.inputs(name, grid), timesteps)
    rows = diffattn.stats(model).rows
    diffattn.remove(model)
    assert not any(r.get("search") for r in rows)  # the loaded calibration replaces online calibration
    for step in (1, 3):
        assert torch.equal(second[step], first[step])
