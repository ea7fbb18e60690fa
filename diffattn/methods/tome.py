"""ToMe for Stable Diffusion as an attention method: merge tokens, attend among fewer, unmerge.

Paper: "Token Merging for Fast Stable Diffusion" (arXiv 2303.17604); official code dbolya/tomesd.
The planner is :mod:`diffattn.patterns.tome`.

ToMe for SD merges the (normalised) block input before the self-attention's ``to_q/to_k/to_v`` and
unmerges after ``to_out``. Merging is a mean — weights that sum to one — and the projections are affine,
so ``to_q(merge(x)) == merge(to_q(x))`` bias included, and unmerging (a copy) commutes with ``to_out``.
Merging ``q, k, v`` inside the attention call therefore computes the same attention as tomesd, with the
one difference below; the projections still run on all ``N`` tokens (attention is the ``N^2`` part).

Matching metric. The block input is not visible at the attention call — only ``q, k, v`` are. We
match on the keys (all heads concatenated), as ToMe does for ViTs: two tokens whose keys are nearly
parallel get nearly the same attention weight from every query, so averaging them perturbs the
attention least; query similarity does not control that. ``metric="q"`` is available for comparison.

Proportional attention (ToMe's size weighting): a merged key standing for ``s`` tokens gets ``log s``
added to its scores, so the softmax counts it ``s`` times. If the merged tokens were identical this
is exactly dense attention; tomesd omits it (``proportional=False`` reproduces tomesd).

Only the highest-resolution attention layers are merged by default (tomesd's ``max_downsample=1``):
a layer's downsampling is ``sqrt(N_top / N)`` where ``N_top`` is the largest token count among the
layers called so far in the same forward (a UNet calls its highest-resolution attention first).

>>> import diffattn  # doctest: +SKIP
>>> diffattn.apply(pipe, "tome", ratio=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..patterns.tome import TokenMerge, bipartite_matching, fit_stride, merge_count
from .base import AttentionMethod, AttnContext, MethodConfig, register_method

__all__ = ["ToMeConfig", "ToMeMethod", "merged_attention", "LevelGate", "require_unet", "attention_flops"]


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """Token merging in self-attention (ToMe for SD).

    Attributes:
        ratio: fraction of a layer's tokens removed by merging, ``int(N * ratio)``, capped at the number
            of source tokens (``1 - 1/(sy*sx)`` of them). tomesd default: 0.5.
        stride: ``(sy, sx)`` destination windows; one destination per window. tomesd default: (2, 2).
            Halved per axis on grids with fewer than 4 windows along that axis.
        max_downsample: merge in layers downsampled at most this much from the highest-resolution
            attention layer (1, 2, 4 or 8). tomesd default: 1 (only the highest-resolution blocks).
        metric: tokens are matched by cosine similarity of their keys ("k") or queries ("q"), all heads
            concatenated. tomesd matches the block input, which the attention call does not see; "k".
        proportional: add ``log(size)`` to the scores of merged keys (ToMe's proportional attention).
            ToMe (ViT): True; tomesd: False. Default True.
        use_rand: random destination in each window (tomesd's ``use_rand``, default True); False takes
            the top-left cell. The draw is seeded by (seed, step, layer), so the cond and uncond calls of
            a step — batched or not — merge alike and runs are reproducible.
        seed: seed of those draws.
    """

    ratio: float = 0.5
    stride: tuple[int, int] = (2, 2)
    max_downsample: int = 1
    metric: Literal["k", "q"] = "k"
    proportional: bool = True
    use_rand: bool = True
    seed: int = 0

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)
        check_stride("stride", self.stride)
        check_downsample(self.max_downsample)


# ------------------------------------------------------------------------------------------ helpers
def check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (a fraction of tokens merged away), got {value!r}")


def check_stride(name: str, value: tuple[int, int]) -> None:
    if any(s < 1 for s in value):
        raise ValueError(f"{name} must be (sy, sx) with ints >= 1 (AgentSD (4, 4), ToMe (2, 2)), got {value!r}")


def check_downsample(value: int) -> None:
    if value not in (1, 2, 4, 8):
        raise ValueError(f"max_downsample must be 1, 2, 4 or 8 (1 = highest-resolution blocks only), got {value!r}")


def require_unet(ctx: AttnContext, method: str, hint: str = "") -> tuple[int, int]:
    """The layer's ``(h, w)`` grid; raise ``ValueError`` if the call is not UNet image self-attention."""
    if ctx.model != "unet":
        raise ValueError(
            f"the {method!r} method runs on Stable Diffusion UNets (UNet2DConditionModel: SD 1.x/2.x, SDXL); "
            f"this is a {ctx.model or 'unknown'} model.{hint}"
        )
    grid = ctx.grid
    if grid is None or grid[0] != 1 or ctx.text_len:
        raise ValueError(
            f"the {method!r} method needs a 2-D token grid (1, h, w) without text tokens; layer {ctx.layer!r} "
            f"has grid {grid} and {ctx.text_len} text tokens"
        )
    return grid[1], grid[2]


def draw_generator(seed: int, ctx: AttnContext) -> torch.Generator:
    """A CPU generator seeded by (seed, step, layer): equal for the CFG branches of one step."""
    key = ((seed * 1_000_003 + ctx.step) * 1_009 + ctx.layer_index) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def match_metric(q: torch.Tensor, k: torch.Tensor, which: str) -> torch.Tensor:
    """``[B, N, H*D]``: the per-token vector that matching compares (all heads concatenated)."""
    x = k if which == "k" else q
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_flops(b: int, h: int, nq: int, nk: int, d: int) -> float:
    """Multiply-adds x 2 of ``softmax(QK^T) V``: ``4 * B * H * Nq * Nk * D``."""
    return 4.0 * b * h * nq * nk * d


class LevelGate:
    """Decides whether a UNet layer is at most ``max_downsample`` below the highest resolution.

    Every attention layer runs once per forward, and a UNet calls its highest-resolution attention
    first; so the largest token count seen since the current forward began is the top level. A new
    forward starts when a layer repeats or the (step, branch) changes — a resolution change between
    calls is therefore picked up at once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._forward: tuple[int, int] | None = None
        self._seen: set[int] = set()
        self._largest = 0

    def downsample(self, ctx: AttnContext, n: int) -> int:
        key = (ctx.step, ctx.branch)
        if key != self._forward or ctx.layer_index in self._seen:
            self._forward, self._seen, self._largest = key, set(), 0
        self._seen.add(ctx.layer_index)
        self._largest = max(self._largest, n)
        return max(1, round(math.sqrt(self._largest / n)))


def merged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tm: TokenMerge,
    scale: float | None,
    proportional: bool,
) -> torch.Tensor:
    """Attention among merged tokens, unmerged back: ``[B, H, N, D]`` in and out."""
    qm, km, vm = tm.merge(q), tm.merge(k), tm.merge(v)
    bias = tm.log_sizes().to(qm.dtype) if proportional else None
    om = F.scaled_dot_product_attention(qm, km, vm, attn_mask=bias, scale=scale)
    return tm.unmerge(om)


# ------------------------------------------------------------------------------------------- method
@register_method
class ToMeMethod(AttentionMethod):
    """Token-merged self-attention on the highest-resolution UNet layers (every step)."""

    name = "tome"
    config_cls = ToMeConfig

    def reset(self) -> None:
        self.gate = LevelGate()

    def attend(self, q, k, v, ctx):
        cfg: ToMeConfig = self.config
        h, w = require_unet(ctx, "tome")
        b, heads, n, d = q.shape
        dense = attention_flops(b, heads, n, n, d)
        level = self.gate.downsample(ctx, n)
        if level > cfg.max_downsample or cfg.ratio == 0.0:
            ctx.record(density=1.0, phase="dense", downsample=level, flops=dense)
            return F.scaled_dot_product_attention(q, k, v, scale=ctx.scale)
        stride = fit_stride((h, w), cfg.stride)
        gen = draw_generator(cfg.seed, ctx) if cfg.use_rand else None
        matching = bipartite_matching(match_metric(q, k, cfg.metric), (h, w), stride, gen)
        tm = matching.merge_plan(merge_count(n, cfg.ratio, matching.src.numel()))
        o = merged_attention(q, k, v, tm, ctx.scale, cfg.proportional)
        flops = attention_flops(b, heads, tm.num_merged, tm.num_merged, d)
        ctx.record(density=flops / dense, phase="tome", tokens=tm.num_merged, downsample=level, flops=flops)
        return o
