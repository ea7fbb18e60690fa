"""Agent attention (AgentSD): the formula, the merged and pooled agents, the schedule, tiny pipelines."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import diffattn
from diffattn.methods import AgentConfig, AttnContext, ToMeConfig, get_method_class
from diffattn.methods.agent import agent_attention, pool_shape, pooled_agents
from diffattn.methods.tome import draw_generator
from diffattn.patterns.tome import destination_indices, merge_count
from tests import tiny_models as T
from tests.test_tome import reference_groups, reference_merge, reference_unmerge, unet_ctx
from tests.tolerances import MODEL_TOL, assert_close


# ------------------------------------------------------------------------------- references
def reference_formula(q, k, v, a, scale, agent_scale, shortcut, key_valid=None):
    """softmax(Q·Aᵀ·s₂) · (softmax(A·Kᵀ·s) · V) + shortcut·V with explicit matmuls, in float64."""
    q, k, v, a = (t.double() for t in (q, k, v, a))
    s1 = (a @ k.transpose(-1, -2)) * scale
    if key_valid is not None:
        s1 = s1.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    features = torch.softmax(s1, -1) @ v
    o = torch.softmax((q @ a.transpose(-1, -2)) * agent_scale, -1) @ features
    if shortcut:
        o = o + shortcut * v
    return o.float()


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def reference_pool(q: torch.Tensor, grid: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling by explicit loops over the cells (raster order)."""
    b, h, n, d = q.shape
    x = q.reshape(b, h, *grid, d)
    cells = []
    for idx in itertools.product(*[_bins(s, o) for s, o in zip(grid, shape)]):
        region = x[(slice(None), slice(None), *[slice(lo, hi) for lo, hi in idx])]
        cells.append(region.reshape(b, h, -1, d).mean(2))
    return torch.stack(cells, dim=2)


def reference_agentsd(q, k, v, dst, r, agent_r, cfg, pooled_shape=None, block_input=None):
    """AgentSD by hand: loop-reference groups, merged q/k/v, agents, the formula, unmerge.

    Merged agents at least half as many as the merged tokens: plain softmax among the merged tokens."""
    b, h, n, d = q.shape
    s = d**-0.5
    out = torch.empty_like(q)
    for i in range(b):
        if cfg.metric == "block":
            metric = block_input[i]
        else:
            metric = (k if cfg.metric == "k" else q)[i].transpose(0, 1).reshape(n, h * d)
        kept, groups = reference_groups(metric, dst, r)
        qm, km, vm = (reference_merge(t[i], kept, groups, dst) for t in (q, k, v))
        if pooled_shape is None and 2 * (n - agent_r) >= len(kept) + len(dst) and not cfg.force_agents:
            om = torch.softmax((qm @ km.transpose(-1, -2)) * s, -1) @ vm
            out[i] = reference_unmerge(om, kept, groups, dst, n)
            continue
        if pooled_shape is None:
            kept_a, groups_a = reference_groups(metric, dst, agent_r)
            agents = reference_merge(q[i], kept_a, groups_a, dst)
        else:
            grid = pooled_shape[0]
            agents = reference_pool(q[i : i + 1], grid, pooled_shape[1])[0]
        om = reference_formula(qm[None], km[None], vm[None], agents[None], s, s**cfg.k_scale2, cfg.shortcut)[0]
        out[i] = reference_unmerge(om, kept, groups, dst, n)
    return out


# ------------------------------------------------------------------------------------ formula
FORMULA = [(2, 3, 37, 5, 8), (1, 2, 64, 16, 40), (2, 1, 21, 21, 80)]


@pytest.mark.parametrize("b,h,n,na,d", FORMULA, ids=[f"B{b}-H{h}-N{n}-A{a}-D{d}" for b, h, n, a, d in FORMULA])
def test_agent_attention_equals_formula(b, h, n, na, d):
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    a = torch.randn(b, h, na, d)
    s = d**-0.5
    assert_close(agent_attention(q, k, v, a, s, s**0.3, 0.075), reference_formula(q, k, v, a, s, s**0.3, 0.075), torch.float32)


