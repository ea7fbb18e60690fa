"""Drawing masks: block-mask and token-mask heatmaps shared by every planner's ``--out`` command line.

matplotlib is imported lazily with the ``Agg`` backend, so planners stay importable (and runnable on
machines without a display) when nobody draws.

>>> import torch, tempfile, os
>>> mask = torch.eye(8, dtype=torch.bool)
>>> path = os.path.join(tempfile.mkdtemp(), "eye.png")
>>> save_masks([("identity", mask)], path)
>>> os.path.exists(path)
True
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["save_masks", "save_figure", "mask_summary"]


def _pyplot():
    from .._extras import need

    matplotlib = need("matplotlib", "plot")

    # A file-only backend: drawing must work headless and must not steal an interactive session.
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | os.PathLike, dpi: int = 150) -> None:
    """Save and close ``fig``; the saved area is grown to every title and label (tight_layout alone
    clips two-line titles above images)."""
    plt = _pyplot()
    try:
        fig.tight_layout()
        fig.savefig(os.fspath(out), dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)


def mask_summary(mask: torch.Tensor) -> str:
    """``"M x K, density 0.123"`` for a 2-D boolean mask (used in titles)."""
    m = _as_2d(mask, "mask")
    return f"{m.shape[0]}x{m.shape[1]}, density {float(m.float().mean()):.3f}"


def save_masks(
    panels: Sequence[tuple[str, torch.Tensor]],
    out: str | os.PathLike,
    lines: Sequence[int] | None = None,
    dpi: int = 150,
    max_side: int = 2048,
    max_columns: int = 4,
) -> None:
    """Draw boolean masks side by side as heatmaps (kept = light) and save them to ``out``.

    Args:
        panels: ``(title, mask)`` pairs; each mask is bool ``[M, K]`` (or ``[1, 1, M, K]``).
        out: image path (format from the suffix, e.g. ``.png``, ``.pdf``).
        lines: optional positions (in the first panel's units) where thin separators are drawn, e.g.
            frame boundaries; scaled to each panel's size.
        dpi: resolution of the saved figure.
        max_side: masks larger than this are average-pooled down before drawing (a pixel's shade is
            the fraction of kept cells it covers), so large token masks stay drawable.
        max_columns: panels per row; more panels wrap onto further rows.
    """
    if not panels:
        raise ValueError("panels is empty; pass at least one (title, mask) pair")
    plt = _pyplot()
    cols = min(len(panels), max_columns)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    ref = _as_2d(panels[0][1], "panels[0]").shape[0]
    for ax, (title, mask) in zip(axes.flat, panels):
        m = _as_2d(mask, title)
        shown = _pool(m, max_side)
        ax.imshow(shown.numpy(), cmap="magma", interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_title(f"{title}\n{mask_summary(m)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if lines:
            scale = shown.shape[0] / ref
            for p in lines:
                ax.axhline(p * scale - 0.5, color="tab:cyan", lw=0.3)
                ax.axvline(p * scale - 0.5, color="tab:cyan", lw=0.3)
    save_figure(fig, out, dpi)


def _as_2d(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    m = mask.detach().cpu()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask (or [1, 1, M, K]), got shape {tuple(mask.shape)}")
    return m


def _pool(m: torch.Tensor, max_side: int) -> torch.Tensor:
    """Fraction of kept cells per pixel when the mask is larger than ``max_side``, else the mask."""
    f = m.float()
    k = max(1, -(-max(m.shape) // max_side))
    if k == 1:
        return f
    return torch.nn.functional.avg_pool2d(f[None, None], k, ceil_mode=True)[0, 0].clamp_max(1.0)
