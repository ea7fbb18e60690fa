"""Generalized neighborhood attention (GNA) as a method: tile, attend block-sparsely, untile.

The planner is :func:`diffattn.patterns.neighborhood.gna_plan`: video tokens are permuted so tiles of
the latent grid are contiguous (padded up to whole tiles), attention runs over the exact tiled block
layout, and the output is permuted back. Text tokens stay dense (handled by
:class:`~diffattn.methods.sparse.VideoSparseMethod`).

>>> import torch
>>> from diffattn.methods import AttnContext
>>> method = GNAMethod(GNAConfig(kernel_size=(3, 3, 5), stride=(1, 1, 1), tile_shape=(2, 2, 4),
...                              block_size=16, backend="torch"))
>>> q = k = v = torch.randn(1, 2, 5 * 4 * 6, 16)
>>> method.attend(q, k, v, AttnContext(grid=(5, 4, 6))).shape
torch.Size([1, 2, 120, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..patterns import check_block_size
from ..patterns import neighborhood as na
from .base import Drawing, MethodConfig, Variant, register_method
from .sparse import Backend, VideoSparseMethod, check_warmup, kernel_attention, warmup_layers_and_steps

__all__ = ["GNAConfig", "GNAMethod"]


@dataclass(frozen=True)
class GNAConfig(MethodConfig):
    """Generalized neighborhood attention (arXiv 2504.16922) on the (frames, height, width) latent grid.

    Every per-axis tuple is ordered (F, H, W); entries larger than the grid are clipped to it, so a
    kernel covering an axis makes that axis dense. The defaults are the "strided" preset (a 4x8x8 tile
    of queries shares one 12x24x24 window, i.e. 3x3x3 tiles), sized for Wan 480p; the GNA paper tunes
    windows per model.

    Attributes:
        kernel_size: neighbourhood size per axis (latent positions). Default (12, 24, 24).
        stride: queries are grouped in runs of this size per axis and share the window of the run's
            centre query; 1 is sliding-window NA, ``kernel_size`` is blocked attention. Default (4, 8, 8).
        dilation: neighbours are this many positions apart per axis. Default (1, 1, 1).
        is_causal: per axis, attend only to keys at or before the query (e.g. time). Default all False.
        dense_layers: the first this many attention layers run dense. Default 0.
        dense_steps: the first this many denoising steps (out of 50; scaled to the run's step count) run
            dense. Default 0.
        tile_shape: tile of the token permutation (F, H, W); ``block_size`` must cut it into boxes
            (e.g. (4, 8, 8) with 64 or 128). Speed only.
        block_size: tile size (tokens) of the kernel. Speed only.
        backend: kernel backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch" or "flex".
    """

    kernel_size: tuple[int, int, int] = (12, 24, 24)
    stride: tuple[int, int, int] = (4, 8, 8)
    dilation: tuple[int, int, int] = (1, 1, 1)
    is_causal: tuple[bool, bool, bool] = (False, False, False)
    dense_layers: int = 0
    dense_steps: int = 0
    tile_shape: tuple[int, int, int] = (4, 8, 8)
    block_size: int = 64
    backend: Backend = "auto"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = na.PRESETS

    def validate(self) -> None:
        for name in ("kernel_size", "stride", "dilation", "tile_shape"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"GNAConfig.{name} entries must be >= 1, got {getattr(self, name)}")
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(
                f"GNAConfig.stride must be <= kernel_size on every axis, got stride={self.stride} "
                f"kernel_size={self.kernel_size}"
            )
        check_warmup(self)
        check_block_size(self.block_size, "GNAConfig.block_size")
        try:
            na._check_tile((1, 1, 1), self.tile_shape, self.block_size)
        except ValueError as e:
            raise ValueError(f"GNAConfig.tile_shape: {e}") from None


@register_method
class GNAMethod(VideoSparseMethod):
    """Neighborhood attention over tiles of the latent grid, exact through partial blocks."""

    name = "gna"
    config_cls = GNAConfig
    drawing = Drawing("neighborhood", "a generalized neighborhood attention window and its tile layout")
    benchmarks = {
        "tiny": (Variant(), Variant({"kernel_size": (5, 8, 8), "stride": (1, 4, 4)}, "gna-small")),
        "quality": (
            Variant({}, "k=(12, 24, 24) s=(4, 8, 8)"),
            Variant({"kernel_size": (4, 16, 16), "stride": (4, 8, 8)}, "k=(4, 16, 16) s=(4, 8, 8)"),
        ),
    }
    small_example = {
        "kernel_size": (3, 3, 3), "stride": (1, 1, 2), "tile_shape": (2, 2, 4), "block_size": 16, "backend": "torch",
    }
    lossless_example = {**small_example, "kernel_size": (64, 64, 64), "stride": (1, 1, 1)}

    use_dense = warmup_layers_and_steps

    def plan(self, grid: tuple[int, int, int], device: torch.device) -> na.GNAPlan:
        """Tiling and layout for a latent ``grid`` (cached per shape and device)."""
        cfg = self.config
        k, s, d, c = na.fit_to_grid(grid, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
        return na.gna_plan(grid, k, s, d, c, cfg.tile_shape, cfg.block_size, device)

    def plan_facts(self, grid, device):
        st = self.plan(tuple(grid), device).stats
        return {"simulated_speedup": st["speedup_upper_bound"], "token_density": st["token_density"]}

    def video_attention(self, q, k, v, ctx):
        plan = self.plan(tuple(ctx.grid), q.device)
        tiled = [na.permute_tokens(x, plan.perm, plan.padded_len) for x in (q, k, v)]
        o, lse = kernel_attention(*tiled, plan.layout, ctx.scale, self.config.backend)
        st = plan.stats
        # Padding to whole tiles can make the visited blocks outnumber dense attention's on tiny grids, so
        # the layout's own density (<= 1) is reported, with the work relative to dense alongside.
        ctx.record(
            density=plan.layout.density,
            token_density=st["token_density"],
            work_vs_dense=st["block_density"],
            search=False,
        )
        return na.unpermute_tokens(o, plan.perm), na.unpermute_tokens(lse, plan.perm)