def test_agent_attention_masks_padded_keys():
    q, a = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 4, 8)
    k, v = torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[0, -3:] = False
    out = agent_attention(q, k, v, a, 0.35, 0.7, 0.0, valid)
    assert_close(out, reference_formula(q, k, v, a, 0.35, 0.7, 0.0, valid), torch.float32)
    with pytest.raises(ValueError, match="shortcut"):
        agent_attention(q, k, v, a, 0.35, 0.7, 0.1)


def test_pool_shape_and_pooled_agents():
    assert pool_shape((64, 64), 256) == (16, 16)
    assert pool_shape((128, 128), 256) == (16, 16)
    assert pool_shape((30, 52), 256) == (12, 21)
    assert pool_shape((21, 30, 52), 256) == (4, 6, 10)
    assert pool_shape((1, 1), 5) == (1, 1)
    for grid, count in (((7, 10), 6), ((5, 4, 6), 12), ((16, 16), 256)):
        q = torch.randn(2, 3, math.prod(grid), 8)
        shape = pool_shape(grid, count)
        assert_close(pooled_agents(q, grid, count), reference_pool(q, grid, shape), torch.float32)


# ------------------------------------------------------------------------------------- method
METHOD_CASES = [((16, 16), 2, 16), ((12, 10), 3, 8), ((9, 14), 2, 40)]


@pytest.mark.parametrize("grid,heads,dim", METHOD_CASES, ids=[f"h{g[0]}w{g[1]}-H{h}-D{d}" for g, h, d in METHOD_CASES])
@pytest.mark.parametrize("source", ["merge", "pool"])
@pytest.mark.parametrize("metric", ["block", "k", "q"])
def test_agent_method_equals_reference(grid, heads, dim, source, metric):
    torch.manual_seed(3)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, heads, n, dim) for _ in range(3))
    x = torch.randn(2, n, 12)
    cfg = AgentConfig(agent_source=source, num_agents=12, metric=metric, seed=9)
    ctx = unet_ctx(*grid, step=0, layer_index=1, block_input=x)
    rows = {}
    ctx.record = rows.update
    out = get_method_class("agent")(cfg).attend(q, k, v, ctx)
    dst = destination_indices(grid, cfg.stride, draw_generator(cfg.seed, ctx)).tolist()
    num_src = n - len(dst)
    r, agent_r = merge_count(n, cfg.merge_ratio, num_src), merge_count(n, cfg.agent_ratio, num_src)
    pooled = None if source == "merge" else (grid, pool_shape(grid, cfg.num_agents))
    assert rows["phase"] == "agent"
    assert rows["agents"] == (n - agent_r if source == "merge" else math.prod(pooled[1]))
    assert_close(out, reference_agentsd(q, k, v, dst, r, agent_r, cfg, pooled, x), torch.float32)


def test_default_matches_agents_on_the_block_input():
    torch.manual_seed(13)
    grid, n = (12, 9), 108
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    x = torch.randn(2, n, 10)
    cfg = AgentConfig(use_rand=False)
    assert AgentConfig().metric == "block"
    out = get_method_class("agent")(cfg).attend(q, k, v, unet_ctx(*grid, block_input=x))
    dst = destination_indices(grid, cfg.stride).tolist()
    r, agent_r = merge_count(n, 0.4, n - len(dst)), merge_count(n, 0.95, n - len(dst))
    assert_close(out, reference_agentsd(q, k, v, dst, r, agent_r, cfg, None, x), torch.float32)
    keys = get_method_class("agent")(cfg.replace(metric="k")).attend(q, k, v, unet_ctx(*grid, block_input=x))
    assert float((keys - out).abs().max()) > 1e-3


@pytest.mark.parametrize("agent_ratio,merge_ratio,stride,agents", [(0.5, 0.4, (2, 2), True), (0.9, 0.1, (4, 4), False),
                                                                    (0.3, 0.4, (4, 4), True)])
