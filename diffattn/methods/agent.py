"""Agent attention for Stable Diffusion UNets (AgentSD), training-free, plus a pooled-agent variant.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (arXiv 2312.08874);
official code LeapLabTHU/Agent-Attention (``agentsd/patch.py``, ``agentsd/merge.py``).

With ``n`` agent tokens ``A`` (``n << N``), queries ``Q``, keys ``K``, values ``V``:

    O = softmax(Q·Aᵀ·s₂) · (softmax(A·Kᵀ·s) · V) + shortcut·V,    s = D^-1/2,  s₂ = s^k_scale2

The agents first gather from all keys (ordinary softmax attention with the agents as queries), then
every query reads the agents' features with a softened score scale. The cost is ``O(N·n·D)``.

AgentSD (the default here, reproducing the official code at its 50-step recipe), applied per
highest-resolution UNet self-attention layer:

* early steps (step index < 20, whatever the step count): one bipartite matching of the tokens with a
  4×4 stride (:mod:`diffattn.patterns.tome`), on the transformer block's input (before ``norm1``), gives
  two merges: ``q, k, v`` lose 40% of their tokens (``merge_ratio``), and merging 95% (``agent_ratio``,
  capped at the sources — so one agent per window) of the queries gives the agents. Merging the block
  input then projecting with ``to_q`` equals projecting then merging (a mean of an affine map), so the
  agents are formed from ``q`` here. Agent attention runs among the merged tokens; the output is
  unmerged. Where the agents are at least half the merged tokens (``2·agents >= merged``) plain attention
  among the merged tokens runs instead, as in the official code.
* later steps: plain token merging (2×2 stride, same ratio) — or dense attention (``late="dense"``).

As in tomesd (see :mod:`diffattn.methods.tome`), downsampling is measured against the UNet's input
latent, the stride is kept on small grids and random destinations are off for odd batches.

Opt-in deviations, each a field: ``metric="k"`` (match on keys), ``scale_agent_steps=True`` (the
switch step scaled to the run's step count — 8 of 20 steps, the same fraction of the schedule as 20 of
50, where the official switch would leave a 20-step run agent attention throughout),
``force_agents=True`` (agent attention even where agents are half the merged tokens or more, e.g. to
study it on small grids), ``level_reference``, ``adaptive_stride`` and ``random_odd_batch`` as in ToMe.

The pooled-agent variant (``agent_source="pool"``) takes the agents as the 2-D adaptive average pool
of the queries on the layer's grid (about ``num_agents`` of them) — the simple baseline.

``layout="dit"`` is EXPERIMENTAL: pooled agents over the 3-D latent grid ``(F, H, W)`` of a video (or
image) transformer — no token merging, every layer. In a joint sequence the agents gather from all keys
(text included, padding masked) and text queries attend densely; after ``agent_steps`` the layer runs
dense. Its quality has only been measured as the output difference vs dense on tiny random models.

>>> import diffattn  # doctest: +SKIP
>>> diffattn.apply(pipe, "agent")                        # AgentSD defaults  # doctest: +SKIP
>>> diffattn.apply(pipe, "agent", agent_source="pool", num_agents=256)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..kernels.api import log_once
from ..patterns.tome import bipartite_matching, merge_count
from .base import AttentionMethod, AttnContext, MethodConfig, Variant, register_method
from .tome import (
    LevelGate,
    attention_flops,
    check_downsample,
    check_ratio,
    check_stride,
    draw_generator,
    match_metric,
    merge_level,
    merged_attention,
    random_destinations,
    require_unet,
    window_stride,
)

__all__ = ["AgentConfig", "AgentMethod", "agent_attention", "pool_shape", "pooled_agents"]


@dataclass(frozen=True)
class AgentConfig(MethodConfig):
    """Agent attention (AgentSD) for UNet self-attention; pooled agents; an experimental DiT layout.

    Attributes:
        agent_source: "merge" (AgentSD: agents are the queries merged by bipartite matching) or "pool"
            (agents are adaptive-average-pooled queries on the grid). Default "merge".
        agent_ratio: fraction of tokens merged away to form the agents, capped at the number of sources;
            AgentSD early steps: 0.95 (with a 4×4 stride: one agent per window, N/16).
        merge_ratio: fraction of tokens merged away from ``q, k, v`` before attention, in the agent
            steps and in the late token-merging steps. AgentSD: 0.4.
        stride: ``(sy, sx)`` destination windows of the matching in the agent steps. AgentSD: (4, 4).
        late_stride: the same for the late token-merging steps. AgentSD: (2, 2).
        num_agents: agents of the pooled variant and of the DiT layout (about this many: the pool shape
            keeps the grid's aspect ratio). Default 256, AgentSD's agent count at 512².
        k_scale2: the agent-to-query softmax uses ``scale ** k_scale2`` (softer than ``scale``).
            AgentSD: 0.3.
        shortcut: weight of the ``+ shortcut·V`` term. AgentSD: 0.075.
        agent_steps: agent attention runs for step indices ``< agent_steps``. AgentSD: 20 (of its 50). The
            DiT layout reads it as steps of a 50-step schedule, scaled to the run's step count.
        scale_agent_steps: read ``agent_steps`` as steps of a 50-step schedule and scale it to the run's
            step count (the same fraction of the schedule at any step count). AgentSD: no. Default False.
        force_agents: run agent attention even when the agents are at least half the merged tokens
            (AgentSD then runs plain attention among the merged tokens). Merged agents only. Default False.
        late: what runs after the agent steps: "tome" (token merging, AgentSD) or "dense". The DiT layout
            runs dense either way.
        max_downsample: UNet layers downsampled at most this much use the method (1, 2, 4 or 8); others
            run dense. AgentSD: 1.
        metric: what tokens are matched on: "block" (the transformer block's input, AgentSD), "k" or "q"
            (keys or queries; see diffattn.methods.tome). Default "block".
        proportional: ``log(size)`` score bias for merged keys in plain token-merging calls (late steps,
            and layers where the agents are too many). AgentSD: False.
        level_reference: "latent" (downsampling against the UNet's input latent, AgentSD) or
            "largest_layer" (against the largest attention layer of the forward).
        adaptive_stride: halve both strides per axis on grids with fewer than 4 windows along it.
            AgentSD: no. Default False.
        use_rand: random destination per window, seeded by (seed, step, layer). AgentSD: True.
        random_odd_batch: keep random destinations for odd batches (AgentSD turns them off). Default False.
        seed: seed of those draws.
        layout: "unet" (Stable Diffusion UNets; other models raise) or "dit" (EXPERIMENTAL: pooled agents
            over the 3-D latent grid of a video/image transformer). Default "unet".
    """

    agent_source: Literal["merge", "pool"] = "merge"
    agent_ratio: float = 0.95
    merge_ratio: float = 0.4
    stride: tuple[int, int] = (4, 4)
    late_stride: tuple[int, int] = (2, 2)
    num_agents: int = 256
    k_scale2: float = 0.3
    shortcut: float = 0.075
    agent_steps: int = 20
    scale_agent_steps: bool = False
    force_agents: bool = False
    late: Literal["tome", "dense"] = "tome"
    max_downsample: int = 1
    metric: Literal["block", "k", "q"] = "block"
    proportional: bool = False
    level_reference: Literal["latent", "largest_layer"] = "latent"
    adaptive_stride: bool = False
    use_rand: bool = True
    random_odd_batch: bool = False
    seed: int = 0
    layout: Literal["unet", "dit"] = "unet"

    def validate(self) -> None:
        check_ratio("agent_ratio", self.agent_ratio)
        check_ratio("merge_ratio", self.merge_ratio)
        check_stride("stride", self.stride)
        check_stride("late_stride", self.late_stride)
        check_downsample(self.max_downsample)
        if self.num_agents < 1:
            raise ValueError(f"num_agents must be >= 1 (pooled agents), got {self.num_agents}")
        if not (self.k_scale2 >= 0.0 and math.isfinite(self.k_scale2)):
            raise ValueError(f"k_scale2 must be a finite number >= 0 (AgentSD: 0.3), got {self.k_scale2}")
        if not math.isfinite(self.shortcut):
            raise ValueError(f"shortcut must be a finite number (AgentSD: 0.075), got {self.shortcut}")
        if self.agent_steps < 0:
            raise ValueError(f"agent_steps must be >= 0 (a step index; AgentSD: 20), got {self.agent_steps}")


# ------------------------------------------------------------------------------------------ math
def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    scale: float,
    agent_scale: float,
    shortcut: float = 0.0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(Q·Aᵀ·agent_scale) · (softmax(A·Kᵀ·scale) · V) + shortcut·V``.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``; agents: ``[B, H, n, D]``.
        scale, agent_scale: score scales of the agent-to-key and query-to-agent softmaxes.
        shortcut: weight of ``V`` added to the output (needs ``Nq == Nk``, i.e. self-attention).
        key_valid: optional bool ``[B, Nk]`` (True = real key) masking padded keys.

    Returns:
        ``[B, H, Nq, D]``. Both softmaxes are ordinary attention calls (flash kernels on GPU).
    """
    if shortcut and q.shape[-2] != v.shape[-2]:
        raise ValueError(f"the shortcut term needs as many queries as values, got {q.shape[-2]} and {v.shape[-2]}")
    mask = None if key_valid is None else key_valid[:, None, None, :]
    features = F.scaled_dot_product_attention(agents, k, v, attn_mask=mask, scale=scale)
    o = F.scaled_dot_product_attention(q, agents, features, scale=agent_scale)
    if shortcut:
        o = o + shortcut * v
    return o


def pool_shape(grid: tuple[int, ...], num_agents: int) -> tuple[int, ...]:
    """Pooled-agent grid for about ``num_agents`` agents with near-cubic (square in 2-D) pooling cells.

    Axes of size 1 stay 1; each other axis gets ``round(size / c)`` cells, clamped to ``[1, size]``,
    with ``c`` the cell side that would give exactly ``num_agents``.

    >>> pool_shape((64, 64), 256), pool_shape((32, 48), 96), pool_shape((1, 16, 16), 4096)
    ((16, 16), (8, 12), (1, 16, 16))
    """
    sizes = [s for s in grid if s > 1]
    if not sizes:
        return tuple(1 for _ in grid)
    cell = (math.prod(sizes) / num_agents) ** (1.0 / len(sizes))
    return tuple(1 if s == 1 else min(s, max(1, round(s / cell))) for s in grid)


def pooled_agents(q: torch.Tensor, grid: tuple[int, ...], num_agents: int) -> torch.Tensor:
    """Adaptive average pool of the queries ``[B, H, N, D]`` on ``grid`` (2-D or 3-D): ``[B, H, n, D]``."""
    b, h, n, d = q.shape
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} holds {math.prod(grid)} tokens, q has {n}")
    shape = pool_shape(grid, num_agents)
    x = q.reshape(b * h, *grid, d).movedim(-1, 1)
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    pooled = pool(x, shape)
    return pooled.flatten(2).transpose(1, 2).reshape(b, h, math.prod(shape), d)


# ------------------------------------------------------------------------------------------- method
@register_method
class AgentMethod(AttentionMethod):
    """AgentSD on UNet self-attention (or pooled agents on a DiT, experimental)."""

    name = "agent"
    config_cls = AgentConfig
    state_cls = LevelGate
    families = ("unet",)
    # On a video transformer a benchmark runs the DiT layout, measured at a step where agents run.
    benchmarks = {"kernel": (Variant({"layout": "dit"}),), "tiny": (Variant({"layout": "dit"}),)}
    steady_step = 0
    # Agent attention is never exact: only the late dense phase reproduces dense attention.
    lossless_example = {"agent_steps": 0, "late": "dense"}

    @classmethod
    def sharding_refusal(cls, config):
        if config.layout == "dit":
            return None
        return ("the UNet layout pools agents from the whole UNet block input, which context parallelism "
                "shards. Run it on one device, or use AgentConfig(layout='dit') on a transformer.")

    def phase(self, ctx: AttnContext) -> str:
        """"agent" for the early steps, then ``config.late``."""
        cfg, steps = self.config, self.config.agent_steps
        # The DiT layout has no reference code to follow; it keeps the schedule's fraction at any length.
        if ctx.step < (ctx.scaled_step(steps) if cfg.scale_agent_steps or cfg.layout == "dit" else steps):
            return "agent"
        return self.config.late

    def attend(self, q, k, v, ctx):
        cfg: AgentConfig = self.config
        if cfg.layout == "dit":
            return self._attend_dit(q, k, v, ctx)
        h, w = require_unet(
            ctx, "agent",
            " For a video/image transformer pass layout='dit' (experimental: pooled agents over the "
            "3-D latent grid).",
        )
        b, heads, n, d = q.shape
        dense = attention_flops(b, heads, n, n, d)
        scale = ctx.scale if ctx.scale is not None else d**-0.5
        level = merge_level(ctx, n, self.state, cfg.level_reference)
        phase = self.phase(ctx)
        if level > cfg.max_downsample or phase == "dense" or (phase == "tome" and cfg.merge_ratio == 0.0):
            ctx.record(density=1.0, phase="dense", downsample=level, flops=dense)
            return F.scaled_dot_product_attention(q, k, v, scale=ctx.scale)
        rand = random_destinations(cfg.use_rand, cfg.random_odd_batch, b)
        gen = draw_generator(cfg.seed, ctx) if rand else None
        metric = match_metric(q, k, cfg.metric, ctx)
        stride = cfg.late_stride if phase == "tome" else cfg.stride
        m = bipartite_matching(metric, (h, w), window_stride((h, w), stride, cfg.adaptive_stride), gen)
        tm = m.merge_plan(merge_count(n, cfg.merge_ratio, m.src.numel()))
        nm = tm.num_merged
        agent_r = merge_count(n, cfg.agent_ratio, m.src.numel())
        if phase == "agent" and cfg.agent_source == "merge" and 2 * (n - agent_r) >= nm and not cfg.force_agents:
            log_once(
                f"agent-plain-{ctx.layer}",
                f"diffattn: agent: on layer {ctx.layer!r} the {n - agent_r} agents are at least half the {nm} "
                "merged tokens; plain attention among the merged tokens runs there, as in AgentSD "
                "(force_agents=True keeps agent attention)",
            )
            phase = "tome"
        if phase == "tome":
            o = merged_attention(q, k, v, tm, ctx.scale, cfg.proportional)
            flops = attention_flops(b, heads, nm, nm, d)
            ctx.record(density=flops / dense, phase="tome", tokens=nm, downsample=level, flops=flops)
            return o

        if cfg.agent_source == "merge":
            agents = m.merge_plan(agent_r).merge(q)
        else:
            agents = pooled_agents(q, (h, w), cfg.num_agents)
        qm, km, vm = tm.merge(q), tm.merge(k), tm.merge(v)
        om = agent_attention(qm, km, vm, agents, scale, scale**cfg.k_scale2, cfg.shortcut)
        na = agents.shape[-2]
        flops = 2 * attention_flops(b, heads, nm, na, d)
        ctx.record(density=flops / dense, phase="agent", tokens=nm, agents=na, downsample=level, flops=flops)
        return tm.unmerge(om)

    def _attend_dit(self, q, k, v, ctx):
        cfg: AgentConfig = self.config
        b, heads, n, d = q.shape
        dense = attention_flops(b, heads, n, k.shape[-2], d)
        valid = None
        if ctx.key_padding is not None:
            valid = ctx.key_padding.expand(b, k.shape[-2]).to(device=q.device, dtype=torch.bool)
        mask = None if valid is None else valid[:, None, None, :]
        if ctx.grid is None or ctx.num_video + ctx.text_len != n or k.shape[-2] != n:
            ctx.record(density=1.0, phase="dense", fallback="no latent grid for this sequence; ran dense", flops=dense)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale)
        if self.phase(ctx) != "agent":
            ctx.record(density=1.0, phase="dense", flops=dense)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale)
        scale = ctx.scale if ctx.scale is not None else d**-0.5
        vs, ts = ctx.video_slice(n), ctx.text_slice(n)
        qv = q[:, :, vs]
        agents = pooled_agents(qv, ctx.grid, cfg.num_agents)
        o_v = agent_attention(qv, k, v, agents, scale, scale**cfg.k_scale2, 0.0, valid)
        if cfg.shortcut:
            o_v = o_v + cfg.shortcut * v[:, :, vs]
        na, nv = agents.shape[-2], ctx.num_video
        flops = (
            attention_flops(b, heads, na, n, d)
            + attention_flops(b, heads, nv, na, d)
            + attention_flops(b, heads, ctx.text_len, n, d)
        )
        ctx.record(density=flops / dense, phase="agent", agents=na, flops=flops)
        if ctx.text_len == 0:
            return o_v
        # Text queries are few: they attend densely to every (valid) key.
        o_t = F.scaled_dot_product_attention(q[:, :, ts], k, v, attn_mask=mask, scale=ctx.scale)
        parts = (o_t, o_v) if ctx.text_first else (o_v, o_t)
        return torch.cat(parts, dim=2)
