"""Token merging: the planner against a loop reference, merge/unmerge round trips, the "tome" method."""

from __future__ import annotations

import math

import pytest
import torch

import diffattn
from diffattn.methods import AttnContext, ToMeConfig, get_method_class
from diffattn.methods.tome import draw_generator, window_stride
from diffattn.patterns.tome import (
    bipartite_matching,
    destination_indices,
    fit_stride,
    merge_count,
    token_merge,
)
from tests import probes  # noqa: F401  (registers "_test_record")
from tests import tiny_models as T
from tests.tolerances import MODEL_TOL, assert_close


# ------------------------------------------------------------------------------- loop reference
def reference_groups(metric: torch.Tensor, dst: list[int], r: int) -> tuple[list[int], dict[int, list[int]]]:
    """Plain-Python bipartite soft matching for one batch entry (float64 cosine similarities).

    Returns the kept source tokens and, per destination, the tokens merged into it (itself first).
    """
    n = metric.shape[0]
    m = metric.double()
    unit = [m[i] / m[i].norm() for i in range(n)]
    dst_set = set(dst)
    src = [t for t in range(n) if t not in dst_set]
    best = []
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        j = max(range(len(dst)), key=lambda i: sims[i])
        best.append((sims[j], s, dst[j]))
    ranked = sorted(best, key=lambda e: -e[0])
    merged = {s: d for _, s, d in ranked[:r]}
    groups = {d: [d] for d in dst}
    kept = []
    for s in src:
        if s in merged:
            groups[merged[s]].append(s)
        else:
            kept.append(s)
    return kept, groups


def reference_merge(x: torch.Tensor, kept: list[int], groups: dict[int, list[int]], dst: list[int]) -> torch.Tensor:
    """``[..., N, C]`` -> ``[..., len(kept) + len(dst), C]``: kept tokens, then the mean of each group."""
    rows = [x[..., t, :] for t in kept] + [torch.stack([x[..., t, :] for t in groups[d]]).mean(0) for d in dst]
    return torch.stack(rows, dim=-2)


def reference_unmerge(y: torch.Tensor, kept: list[int], groups: dict[int, list[int]], dst: list[int], n: int):
    out = [None] * n
    for i, t in enumerate(kept):
        out[t] = y[..., i, :]
    for j, d in enumerate(dst):
        for t in groups[d]:
            out[t] = y[..., len(kept) + j, :]
    return torch.stack(out, dim=-2)


GRIDS = [((7, 10), (2, 2)), ((16, 16), (4, 4)), ((5, 3), (2, 2)), ((9, 12), (3, 4))]
GRID_IDS = [f"h{g[0]}w{g[1]}-s{s[0]}x{s[1]}" for g, s in GRIDS]