def test_plain_attention_among_merged_tokens_when_agents_are_half_of_them(agent_ratio, merge_ratio, stride, agents):
    """AgentSD runs agent attention only when 2 * agents < merged tokens; otherwise plain attention among the
    merged tokens (e.g. its late-step setting agent_ratio=0.5 with a 2 x 2 stride). force_agents=True keeps agents."""
    torch.manual_seed(14)
    grid, n = (16, 12), 192
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    x = torch.randn(2, n, 6)
    cfg = AgentConfig(agent_ratio=agent_ratio, merge_ratio=merge_ratio, stride=stride, use_rand=False)
    rows = {}
    ctx = unet_ctx(*grid, block_input=x)
    ctx.record = rows.update
    out = get_method_class("agent")(cfg).attend(q, k, v, ctx)
    dst = destination_indices(grid, stride).tolist()
    r, agent_r = merge_count(n, merge_ratio, n - len(dst)), merge_count(n, agent_ratio, n - len(dst))
    assert (2 * (n - agent_r) < n - r) == (not agents)
    assert rows["phase"] == ("tome" if agents else "agent")
    assert_close(out, reference_agentsd(q, k, v, dst, r, agent_r, cfg, None, x), torch.float32)
    forced = get_method_class("agent")(cfg.replace(force_agents=True)).attend(q, k, v, unet_ctx(*grid, block_input=x))
    assert_close(forced, reference_agentsd(q, k, v, dst, r, agent_r, cfg.replace(force_agents=True), None, x), torch.float32)
    assert (float((forced - out).abs().max()) > 1e-3) == agents


@pytest.mark.parametrize("source", ["merge", "pool"])
def test_all_tokens_as_agents_is_query_smoothed_dense_attention(source):
    """With A = Q (no merging, every token an agent) and no shortcut, the agents' features are exactly dense
    attention, so O = softmax(s₂·Q·Qᵀ) · softmax(s·Q·Kᵀ) · V: dense attention mixed across queries by their
    similarity (the order of the agents does not matter)."""
    torch.manual_seed(4)
    grid, heads, dim = (6, 7), 2, 16
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, heads, n, dim) for _ in range(3))
    cfg = AgentConfig(agent_source=source, merge_ratio=0.0, agent_ratio=0.0, num_agents=n, shortcut=0.0,
                      force_agents=True, metric="k")
    out = get_method_class("agent")(cfg).attend(q, k, v, unet_ctx(*grid))
    s = dim**-0.5
    dense = torch.softmax((q @ k.transpose(-1, -2)) * s, -1) @ v
    mixing = torch.softmax((q @ q.transpose(-1, -2)) * s**0.3, -1)
    assert_close(out, mixing @ dense, torch.float32)
    if source == "pool":
        assert torch.equal(pooled_agents(q, grid, n), q)


@pytest.mark.parametrize("num_steps,switch,scaled", [(50, 20, False), (30, 20, False), (25, 20, False),
                                                     (50, 20, True), (10, 4, True), (4, 2, True)], ids=str)
