"""How well a tiny-model video keeps the prompted motion: the shape's speed along and across the
prompted direction (:func:`measure_motion`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import COLORS, DIRECTIONS, parse_prompt

__all__ = ["measure_motion"]


def measure_motion(video: np.ndarray | torch.Tensor, prompt: str) -> dict[str, Any]:
    """How the prompted shape moves in ``video`` (``[F, H, W, 3]`` in [0, 1], e.g. a pipeline output).

    The shape is found by projecting each pixel onto the line from the prompt's background colour to its
    shape colour (so anti-aliased edges count by their coverage); its per-frame centroid gives a fitted
    speed along the prompt's direction and across it, in pixels per frame (positive = the prompted way).

    Returns:
        ``{"centroids": [F, 2] (x, y), "speed": along the direction, "drift": across it}``; the speeds
        are None when the prompt does not name a colour, a background and a direction.
    """
    frames = torch.as_tensor(np.asarray(video), dtype=torch.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video must be [frames, height, width, 3], got shape {tuple(frames.shape)}")
    words = parse_prompt(prompt)
    if not {"color", "background", "direction"} <= set(words):
        return {"centroids": None, "speed": None, "drift": None}
    fg = torch.tensor(COLORS[words["color"]], dtype=torch.float32) / 255
    bg = torch.tensor(COLORS[words["background"]], dtype=torch.float32) / 255
    d = fg - bg
    cover = (((frames - bg) @ d) / (d @ d)).clamp(0, 1)  # [F, H, W]
    ys = torch.arange(frames.shape[1], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(frames.shape[2], dtype=torch.float32).view(1, 1, -1)
    mass = cover.sum((1, 2)).clamp(min=1e-6)
    cent = torch.stack([(cover * xs).sum((1, 2)) / mass, (cover * ys).sum((1, 2)) / mass], dim=1)  # [F, 2]
    along = torch.tensor(DIRECTIONS[words["direction"]], dtype=torch.float32)
    across = along.flip(0)
    t = torch.arange(len(cent), dtype=torch.float32)
    t = t - t.mean()

    def slope(v: torch.Tensor) -> float:
        return float((t * (v - v.mean())).sum() / (t * t).sum()) if len(v) > 1 else 0.0

    return {"centroids": cent.numpy(), "speed": slope(cent @ along), "drift": slope(cent @ across)}