# --------------------------------------------------------------------------------- destinations
@pytest.mark.parametrize("grid,stride", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("rand", [False, True], ids=["topleft", "random"])
def test_destinations_one_per_window(grid, stride, rand):
    gen = torch.Generator().manual_seed(3) if rand else None
    dst = destination_indices(grid, stride, gen).tolist()
    (h, w), (sy, sx) = grid, stride
    windows = [((t // w) // sy, (t % w) // sx) for t in dst]
    assert len(dst) == (h // sy) * (w // sx)
    assert len(set(windows)) == len(dst), "two destinations in one window"
    assert all(r < h // sy and c < w // sx for r, c in windows), "a destination outside the whole windows"
    if not rand:
        assert all((t // w) % sy == 0 and (t % w) % sx == 0 for t in dst)


def test_random_destinations_vary_and_repeat_with_the_seed():
    a = destination_indices((16, 16), (4, 4), torch.Generator().manual_seed(1))
    b = destination_indices((16, 16), (4, 4), torch.Generator().manual_seed(1))
    c = destination_indices((16, 16), (4, 4), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fit_stride():
    assert fit_stride((64, 64), (4, 4)) == (4, 4)
    assert fit_stride((16, 16), (4, 4)) == (4, 4)
    assert fit_stride((8, 12), (4, 4)) == (2, 2)
    assert fit_stride((5, 40), (2, 2)) == (1, 2)
    assert fit_stride((1, 1), (4, 4)) == (1, 1)


# ------------------------------------------------------------------------------- matching/merge
@pytest.mark.parametrize("grid,stride", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9], ids=lambda r: f"ratio{r}")
def test_matching_and_merge_equal_loop_reference(grid, stride, ratio):
    torch.manual_seed(11)
    b, n, c = 2, grid[0] * grid[1], 6
    metric = torch.randn(b, n, c)
    x = torch.randn(b, 3, n, 5)
    m = bipartite_matching(metric, grid, stride)
    r = merge_count(n, ratio, m.src.numel())
    tm = m.merge_plan(r)
    merged, back = tm.merge(x), tm.unmerge(tm.merge(x))
    dst = m.dst.tolist()
    for i in range(b):
        kept, groups = reference_groups(metric[i], dst, r)
        assert tm.num_kept == len(kept)
        assert_close(merged[i], reference_merge(x[i], kept, groups, dst), torch.float32)
        assert_close(back[i], reference_unmerge(reference_merge(x[i], kept, groups, dst), kept, groups, dst, n), torch.float32)
        expected_sizes = [1.0] * len(kept) + [float(len(groups[d])) for d in dst]
        assert tm.sizes[i].tolist() == expected_sizes


@pytest.mark.parametrize("grid,stride", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("shape", ["BNC", "BHND"])
def test_shapes_and_exact_round_trip_of_unmerged_tokens(grid, stride, shape):
    torch.manual_seed(5)
    n = grid[0] * grid[1]
    metric = torch.randn(2, n, 8)
    x = torch.randn(2, n, 7) if shape == "BNC" else torch.randn(2, 3, n, 7)
    tm = token_merge(metric, grid, stride, ratio=0.4, generator=torch.Generator().manual_seed(0))
    y = tm.merge(x)
    assert y.shape == (*x.shape[:-2], tm.num_merged, x.shape[-1])
    assert tm.num_merged == n - merge_count(n, 0.4, n - (grid[0] // stride[0]) * (grid[1] // stride[1]))
    back = tm.unmerge(y)
    assert back.shape == x.shape
    alone = (tm.sizes.gather(1, tm.slot) == 1)  # [B, N]: tokens whose merged token is only themselves
    alone = alone.view(2, *([1] * (x.ndim - 3)), n, 1).expand_as(x)
    assert alone.any() and not alone.all()
    assert torch.equal(back[alone], x[alone]), "an unmerged token did not come back bit-exactly"
    assert float(tm.sizes.sum(1).min()) == n


def test_merge_keeps_half_precision_dtype():
    metric = torch.randn(1, 64, 4)
    tm = token_merge(metric, (8, 8), (2, 2), 0.5)
    x = torch.randn(1, 2, 64, 8).half()
    assert tm.merge(x).dtype == torch.float16 and tm.unmerge(tm.merge(x)).dtype == torch.float16


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="stride"):
        bipartite_matching(torch.randn(1, 6, 2), (2, 3), (4, 4))
    with pytest.raises(ValueError, match="grid"):
        bipartite_matching(torch.randn(1, 7, 2), (2, 3), (1, 1))
    with pytest.raises(ValueError, match="metric"):
        bipartite_matching(torch.randn(6, 2), (2, 3), (1, 1))
    with pytest.raises(ValueError, match="r must"):
        bipartite_matching(torch.randn(1, 16, 2), (4, 4), (2, 2)).merge_plan(13)
    with pytest.raises(ValueError, match="ratio"):
        merge_count(16, 1.0, 12)
    tm = token_merge(torch.randn(2, 16, 2), (4, 4), (2, 2), 0.5)
    with pytest.raises(ValueError, match="x must be"):
        tm.merge(torch.randn(2, 15, 3))


# ----------------------------------------------------------------------------------- the method
def unet_ctx(h, w, step=0, num_steps=50, layer_index=0, branch=0, scale=None, block_input=None, latent=None):
    return AttnContext(
        layer=f"layer{layer_index}", layer_index=layer_index, grid=(1, h, w), step=step, num_steps=num_steps,
        branch=branch, scale=scale, model="unet", block_input=block_input,
        latent_grid=(1, h, w) if latent is None else latent,
    )


def reference_tome_attention(q, k, v, dst, r, scale, proportional, metric="k"):
    """Independent ToMe attention: loop-reference groups, explicit softmax with log-size key bias.

    ``metric`` is "k", "q" or a ``[B, N, C]`` tensor (the block input)."""
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    for i in range(b):
        if isinstance(metric, torch.Tensor):
            src_metric = metric[i]
        else:
            src_metric = (k if metric == "k" else q)[i].transpose(0, 1).reshape(n, h * d)
        kept, groups = reference_groups(src_metric, dst, r)
        qm, km, vm = (reference_merge(t[i], kept, groups, dst) for t in (q, k, v))
        sizes = torch.tensor([1.0] * len(kept) + [float(len(groups[x])) for x in dst])
        scores = (qm @ km.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
        if proportional:
            scores = scores + sizes.log()
        om = scores.softmax(-1) @ vm
        out[i] = reference_unmerge(om, kept, groups, dst, n)
    return out


CASES = [((16, 16), 2, 16), ((12, 10), 3, 8), ((7, 9), 2, 40)]
CASE_IDS = [f"h{g[0]}w{g[1]}-H{h}-D{d}" for g, h, d in CASES]


@pytest.mark.parametrize("grid,heads,dim", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("proportional", [True, False], ids=["prop", "plain"])
@pytest.mark.parametrize("metric", ["k", "q"])
def test_tome_method_equals_reference(grid, heads, dim, proportional, metric):
    torch.manual_seed(7)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, heads, n, dim) for _ in range(3))
    cfg = ToMeConfig(ratio=0.5, proportional=proportional, metric=metric, use_rand=True, seed=4)
    method = get_method_class("tome")(cfg)
    ctx = unet_ctx(*grid, step=3, layer_index=2)
    out = method.attend(q, k, v, ctx)
    dst = destination_indices(grid, cfg.stride, draw_generator(cfg.seed, ctx)).tolist()
    r = merge_count(n, cfg.ratio, n - len(dst))
    assert_close(out, reference_tome_attention(q, k, v, dst, r, None, proportional, metric), torch.float32)


# One test per tomesd rule the defaults follow; each also shows the former default gives another result.
@pytest.mark.parametrize("grid,heads,dim", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_default_matches_on_the_block_input(grid, heads, dim, batch):
    """tomesd matches tokens on the transformer block's input (before norm1), not on keys or queries."""
    torch.manual_seed(8)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, dim) for _ in range(3))
    x = torch.randn(batch, n, 24)
    cfg = ToMeConfig()
    assert cfg.metric == "block" and not cfg.proportional
    out = get_method_class("tome")(cfg).attend(q, k, v, unet_ctx(*grid, block_input=x))
    dst = destination_indices(grid, cfg.stride, None if batch % 2 else draw_generator(cfg.seed, unet_ctx(*grid))).tolist()
    r = merge_count(n, cfg.ratio, n - len(dst))
    assert_close(out, reference_tome_attention(q, k, v, dst, r, None, False, x), torch.float32)
    keys = get_method_class("tome")(cfg.replace(metric="k")).attend(q, k, v, unet_ctx(*grid, block_input=x))
    assert float((keys - out).abs().max()) > 1e-3


def test_block_metric_without_a_block_input_uses_keys_and_says_so(caplog):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 64, 8) for _ in range(3))
    with caplog.at_level("WARNING", logger="diffattn"):
        out = get_method_class("tome")(ToMeConfig()).attend(q, k, v, unet_ctx(8, 8, layer_index=31))
    assert "matched on the keys" in caplog.text
    keys = get_method_class("tome")(ToMeConfig(metric="k")).attend(q, k, v, unet_ctx(8, 8, layer_index=31))
    assert torch.equal(out, keys)


def test_proportional_attention_is_opt_in():
    torch.manual_seed(9)
    grid, n = (10, 9), 90
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    ctx = unet_ctx(*grid, block_input=torch.randn(2, n, 6))
    plain = get_method_class("tome")(ToMeConfig(use_rand=False)).attend(q, k, v, ctx)
    prop = get_method_class("tome")(ToMeConfig(use_rand=False, proportional=True)).attend(q, k, v, ctx)
    dst = destination_indices(grid, (2, 2)).tolist()
    r = merge_count(n, 0.5, n - len(dst))
    assert_close(plain, reference_tome_attention(q, k, v, dst, r, None, False, ctx.block_input), torch.float32)
    assert_close(prop, reference_tome_attention(q, k, v, dst, r, None, True, ctx.block_input), torch.float32)
    assert float((plain - prop).abs().max()) > 1e-3


@pytest.mark.parametrize("latent,grid,expect", [((64, 64), (64, 64), 1), ((64, 64), (32, 32), 2),
                                                ((9, 13), (5, 7), 2), ((9, 13), (3, 4), 3), ((3, 3), (2, 2), 2)])
def test_downsampling_is_measured_against_the_input_latent(latent, grid, expect):
    """tomesd: downsample = ceil(sqrt(N_latent // N)) — an SDXL UNet's first attention level (32² of a 64²
    latent) is level 2, so max_downsample=1 leaves it dense; the former rule (largest layer) called it 1."""
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 1, n, 4) for _ in range(3))
    rows = {}
    ctx = unet_ctx(*grid, latent=(1, *latent))
    ctx.record = rows.update
    cfg = ToMeConfig(max_downsample=8)
    get_method_class("tome")(cfg).attend(q, k, v, ctx)
    assert rows["downsample"] == expect
    old = {}
    ctx.record = old.update
    get_method_class("tome")(cfg.replace(level_reference="largest_layer")).attend(q, k, v, ctx)
    assert old["downsample"] == 1


def test_stride_is_kept_on_small_grids():
    """tomesd never halves the stride: a 6x6 level with stride 2 merges 36 -> 18 tokens; the former adaptive
    stride (1 x 1 there) merged nothing."""
    q, k, v = (torch.randn(2, 2, 36, 8) for _ in range(3))
    counts = {}
    for adaptive in (False, True):
        rows = {}
        ctx = unet_ctx(6, 6, block_input=torch.randn(2, 36, 5))
        ctx.record = rows.update
        out = get_method_class("tome")(ToMeConfig(adaptive_stride=adaptive)).attend(q, k, v, ctx)
        counts[adaptive] = rows.get("tokens")
        if adaptive:
            assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counts == {False: 18, True: 36}
    assert window_stride((6, 6), (2, 2), False) == (2, 2) and window_stride((6, 6), (2, 2), True) == (1, 1)


def test_stride_longer_than_the_grid_is_cut_to_it(caplog):
    with caplog.at_level("WARNING", logger="diffattn"):
        assert window_stride((3, 8), (4, 4), False) == (3, 4)
    assert "larger than the (3, 8) token grid" in caplog.text


@pytest.mark.parametrize("name", ["tome", "agent"])  # AgentSD draws its destinations as tomesd does
def test_random_destinations_are_off_for_odd_batches(name):
    """tomesd turns use_rand off for odd batches; random_odd_batch=True keeps them."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 8) for _ in range(3))
    x = torch.randn(1, 256, 6)
    cls = get_method_class(name)

    def run(q, k, v, x, **fields):
        return cls(cls.config_cls(**fields)).attend(q, k, v, unet_ctx(16, 16, step=2, block_input=x))

    assert torch.equal(run(q, k, v, x), run(q, k, v, x, use_rand=False))
    assert not torch.equal(run(q, k, v, x, random_odd_batch=True), run(q, k, v, x, use_rand=False))
    even = run(*(torch.cat([t, t]) for t in (q, k, v, x)))
    assert not torch.equal(even[:1], run(q, k, v, x, use_rand=False))


def test_proportional_attention_is_exact_for_duplicate_tokens():
    """If every merged source duplicates its destination, size-weighted attention over merged tokens is dense
    attention; without the size weighting it is not."""
    torch.manual_seed(2)
    grid, n, heads, dim = (8, 8), 64, 2, 16
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    dst = destination_indices(grid, (2, 2)).tolist()
    src = [t for t in range(n) if t not in set(dst)]
    copies = src[::2][:20]
    for j, s in enumerate(copies):
        for t in (q, k, v):
            t[:, :, s] = t[:, :, dst[(5 * j) % len(dst)]]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ctx = unet_ctx(*grid)
    cfg = ToMeConfig(ratio=20 / 64, use_rand=False, proportional=True, metric="k")
    out = get_method_class("tome")(cfg).attend(q, k, v, ctx)
    assert_close(out, dense, torch.float32)
    plain = get_method_class("tome")(cfg.replace(proportional=False)).attend(q, k, v, unet_ctx(*grid))
    assert float((plain - dense).abs().max()) > 1e-3


def test_cfg_branches_merge_alike():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 8) for _ in range(3))
    method = get_method_class("tome")(ToMeConfig(metric="k"))
    a = method.attend(q, k, v, unet_ctx(16, 16, step=5, branch=0))
    b = method.attend(q, k, v, unet_ctx(16, 16, step=5, branch=1))
    c = method.attend(q, k, v, unet_ctx(16, 16, step=6, branch=0))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def unet():
    return T.build("unet")


def test_only_highest_resolution_layers_by_default(unet):
    kw = T.inputs("unet", (1, 16, 12))
    for max_down, expect in ((1, {(1, 16, 12): "tome", (1, 8, 6): "dense"}), (2, {(1, 16, 12): "tome", (1, 8, 6): "tome"})):
        diffattn.apply(unet, "tome", min_tokens=0, max_downsample=max_down)
        T.run(unet, kw)
        phases = {row["grid"]: row["phase"] for row in diffattn.stats(unet).rows}
        diffattn.remove(unet)
        assert phases == expect


def test_each_layer_gets_its_transformer_blocks_input(unet):
    from diffusers.models.attention import BasicTransformerBlock

    captured, handles = {}, []
    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            keep = lambda mod, args, kw, name=name: captured.__setitem__(f"{name}.attn1", kw.get("hidden_states", args[0] if args else None))
            handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    diffattn.apply(unet, "_test_record", min_tokens=0)
    try:
        T.run(unet, T.inputs("unet", (1, 9, 13), batch=2))
        seen = {c["layer"]: (c["block_input"], c["latent_grid"]) for c in diffattn.method_of(unet).calls}
        from diffattn.processors.blocks import block_input_of

        kept = [n for n, m in unet.named_modules() if hasattr(m, "processor") and block_input_of(m) is not None]
        assert kept == [], f"block inputs kept after the forward: {kept}"
    finally:
        diffattn.remove(unet)
        for h in handles:
            h.remove()
    assert set(seen) == set(captured) and len(seen) == 4
    for layer, (x, latent) in seen.items():
        assert x is captured[layer] and x.ndim == 3 and latent == (1, 9, 13)


def test_tome_on_tiny_unet_runs_and_remove_restores(unet):
    kw = T.inputs("unet", (1, 16, 16))
    ref = T.run(unet, kw)
    diffattn.apply(unet, "tome", min_tokens=0)
    out = T.run(unet, kw)
    diffattn.remove(unet)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    rel = float((out - ref).norm() / ref.norm())
    print(f"tome (ratio 0.5) on the tiny UNet: relative L2 difference vs dense {rel:.4f}")
    assert rel < 0.5
    atol, rtol = MODEL_TOL
    torch.testing.assert_close(T.run(unet, kw), ref, atol=atol, rtol=rtol)


def test_non_unet_model_raises_clearly():
    wan = T.build("wan")
    diffattn.apply(wan, "tome", min_tokens=0)
    try:
        with pytest.raises(ValueError, match="Stable Diffusion UNets"):
            T.run(wan, T.inputs("wan", (3, 4, 6)))
    finally:
        diffattn.remove(wan)


def test_config_validation():
    with pytest.raises(ValueError, match="ratio"):
        ToMeConfig(ratio=1.0)
    with pytest.raises(ValueError, match="stride"):
        ToMeConfig(stride=(0, 2))
    with pytest.raises(ValueError, match="max_downsample"):
        ToMeConfig(max_downsample=3)
    with pytest.raises(ValueError, match="metric"):
        ToMeConfig(metric="x")
    with pytest.raises(ValueError, match="level_reference"):
        ToMeConfig(level_reference="top")
    cfg = ToMeConfig(ratio=0.3, stride=(4, 2))
    assert ToMeConfig.from_json(cfg.to_json()) == cfg
    assert math.isclose(diffattn.ToMeConfig().ratio, 0.5)