@pytest.mark.parametrize("late", ["tome", "dense"])
def test_schedule_switches_at_configured_step(num_steps, switch, scaled, late):
    """AgentSD switches at step index 20 whatever the step count; scale_agent_steps scales it (opt-in)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 256, 8) for _ in range(3))
    cfg = AgentConfig(late=late, seed=3, metric="k", scale_agent_steps=scaled)
    method = get_method_class("agent")(cfg)
    phases = {}
    outs = {}
    for step in (0, switch - 1, switch, num_steps - 1):
        ctx = unet_ctx(16, 16, step=step, num_steps=num_steps)
        row = {}
        ctx.record = row.update
        outs[step] = method.attend(q, k, v, ctx)
        phases[step] = row["phase"]
    assert phases == {0: "agent", switch - 1: "agent", switch: late, num_steps - 1: late}
    if not scaled and num_steps != 50:
        ctx = unet_ctx(16, 16, step=ctx.scaled_step(20), num_steps=num_steps)
        ctx.record = row.update
        method.attend(q, k, v, ctx)
        assert row["phase"] == "agent", "the former rule (scaled to the step count) switched here"
    after = unet_ctx(16, 16, step=switch, num_steps=num_steps)
    if late == "dense":
        assert torch.equal(outs[switch], F.scaled_dot_product_attention(q, k, v))
    else:
        tome = ToMeConfig(ratio=cfg.merge_ratio, stride=cfg.late_stride, proportional=False, seed=cfg.seed, metric="k")
        assert torch.equal(outs[switch], get_method_class("tome")(tome).attend(q, k, v, after))


@pytest.mark.parametrize("reference", ["latent", "largest_layer"])
def test_lower_resolution_layers_run_dense_and_resolution_changes_are_seen(reference):
    torch.manual_seed(0)
    method = get_method_class("agent")(AgentConfig(metric="k", level_reference=reference))
    big = [torch.randn(2, 2, 256, 8) for _ in range(3)]
    small = [torch.randn(2, 2, 64, 8) for _ in range(3)]
    latent = {0: (1, 16, 16), 1: (1, 8, 8)}

    def phase(tensors, grid, index, step=0):
        ctx = unet_ctx(*grid, step=step, layer_index=index, latent=latent[step])
        row = {}
        ctx.record = row.update
        out = method.attend(*tensors, ctx)
        return row["phase"], out

    assert phase(big, (16, 16), 0)[0] == "agent"
    p, out = phase(small, (8, 8), 1)
    assert p == "dense" and torch.equal(out, F.scaled_dot_product_attention(*small))
    # The next forward runs at a lower resolution: its top layer is now the 8 x 8 one.
    assert phase(small, (8, 8), 0, step=1)[0] == "agent"
    wide = AgentConfig(max_downsample=2, metric="k", level_reference=reference)
    method = get_method_class("agent")(wide)
    assert phase(big, (16, 16), 0)[0] == "agent" and phase(small, (8, 8), 1)[0] == "agent"


# ------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def sd():
    from diffattn.pipelines.tiny_sd import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0, with_tokenizer=False)
    torch.manual_seed(5)
    embeds = torch.randn(1, 8, 32)
    negative = torch.zeros(1, 8, 32)
    off = _generate(pipe, embeds, negative)
    return pipe, embeds, negative, off


def _generate(pipe, embeds, negative):
    out = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4, guidance_scale=7.5,
        height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np",
    )
    return torch.from_numpy(out.images)


@pytest.mark.parametrize(
    "method,fields,expected",
    [
        ("agent", {}, ["agent"] * 4),
        ("agent", {"scale_agent_steps": True}, ["agent", "agent", "tome", "tome"]),
        ("agent", {"agent_source": "pool", "num_agents": 16, "late": "dense", "agent_steps": 2},
         ["agent", "agent", "dense", "dense"]),
        ("tome", {}, ["tome"] * 4),
    ],
    ids=["agentsd", "agentsd-scaled", "pooled", "tome"],
)
def test_tiny_sd_pipeline_end_to_end(sd, method, fields, expected):
    pipe, embeds, negative, off = sd
    diffattn.apply(pipe, method, min_tokens=0, **fields)
    try:
        on = _generate(pipe, embeds, negative)
        rows = diffattn.stats(pipe).rows
    finally:
        diffattn.remove(pipe)
    top = sorted({(r["step"], r["phase"]) for r in rows if r["grid"] == (1, 16, 16)})
    assert [p for _, p in top] == expected
    assert all(r["phase"] == "dense" for r in rows if r["grid"] == (1, 8, 8))
    assert all(r["text_len"] == 0 for r in rows)
    assert torch.isfinite(on).all() and on.shape == off.shape == (1, 32, 32, 3)
    assert not torch.equal(on, off)
    print(f"tiny SD pipeline, {method} {fields}: mean |image - dense image| = {float((on - off).abs().mean()):.4f}")


def test_tiny_sd_pipeline_remove_restores(sd):
    pipe, embeds, negative, off = sd
    diffattn.apply(pipe, "agent", min_tokens=0)
    diffattn.remove(pipe)
    atol, rtol = MODEL_TOL
    torch.testing.assert_close(_generate(pipe, embeds, negative), off, atol=atol, rtol=rtol)


def test_non_unet_model_raises_unless_dit_layout():
    wan = T.build("wan")
    kw = T.inputs("wan", (3, 4, 6))
    ref = T.run(wan, kw)
    diffattn.apply(wan, "agent", min_tokens=0)
    try:
        with pytest.raises(ValueError, match="layout='dit'"):
            T.run(wan, kw)
    finally:
        diffattn.remove(wan)
    diffattn.apply(wan, "agent", min_tokens=0, layout="dit", num_agents=8)
    try:
        out = T.run(wan, kw)
        rows = diffattn.stats(wan).rows
    finally:
        diffattn.remove(wan)
    assert {r["phase"] for r in rows} == {"agent"} and {r["agents"] for r in rows} == {math.prod(pool_shape((3, 4, 6), 8))}
    rel = float((out - ref).norm() / ref.norm())
    print(f"DiT pooled agents (8 of 72 tokens) on the tiny Wan: relative L2 difference vs dense {rel:.4f}")
    assert torch.isfinite(out).all() and 0.0 < rel < 1.0


@pytest.mark.parametrize("text_first", [False, True], ids=["text-last", "text-first"])
def test_dit_layout_equals_reference_with_text_and_padding(text_first):
    torch.manual_seed(6)
    grid, text, heads, dim = (2, 3, 4), 5, 2, 16
    nv = math.prod(grid)
    n = nv + text
    q, k, v = (torch.randn(2, heads, n, dim) for _ in range(3))
    valid = torch.ones(2, n, dtype=torch.bool)
    pad = slice(0, 2) if text_first else slice(n - 2, n)
    valid[0, pad] = False
    cfg = AgentConfig(layout="dit", num_agents=6)
    ctx = AttnContext(layer="blocks.0.attn1", grid=grid, text_len=text, text_first=text_first, key_padding=valid,
                      step=0, num_steps=50, model="hunyuanvideo")
    out = get_method_class("agent")(cfg).attend(q, k, v, ctx)
    vs = slice(text, n) if text_first else slice(0, nv)
    ts = slice(0, text) if text_first else slice(nv, n)
    s = dim**-0.5
    agents = reference_pool(q[:, :, vs], grid, pool_shape(grid, 6))
    o_v = reference_formula(q[:, :, vs], k, v, agents, s, s**0.3, 0.0, valid) + 0.075 * v[:, :, vs]
    scores = (q[:, :, ts] @ k.transpose(-1, -2)) * s
    o_t = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1) @ v
    assert_close(out[:, :, vs], o_v, torch.float32)
    assert_close(out[:, :, ts], o_t, torch.float32)
    late = AttnContext(layer="blocks.0.attn1", grid=grid, text_len=text, text_first=text_first, key_padding=valid,
                       step=20, num_steps=50, model="hunyuanvideo")
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    assert torch.equal(get_method_class("agent")(cfg).attend(q, k, v, late), dense)
    # The DiT layout scales the switch to the step count: step 4 of 10 is past 20 of 50.
    late.step, late.num_steps = 4, 10
    assert torch.equal(get_method_class("agent")(cfg).attend(q, k, v, late), dense)
    late.step = 3
    assert not torch.equal(get_method_class("agent")(cfg).attend(q, k, v, late), dense)


def test_config_validation_and_json():
    for field, value in (("agent_ratio", 1.0), ("merge_ratio", -0.1), ("stride", (4, 0)), ("num_agents", 0),
                         ("k_scale2", -1.0), ("agent_steps", -1), ("max_downsample", 16)):
        with pytest.raises(ValueError, match=field):
            AgentConfig(**{field: value})
    with pytest.raises(ValueError, match="layout"):
        AgentConfig(layout="video")
    cfg = AgentConfig(agent_source="pool", num_agents=64, late="dense")
    assert AgentConfig.from_json(cfg.to_json()) == cfg
    assert diffattn.make_config("agent", shortcut=0.0).shortcut == 0.0


def test_sdxl_style_unet_without_attention_at_the_top_level():
    """SDXL's first level has no attention: the highest-resolution attention level is the one that runs agents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()
    kw = T.inputs("unet", (1, 16, 16))
    phases = {}
    for reference in ("latent", "largest_layer"):
        diffattn.apply(unet, "agent", min_tokens=0, level_reference=reference)
        try:
            out = T.run(unet, kw)
            phases[reference] = {(r["grid"], r["phase"]) for r in diffattn.stats(unet).rows}
        finally:
            diffattn.remove(unet)
        assert torch.isfinite(out).all()
    # AgentSD measures downsampling against the 16 x 16 latent: nothing runs at level 1 on this UNet.
    assert phases["latent"] == {((1, 8, 8), "dense"), ((1, 4, 4), "dense")}
    assert phases["largest_layer"] == {((1, 8, 8), "agent"), ((1, 4, 4), "dense")}
