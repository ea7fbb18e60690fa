"""Radial attention as a method: a static block mask among video tokens, dense warm-up.

The mask is :func:`diffattn.patterns.radial.radial_block_mask`; text tokens stay dense (handled
exactly by :class:`~diffattn.methods.sparse.VideoSparseMethod`).

>>> import torch
>>> from diffattn.methods import AttnContext
>>> method = RadialMethod(RadialConfig.preset("hunyuan", pattern_block=16, dense_steps=0, backend="torch"))
>>> q = k = v = torch.randn(1, 2, 6 * 32, 16)
>>> method.attend(q, k, v, AttnContext(grid=(6, 4, 8), step=20)).shape
torch.Size([1, 2, 192, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..patterns import check_block_size
from ..patterns import radial as radial_pattern
from .base import Drawing, MethodConfig, Variant, register_method
from .sparse import Backend, VideoSparseMethod, check_warmup, kernel_attention, warmup_layers_and_steps

__all__ = ["RadialConfig", "RadialMethod"]


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Radial attention (arXiv 2506.19852). Defaults are the official Wan 2.1 settings.

    Attributes:
        decay_factor: scales the in-frame window of frame pairs two or more frames apart
            (window ``2**bitlen(P) / 2**bitlen(dist) * decay_factor``, floored at ``pattern_block``).
            Official: 0.2 for Wan, 0.95 for HunyuanVideo.
        attention_sink: every frame attends densely to the first latent frame. Official: on for Wan,
            off for HunyuanVideo.
        dense_layers: the first this many attention layers run dense. Official: 1 (Wan), 0 (HunyuanVideo).
        dense_steps: the first this many denoising steps (out of 50; scaled to the run's step count)
            run dense. Official: 12 for both.
        pattern_block: granularity (tokens) of the rule's window floor, temporal striding and block
            shrink. Official: 128. This changes *what* is computed, unlike ``block_size``.
        official_truncation: reproduce the official mask bit for bit, including its loss of a frame's
            last block when the frame straddles one more block than ``ceil(P / pattern_block)``
            (e.g. some frames at Wan 480p). Default False: keep those blocks (a slightly denser mask).
        block_size: tile size (tokens) of the kernel; the pattern is computed exactly at any tile
            size. Speed only.
        backend: kernel backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch" or "flex".
    """

    decay_factor: float = 0.2
    attention_sink: bool = True
    dense_layers: int = 1
    dense_steps: int = 12
    pattern_block: int = 128
    official_truncation: bool = False
    block_size: int = 64
    backend: Backend = "auto"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "wan": dict(decay_factor=0.2, attention_sink=True, dense_layers=1, dense_steps=12),
        "hunyuan": dict(decay_factor=0.95, attention_sink=False, dense_layers=0, dense_steps=12),
    }

    def validate(self) -> None:
        if not self.decay_factor > 0:
            raise ValueError(
                f"RadialConfig.decay_factor must be > 0 (0.2 Wan, 0.95 HunyuanVideo), got {self.decay_factor}"
            )
        check_warmup(self)
        check_block_size(self.pattern_block, "RadialConfig.pattern_block")
        check_block_size(self.block_size, "RadialConfig.block_size")


@register_method
class RadialMethod(VideoSparseMethod):
    """Static radial block mask among video tokens; dense for the warm-up layers and steps."""

    name = "radial"
    config_cls = RadialConfig
    drawing = Drawing("radial", "Radial's static block mask for a video shape")
    # The quality benchmark measures layer 0 at one step: its warm-up is off so that the call runs the mask.
    benchmarks = {
        "quality": tuple(
            Variant({**RadialConfig.PRESETS[family], "dense_steps": 0, "dense_layers": 0},
                    f"decay={RadialConfig.PRESETS[family]['decay_factor']}")
            for family in ("wan", "hunyuan")
        ),
    }
    small_example = {
        "attention_sink": False, "pattern_block": 16, "block_size": 16, "dense_layers": 0, "dense_steps": 0,
        "backend": "torch",
    }
    # A window wider than any frame: dense on grids of at most three frames (no temporal striding yet).
    lossless_example = {**small_example, "decay_factor": 1e6}

    use_dense = warmup_layers_and_steps

    def layout(self, grid: tuple[int, int, int], device: torch.device):
        """Kernel layout for video tokens of a latent ``grid`` (cached per shape and device)."""
        cfg = self.config
        f, h, w = grid
        return radial_pattern.radial_layout(
            f, h * w, cfg.decay_factor, cfg.pattern_block, cfg.attention_sink, cfg.block_size, device,
            cfg.official_truncation,
        )

    def video_attention(self, q, k, v, ctx):
        hits = radial_pattern.layout_cache_hits()
        layout = self.layout(ctx.grid, q.device)
        o, lse = kernel_attention(q, k, v, layout, ctx.scale, self.config.backend)
        ctx.record(density=layout.density, search=False, cache_hit=radial_pattern.layout_cache_hits() > hits)
        return o, lse
