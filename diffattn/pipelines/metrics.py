"""Video quality against a reference (the dense video): PSNR, SSIM, and LPIPS when available offline.

Videos are float arrays ``[F, H, W, C]`` in [0, 1] (what pipelines return with ``output_type="np"``);
metrics are computed on those floats, before any mp4 compression.

* PSNR over the whole video: ``10 log10(1 / MSE)``; identical videos give ``inf``.
* SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
  over the valid window positions of each frame and channel, averaged — the usual definition.
* LPIPS (AlexNet) only if the ``lpips`` package and the AlexNet weights are already on disk; this
  module never downloads anything. :func:`lpips_status` says why it is unavailable.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "lpips_status", "lpips_distance", "video_metrics"]


def _as_tensor(video: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name} must be [F, H, W, C] (or [H, W, C]), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    return t.to(torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_tensor(a, "video"), _as_tensor(b, "reference")
    if x.shape != y.shape:
        raise ValueError(f"video shape {tuple(x.shape)} differs from reference shape {tuple(y.shape)}")
    return x, y


def psnr(video, reference, data_range: float = 1.0) -> float:
    """PSNR in dB of ``video`` against ``reference`` (both ``[F, H, W, C]``); ``inf`` if identical."""
    x, y = _pair(video, reference)
    mse = float((x - y).pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(video, reference, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of ``video`` against ``reference`` (``[F, H, W, C]``), frames at least ``window`` px."""
    x, y = _pair(video, reference)
    f, h, w, c = x.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs frames of at least {window}x{window} px, got {h}x{w}")
    x = x.permute(0, 3, 1, 2).reshape(f * c, 1, h, w)
    y = y.permute(0, 3, 1, 2).reshape(f * c, 1, h, w)
    k = _gaussian_window(window, sigma)[None, None]
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    var_x = F.conv2d(x * x, k) - mu_x**2
    var_y = F.conv2d(y * y, k) - mu_y**2
    cov = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


@lru_cache(maxsize=1)
def lpips_status() -> str | None:
    """``None`` if LPIPS can run offline, else the reason it cannot (nothing is downloaded)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the lpips package is not installed"
    hub = torch.hub.get_dir()
    ckpt = os.path.join(hub, "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.isfile(ckpt):
        return f"the AlexNet weights are not on disk ({ckpt})"
    return None


@lru_cache(maxsize=1)
def _lpips_model():
    import lpips

    return lpips.LPIPS(net="alex", verbose=False).eval()


def lpips_distance(video, reference) -> float | None:
    """Mean LPIPS (AlexNet) over frames, or ``None`` when :func:`lpips_status` reports a reason."""
    if lpips_status() is not None:
        return None
    x, y = _pair(video, reference)
    model = _lpips_model()
    with torch.no_grad():
        a = x.permute(0, 3, 1, 2).float() * 2 - 1
        b = y.permute(0, 3, 1, 2).float() * 2 - 1
        return float(model(a, b).mean())


def video_metrics(video, reference) -> dict[str, Any]:
    """``{"psnr", "ssim", "lpips"}`` of ``video`` against ``reference``; LPIPS may be ``None``."""
    return {"psnr": psnr(video, reference), "ssim": ssim(video, reference), "lpips": lpips_distance(video, reference)}
