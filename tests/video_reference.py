"""Video metrics written out by definition, independent of :mod:`diffattn.pipelines.metrics`."""

from __future__ import annotations

import math

import numpy as np


def psnr_reference(x, y) -> float:
    """``10 log10(1 / MSE)`` over every pixel, frame and channel (data range 1)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim_loop(x, y, window=11, sigma=1.5):
    """SSIM by explicit windows: an independent reference for the convolution version."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for f in range(x.shape[0]):
        for c in range(x.shape[3]):
            for i in range(x.shape[1] - window + 1):
                for j in range(x.shape[2] - window + 1):
                    a = x[f, i : i + window, j : j + window, c]
                    b = y[f, i : i + window, j : j + window, c]
                    ma, mb = (w * a).sum(), (w * b).sum()
                    va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                    cov = (w * (a - ma) * (b - mb)).sum()
                    vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))
