"""Which frame counts, sizes and step counts a loaded model accepts in the demo."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "limits_for"]


@dataclass(frozen=True)
class Limits:
    """Frame counts, sizes and step counts a loaded model accepts in the demo.

    Attributes:
        size_multiple: height and width must be multiples of this (VAE downsampling x patch size).
        min_size, max_size: height/width range in pixels.
        frame_step: ``num_frames - 1`` must be a multiple of this (the VAE's temporal factor).
        max_frames: most frames per video.
        max_steps: most denoising steps.
        token_stride: pixels (frames, rows, columns) per video token, to count tokens.
        max_tokens: most video tokens per generation (None: no cap).
    """

    size_multiple: int = 4
    min_size: int = 16
    max_size: int = 128
    frame_step: int = 1
    max_frames: int = 33
    max_steps: int = 50
    token_stride: tuple[int, int, int] = (1, 4, 4)
    max_tokens: int | None = 16384

    def tokens(self, frames: int, height: int, width: int) -> int:
        tf, th, tw = self.token_stride
        return ((frames - 1) // tf + 1) * (height // th) * (width // tw)

    def check(self, frames: Any, height: Any, width: Any, steps: Any) -> tuple[int, int, int, int]:
        """Validated ``(frames, height, width, steps)`` as ints; ``ValueError`` says what is allowed."""
        frames = _whole("frames", frames)
        height, width = _whole("height", height), _whole("width", width)
        steps = _whole("steps", steps)
        for name, v in (("height", height), ("width", width)):
            if v % self.size_multiple or not self.min_size <= v <= self.max_size:
                raise ValueError(
                    f"{name}={v} is not possible for this model: use a multiple of {self.size_multiple} "
                    f"between {self.min_size} and {self.max_size}"
                )
        if not 1 <= frames <= self.max_frames or (frames - 1) % self.frame_step:
            rule = "" if self.frame_step == 1 else f" with frames - 1 a multiple of {self.frame_step}"
            raise ValueError(f"frames={frames} is not possible: use 1 to {self.max_frames} frames{rule}")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps={steps} is not possible: use 1 to {self.max_steps} steps")
        n = self.tokens(frames, height, width)
        if self.max_tokens is not None and n > self.max_tokens:
            raise ValueError(
                f"{frames} frames of {height}x{width} px are {n} video tokens, more than this demo's limit "
                f"of {self.max_tokens}; use fewer frames or a smaller size"
            )
        return frames, height, width, steps


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a whole number")
    if float(value) != int(value):
        raise ValueError(f"{name}={value!r} must be a whole number")
    return int(value)


def limits_for(pipe: Any, max_tokens: int | None = None) -> Limits:
    """Limits of ``pipe``: the embedded tiny model's, or those implied by a Diffusers video pipeline."""
    from ...pipelines.tiny import TinyVideoPipeline

    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None) or (1, 2, 2)
    if isinstance(patch, int):
        patch = (1, patch, patch)
    pt, ph, pw = (tuple(patch) + (1, 1, 1))[:3] if len(patch) == 3 else (1, patch[0], patch[-1])
    if isinstance(pipe, TinyVideoPipeline):
        # 16,384 tokens: room for the CPU speed-up preset, a couple of minutes a run on two cores.
        return Limits(
            size_multiple=max(ph, pw), token_stride=(pt, ph, pw),
            max_tokens=16384 if max_tokens is None else max_tokens,
        )
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", 8)) or 8)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
    mult = spatial * max(ph, pw)
    return Limits(
        size_multiple=mult, min_size=max(mult, 64), max_size=1280, frame_step=temporal,
        max_frames=1 + temporal * 32, max_steps=100, token_stride=(temporal * pt, spatial * ph, spatial * pw),
        max_tokens=max_tokens,
    )
