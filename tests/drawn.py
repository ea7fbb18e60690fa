"""Read back what a drawing shows: the image panels of a saved figure and the cells of a drawn mask.

A drawing test decodes the written PNG and compares the mask it shows with the planner's, so a
drawing of the wrong mask (or of nothing) fails, not only a missing file.
"""

from __future__ import annotations

import numpy as np
import torch


def read_png(path) -> np.ndarray:
    """``[H, W, 3]`` floats in [0, 1]; fails unless ``path`` is a PNG."""
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return matplotlib.image.imread(str(path))[..., :3]


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of every run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _longest_run(flags: np.ndarray) -> int:
    return max((b - a for a, b in _runs(flags)), default=0)


def panels(img: np.ndarray, min_side: int = 40) -> list[np.ndarray]:
    """The drawn images of a one-row figure, left to right: the pixels inside each axes frame.

    An image's columns hold a run of ink at least ``min_side`` pixels tall, unlike the columns of the
    titles' glyphs; within those columns the image's rows are the longest run of rows that are
    (almost) all ink.
    """
    ink = img.min(axis=-1) < 0.95
    cols = np.array([_longest_run(ink[:, j]) >= min_side for j in range(ink.shape[1])])
    out = []
    for c0, c1 in _runs(cols):
        if c1 - c0 < min_side:
            continue
        rows = ink[:, c0:c1].mean(axis=1) > 0.9
        r0, r1 = max(_runs(rows), key=lambda r: r[1] - r[0])
        out.append(img[r0:r1, c0:c1])
    return out


def cells(panel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[M, K, 3]``: the colour at the centre of each cell of an ``M x K`` image drawn in ``panel``."""
    m, k = shape
    h, w = panel.shape[:2]
    ys = ((np.arange(m) + 0.5) * h / m).astype(int)
    xs = ((np.arange(k) + 0.5) * w / k).astype(int)
    return panel[ys][:, xs]


def drawn_mask(panel: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """The boolean mask a ``save_masks`` panel shows (kept cells are drawn light, dropped ones dark)."""
    return torch.from_numpy(cells(panel, shape).mean(axis=-1) > 0.5)
