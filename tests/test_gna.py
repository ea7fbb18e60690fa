"""GNA: tiled block-sparse neighborhood attention against a brute-force per-query reference."""

import itertools
import math

import pytest
import torch

from diffattn.kernels import block_sparse_attention
from diffattn.kernels.naive import dense_masked_attention
from diffattn.methods import AttnContext
from diffattn.methods.gna import GNAConfig, GNAMethod
from diffattn.patterns.neighborhood import (
    fit_to_grid,
    gna_plan,
    gna_simulate,
    neighborhood_mask_mod,
    neighborhood_token_mask,
    permute_tokens,
    tile_permutation,
    unpermute_tokens,
)
from tests import drawn
from tolerances import assert_close


# ------------------------------------------------------------------------------ brute-force reference
def ref_axis_keys(x, length, kernel, stride, dilation, causal):
    """Keys query ``x`` sees on one axis, from the rule's description (window shifted inside the axis)."""
    group = list(range(x % dilation, length, dilation))
    xi = group.index(x)
    if causal:
        leader = min((xi // stride) * stride + stride - 1, len(group) - 1)
        return group[max(leader - kernel + 1, 0) : xi + 1]
    leader = min((xi // stride) * stride + stride // 2, len(group) - 1)
    start = min(max(leader - kernel // 2, 0), len(group) - kernel)
    return group[start : start + kernel]


def ref_key_sets(shape, kernel, stride, dilation, causal):
    coords = list(itertools.product(*[range(n) for n in shape]))
    index = {c: i for i, c in enumerate(coords)}
    sets = []
    for c in coords:
        per_axis = [
            ref_axis_keys(c[a], shape[a], kernel[a], stride[a], dilation[a], causal[a]) for a in range(len(shape))
        ]
        sets.append([index[kc] for kc in itertools.product(*per_axis)])
    return sets


def ref_na_attention(q, k, v, key_sets, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, keys in enumerate(key_sets):
        s = torch.einsum("bhd,bhkd->bhk", q[:, :, i].float(), k[:, :, keys].float()) * scale
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", s.softmax(-1), v[:, :, keys].float())
    return out


def sets_to_mask(key_sets):
    n = len(key_sets)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, keys in enumerate(key_sets):
        m[i, keys] = True
    return m


def tiled_na(q, k, v, shape, kernel, stride, dilation, causal, tile, block, backend="torch"):
    plan = gna_plan(shape, kernel, stride, dilation, causal, tile, block)
    tiled = [permute_tokens(x, plan.perm, plan.padded_len) for x in (q, k, v)]
    o, lse = block_sparse_attention(*tiled, plan.layout, backend=backend)
    return unpermute_tokens(o, plan.perm), unpermute_tokens(lse, plan.perm)


def _cases():
    cases = []
    # 1-D: odd length, stride in {1, 2, kernel}, dilation in {1, 2}, causal or not
    for s, d, c in itertools.product((1, 2, 7), (1, 2), (False, True)):
        cases.append(((37,), (7,), (s,), (d,), (c,), (16,), 16))
    # 2-D: odd sizes, one tile not filling the grid, even kernel on one axis
    for s, d, c in [
        ((1, 1), (1, 1), (False, False)),
        ((2, 2), (1, 2), (False, False)),
        ((3, 4), (2, 1), (True, False)),
        ((3, 4), (1, 1), (False, False)),
    ]:
        cases.append(((9, 11), (3, 4), s, d, c, (4, 8), 16))
    # 3-D: causal on time, dilation 2, stride = kernel (blocked)
    for s, d, c in [
        ((1, 1, 1), (1, 1, 1), (False, False, False)),
        ((2, 2, 2), (1, 1, 1), (True, False, False)),
        ((3, 3, 3), (2, 2, 2), (False, False, False)),
        ((1, 2, 3), (1, 2, 1), (True, False, False)),
    ]:
        cases.append(((6, 6, 7), (3, 3, 3), s, d, c, (2, 2, 4), 16))
    return cases


CASES = _cases()
CASE_IDS = [
    f"{len(sh)}d-{'x'.join(map(str, sh))}-k{'x'.join(map(str, k))}-s{'x'.join(map(str, s))}"
    f"-d{'x'.join(map(str, d))}-c{''.join('1' if x else '0' for x in c)}"
    for sh, k, s, d, c, _, _ in CASES
]


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,tile,block", CASES, ids=CASE_IDS)
def test_token_mask_matches_reference(shape, kernel, stride, dilation, causal, tile, block):
    want = sets_to_mask(ref_key_sets(shape, kernel, stride, dilation, causal))
    assert torch.equal(neighborhood_token_mask(shape, kernel, stride, dilation, causal), want)


@pytest.mark.parametrize(
    "shape,kernel,stride,dilation,causal",
    [((5, 9), (3, 5), (1, 2), (1, 1), (True, False)), ((3, 4, 6), (3, 3, 3), (1, 2, 2), (1, 1, 2), (False, False, False))],
    ids=["2d-causal", "3d-dilated"],
)
def test_mask_mod_drives_an_exact_flex_path(shape, kernel, stride, dilation, causal):
    from diffattn.kernels.flex import flex_mask_mod_attention

    n = math.prod(shape)
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 16) for _ in range(3))
    mod = neighborhood_mask_mod(shape, kernel, stride, dilation, causal)
    o, lse = flex_mask_mod_attention(q, k, v, mod, block_size=16)
    want = ref_na_attention(q, k, v, ref_key_sets(shape, kernel, stride, dilation, causal))
    assert_close(o, want, torch.float32)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,tile,block", CASES, ids=CASE_IDS)
def test_tiled_layout_is_exact(shape, kernel, stride, dilation, causal, tile, block):
    """The layout computes exactly the neighbourhoods (no superset), never more than the tiled blocks."""
    plan = gna_plan(shape, kernel, stride, dilation, causal, tile, block)
    tok = plan.layout.to_token_mask()[0, 0]
    got = tok[plan.perm][:, plan.perm]
    assert torch.equal(got, sets_to_mask(ref_key_sets(shape, kernel, stride, dilation, causal)))
    st = plan.stats
    assert st["visited_block_pairs"] == int(plan.layout.kv_counts.sum())


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,tile,block", CASES, ids=CASE_IDS)
def test_output_matches_brute_force(shape, kernel, stride, dilation, causal, tile, block):
    n = math.prod(shape)
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    o, lse = tiled_na(q, k, v, shape, kernel, stride, dilation, causal, tile, block)
    want = ref_na_attention(q, k, v, ref_key_sets(shape, kernel, stride, dilation, causal))
    assert_close(o, want, torch.float32)
    assert torch.isfinite(lse).all()


def test_permutation_round_trips_exactly():
    shape, tile = (5, 6, 7), (2, 4, 4)
    perm, padded = tile_permutation(shape, tile)
    n, np_ = math.prod(shape), math.prod(padded)
    assert padded == (6, 8, 8)
    assert perm.unique().numel() == n and int(perm.max()) < np_
    x = torch.randn(2, 3, n, 5)
    tiled = permute_tokens(x, perm, np_)
    assert torch.equal(unpermute_tokens(tiled, perm), x)
    pad = torch.ones(np_, dtype=torch.bool)
    pad[perm] = False
    assert bool((tiled[:, :, pad] == 0).all())
    # each tile is contiguous: the first tile holds exactly the grid positions of the first 2x4x4 box
    first = torch.zeros(shape, dtype=torch.bool)
    first[:2, :4, :4] = True
    assert torch.equal((perm < 32).view(shape), first)


def test_window_covering_everything_equals_dense():
    shape = (5, 6, 7)
    n = math.prod(shape)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    kernel, stride, dilation, causal = fit_to_grid(shape, (99, 99, 99), (1, 1, 1), (1, 1, 1), False)
    assert kernel == shape
    o, _ = tiled_na(q, k, v, shape, kernel, stride, dilation, causal, (2, 2, 4), 16)
    want, _ = dense_masked_attention(q, k, v)
    assert_close(o, want, torch.float32)


def test_blocked_tile_aligned_windows_are_perfectly_block_sparse():
    # stride = kernel = tile on a grid of whole tiles: every tile attends to itself, no partial blocks.
    st = gna_simulate((8, 16, 16), (4, 8, 8), (4, 8, 8), 1, False, (4, 8, 8), 64)
    assert st["partial_block_pairs"] == 0
    assert st["visited_block_pairs"] == 8 * 4 * 4  # 8 tiles of 4 blocks, each block sees its tile
    assert st["speedup_upper_bound"] == pytest.approx(8.0)
    assert st["token_density"] == pytest.approx(1 / 8)


def test_simulator_counts_partial_blocks_of_sliding_windows():
    st = gna_simulate((21, 30, 52), (9, 17, 17), 1, 1, False, (4, 8, 8), 128)
    assert 0 < st["partial_fraction"] <= 1
    assert st["speedup_upper_bound"] > 1
    assert st["token_density"] == pytest.approx((9 / 21) * (17 / 30) * (17 / 52))


# ---------------------------------------------------------------------------------- method end to end
@pytest.mark.parametrize(
    "text_len,text_first", [(0, False), (6, False), (5, True)], ids=["video-only", "video-text", "text-video"]
)
def test_method_equals_dense_with_neighbourhood_mask(text_len, text_first):
    grid = (5, 6, 6)
    cfg = GNAConfig(
        kernel_size=(3, 3, 4), stride=(2, 1, 2), dilation=(1, 2, 1), is_causal=(True, False, False),
        tile_shape=(2, 2, 4), block_size=16, backend="torch",
    )
    nv = math.prod(grid)
    n = nv + text_len
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    rec = []
    ctx = AttnContext(grid=grid, text_len=text_len, text_first=text_first, record=lambda **kw: rec.append(kw))
    out = GNAMethod(cfg).attend(q, k, v, ctx)
    video = sets_to_mask(ref_key_sets(grid, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal))
    full = torch.ones(n, n, dtype=torch.bool)
    vs = slice(text_len, n) if text_first else slice(0, nv)
    full[vs, vs] = video
    want, _ = dense_masked_attention(q, k, v, token_mask=full[None, None])
    assert_close(out, want, torch.float32)
    assert 0 < rec[-1]["token_density"] < 1 and rec[-1]["density"] > 0


def test_method_clips_kernel_to_small_grids_and_runs_dense_in_warmup():
    grid = (3, 4, 4)
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    dense, _ = dense_masked_attention(q, k, v)
    cfg = GNAConfig.preset(
        "strided", tile_shape=(2, 2, 4), block_size=16, backend="torch", dense_steps=10, dense_layers=1
    )
    method = GNAMethod(cfg)
    rec = []
    out = method.attend(q, k, v, AttnContext(grid=grid, step=3, layer_index=2, record=lambda **kw: rec.append(kw)))
    assert rec[-1].get("warmup") is True
    assert_close(out, dense, torch.float32)
    out = method.attend(q, k, v, AttnContext(grid=grid, step=30, layer_index=2, record=lambda **kw: rec.append(kw)))
    assert "warmup" not in rec[-1]
    assert_close(out, dense, torch.float32)  # (12, 24, 24) covers the 3x4x4 grid: dense


def test_config_checks_and_presets():
    with pytest.raises(ValueError, match="stride"):
        GNAConfig(kernel_size=(3, 3, 3), stride=(4, 1, 1))
    with pytest.raises(ValueError, match="tile_shape"):
        GNAConfig(tile_shape=(3, 5, 5), block_size=64)
    with pytest.raises(ValueError, match="preset"):
        GNAConfig.preset("dilated")
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        gna_plan((5, 5), (3, 3), 1, (2, 1))
    for name in ("sliding", "strided", "blocked"):
        cfg = GNAConfig.preset(name)
        assert GNAConfig.from_json(cfg.to_json()) == cfg
    assert GNAConfig.preset("blocked").stride == GNAConfig.preset("blocked").kernel_size


def test_command_line_draws_a_pattern(tmp_path, capsys):
    from diffattn import cli

    out = tmp_path / "na.png"
    argv = ["--shape", "6", "8", "8", "--kernel", "3", "5", "5", "--tile", "2", "4", "4", "--block-size", "32",
            "--query", "0", "3", "7", "--causal", "1", "0", "0", "--out", str(out)]
    assert cli.main(["draw", "gna", *argv]) == 0
    shown = drawn.panels(drawn.read_png(out))
    assert len(shown) == 3  # block layout, token mask, the query's keys
    k, s, d, c = fit_to_grid((6, 8, 8), (3, 5, 5), (1, 1, 1), (1, 1, 1), (True, False, False))
    plan = gna_plan((6, 8, 8), k, s, d, c, (2, 4, 4), 32)
    mask = plan.layout.to_block_mask()[0, 0]
    assert torch.equal(drawn.drawn_mask(shown[0], tuple(mask.shape)), mask)
    assert f"speedup bound {plan.stats['speedup_upper_bound']:.2f}x" in capsys.readouterr().out


def test_triton_interpreter_matches_reference():
    shape, kernel, stride, dilation, causal = (4, 5, 6), (3, 3, 3), (1, 2, 3), (1, 1, 2), (True, False, False)
    n = math.prod(shape)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    o, _ = tiled_na(q, k, v, shape, kernel, stride, dilation, causal, (2, 2, 4), 16, backend="triton")
    assert_close(o, ref_na_attention(q, k, v, ref_key_sets(shape, kernel, stride, dilation, causal)), torch.float32)

