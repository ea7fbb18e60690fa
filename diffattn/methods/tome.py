"""ToMe for Stable Diffusion as an attention method: merge tokens, attend among fewer, unmerge.

Paper: "Token Merging for Fast Stable Diffusion" (arXiv 2303.17604); official code dbolya/tomesd.
The planner is :mod:`diffattn.patterns.tome`.

ToMe for SD merges the (normalised) block input before the self-attention's ``to_q/to_k/to_v`` and
unmerges after ``to_out``. Merging is a mean — weights that sum to one — and the projections are affine,
so ``to_q(merge(x)) == merge(to_q(x))`` bias included, and unmerging (a copy) commutes with ``to_out``.
Merging ``q, k, v`` inside the attention call therefore computes the attention tomesd computes; the
projections still run on all ``N`` tokens (attention is the ``N^2`` part).

The defaults reproduce ``tomesd.apply_patch(unet, ratio, max_downsample, sx, sy, use_rand,
merge_attn=True, merge_crossattn=False, merge_mlp=False)``:

* tokens are matched on the block input ``hidden_states`` (before ``norm1``), read by a hook on the
  UNet transformer block (``metric="block"``);
* a layer's downsampling is ``ceil(sqrt(N_latent // N))`` against the UNet's input latent, so on an
  SDXL UNet (no attention at full resolution) ``max_downsample=1`` merges nothing, as in tomesd;
* the stride is used as given on every grid, and random destinations are off for odd batches (the
  cond/uncond halves of a CFG batch must not be split);
* no proportional attention.

Opt-in deviations, each a field: ``metric="k"`` matches on the keys (all heads), as ToMe does for ViTs
— two tokens with nearly parallel keys get nearly the same weight from every query, so averaging them
perturbs the attention least; ``proportional=True`` adds ``log size`` to merged keys' scores (exact if
the merged tokens were identical); ``level_reference="largest_layer"`` measures downsampling against the
largest attention layer of the forward (SDXL then merges its 32² level at ``max_downsample=1``);
``adaptive_stride=True`` halves the stride on grids with fewer than 4 windows per axis (finer
destinations on small grids); ``random_odd_batch=True`` keeps random destinations for odd batches
(diffattn's draw is seeded by (seed, step, layer), so separate cond/uncond calls merge alike anyway).

>>> import diffattn  # doctest: +SKIP
>>> diffattn.apply(pipe, "tome", ratio=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..kernels.api import log_once
from ..patterns.tome import TokenMerge, bipartite_matching, fit_stride, merge_count
from .base import AttentionMethod, AttnContext, Drawing, MethodConfig, register_method

__all__ = [
    "ToMeConfig", "ToMeMethod", "merged_attention", "LevelGate", "require_unet", "attention_flops",
    "merge_level", "window_stride", "random_destinations", "match_metric",
]


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """Token merging in self-attention (ToMe for SD); the defaults are tomesd's.

    Attributes:
        ratio: fraction of a layer's tokens removed by merging, ``int(N * ratio)``, capped at the number
            of source tokens (``1 - 1/(sy*sx)`` of them). tomesd default: 0.5.
        stride: ``(sy, sx)`` destination windows; one destination per window. tomesd default: (2, 2).
        max_downsample: merge in layers downsampled at most this much (1, 2, 4 or 8), measured as
            ``level_reference`` says. tomesd default: 1.
        metric: what tokens are matched on by cosine similarity: "block" (the transformer block's input
            ``hidden_states``, before ``norm1``: tomesd), "k" or "q" (keys or queries, all heads
            concatenated: ToMe for ViTs; needs no block hook). Default "block".
        proportional: add ``log(size)`` to the scores of merged keys (ToMe's proportional attention;
            exact when merged tokens are identical). tomesd: no. Default False.
        level_reference: "latent" (downsampling ``ceil(sqrt(N_latent // N))`` against the UNet's input
            latent: tomesd) or "largest_layer" (against the largest attention layer of the forward, so an
            SDXL UNet's highest attention level counts as 1). Default "latent".
        adaptive_stride: halve the stride per axis on grids with fewer than 4 windows along that axis
            (more destinations on small grids). tomesd: no. Default False.
        use_rand: random destination in each window (tomesd's ``use_rand``, default True); False takes
            the top-left cell. The draw is seeded by (seed, step, layer), so the cond and uncond calls of
            a step — batched or not — merge alike and runs are reproducible.
        random_odd_batch: keep random destinations when the attention batch is odd. tomesd turns them off
            there (its per-call draw would differ between separate cond/uncond calls; diffattn's does
            not). Default False.
        seed: seed of those draws.
    """

    ratio: float = 0.5
    stride: tuple[int, int] = (2, 2)
    max_downsample: int = 1
    metric: Literal["block", "k", "q"] = "block"
    proportional: bool = False
    level_reference: Literal["latent", "largest_layer"] = "latent"
    adaptive_stride: bool = False
    use_rand: bool = True
    random_odd_batch: bool = False
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


def random_destinations(use_rand: bool, random_odd_batch: bool, batch: int) -> bool:
    """tomesd's rule: no random destinations for an odd batch (unless ``random_odd_batch``)."""
    return use_rand and (random_odd_batch or batch % 2 == 0)


def match_metric(q: torch.Tensor, k: torch.Tensor, which: str, ctx: AttnContext | None = None) -> torch.Tensor:
    """``[B, N, C]``: the per-token vector that matching compares.

    "block" is the block input from ``ctx``; where the layer has none (not a UNet transformer block, or
    a block input of another shape) the keys are used, logged once.
    """
    b, h, n, d = q.shape
    if which == "block":
        x = None if ctx is None else ctx.block_input
        if x is not None and x.ndim == 3 and x.shape[:2] == (b, n):
            return x
        log_once(
            f"tome-block-metric-{None if ctx is None else ctx.layer}",
            f"diffattn: layer {None if ctx is None else ctx.layer!r} has no transformer-block input "
            f"({'none' if x is None else tuple(x.shape)} for {b} x {n} tokens); tokens are matched on the "
            "keys (metric='k')",
            logging.WARNING,
        )
        which = "k"
    x = k if which == "k" else q
    return x.transpose(1, 2).reshape(b, n, h * d)


def merge_level(ctx: AttnContext, n: int, gate: "LevelGate", reference: str) -> int:
    """The layer's downsampling: tomesd's ``ceil(sqrt(N_latent // N))`` ("latent") or the LevelGate's."""
    if reference == "latent":
        if ctx.latent_grid is not None:
            f, lh, lw = ctx.latent_grid
            return max(1, math.ceil(math.sqrt((f * lh * lw) // n)))
        log_once(
            "tome-latent-level",
            "diffattn: the UNet's input latent size is unknown here; downsampling is measured against "
            "the largest attention layer (level_reference='largest_layer')",
            logging.WARNING,
        )
    return gate.downsample(ctx, n)


def window_stride(grid: tuple[int, int], stride: tuple[int, int], adaptive: bool) -> tuple[int, int]:
    """The destination stride used on ``grid``: as given (tomesd), or halved on small grids (``adaptive``).

    An axis shorter than its stride (where tomesd has no destination and fails) gets the axis length,
    logged once.
    """
    if adaptive:
        return fit_stride(grid, stride)
    fitted = (min(stride[0], grid[0]), min(stride[1], grid[1]))
    if fitted != tuple(stride):
        log_once(
            f"tome-stride-{tuple(grid)}-{tuple(stride)}",
            f"diffattn: stride {tuple(stride)} is larger than the {tuple(grid)} token grid; using {fitted} there",
            logging.WARNING,
        )
    return fitted


def attention_flops(b: int, h: int, nq: int, nk: int, d: int) -> float:
    """Multiply-adds x 2 of ``softmax(QK^T) V``: ``4 * B * H * Nq * Nk * D``."""
    return 4.0 * b * h * nq * nk * d


class LevelGate:
    """Decides whether a UNet layer is at most ``max_downsample`` below the highest-resolution attention.

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
    state_cls = LevelGate
    families = ("unet",)
    drawing = Drawing("tome", "the token-merging partition of a latent grid")
    lossless_example = {"ratio": 0.0}

    @classmethod
    def sharding_refusal(cls, config):
        return ("it merges tokens across the whole UNet block input, which context parallelism shards. "
                "Run ToMe on one device.")

    def attend(self, q, k, v, ctx):
        cfg: ToMeConfig = self.config
        h, w = require_unet(ctx, "tome")
        b, heads, n, d = q.shape
        dense = attention_flops(b, heads, n, n, d)
        level = merge_level(ctx, n, self.state, cfg.level_reference)
        if level > cfg.max_downsample or cfg.ratio == 0.0:
            ctx.record(density=1.0, phase="dense", downsample=level, flops=dense)
            return F.scaled_dot_product_attention(q, k, v, scale=ctx.scale)
        stride = window_stride((h, w), cfg.stride, cfg.adaptive_stride)
        rand = random_destinations(cfg.use_rand, cfg.random_odd_batch, b)
        gen = draw_generator(cfg.seed, ctx) if rand else None
        matching = bipartite_matching(match_metric(q, k, cfg.metric, ctx), (h, w), stride, gen)
        tm = matching.merge_plan(merge_count(n, cfg.ratio, matching.src.numel()))
        o = merged_attention(q, k, v, tm, ctx.scale, cfg.proportional)
        flops = attention_flops(b, heads, tm.num_merged, tm.num_merged, d)
        ctx.record(density=flops / dense, phase="tome", tokens=tm.num_merged, downsample=level, flops=flops)
        return o
