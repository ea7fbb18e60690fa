"""Synthetic DiT-like attention inputs: smooth spatiotemporal features with Wan's 3-D RoPE.

Benchmarks and tests need attention whose structure resembles a video DiT's — strong spatiotemporal
locality, heads of different kinds, input-dependent content — without a pretrained model. This module
builds ``q, k, v`` ``[B, H, F*H*W, D]`` (tokens flattened frame-major F→H→W) from three ingredients:

* **Content**: a smooth random field on the latent grid (a sum of low-frequency plane waves), projected
  per head. Nearby tokens carry similar features, so content attention is itself local and smooth,
  and ``v`` varies smoothly — which is what makes dropping far-away blocks cheap in real models.
* **Position**: a per-head vector added to ``q`` and ``k`` before RoPE. After the rotation its
  contribution to ``q_i . k_j`` is ``sum_p |c_p|^2 cos(theta_p * delta)``, a kernel that peaks at zero
  offset, so the head's emphasis on the t / h / w sections of the head dim sets its kind:

  - ``"local"``: all three axes — a 3-D neighbourhood;
  - ``"spatial"``: time section only — the whole current frame (block-diagonal in F-major order);
  - ``"temporal"``: h and w sections only — the same place in every frame (stripes in F-major order);
  - ``"global"``: no positional term — content only, diffuse.

* **RoPE** exactly as Wan applies it: the head dim splits into ``D - 4*(D//6)`` channels for time and
  ``2*(D//6)`` each for height and width; adjacent channel pairs rotate by ``pos * theta**(-2i/d_axis)``.

``time`` shifts the phases of the content waves slowly, standing in for a later denoising step (the
pattern drifts but stays similar, as AdaSpa observes in real models).

>>> q, k, v = synthetic_qkv((2, 4, 4), heads=2, head_dim=32)
>>> tuple(q.shape)
(1, 2, 32, 32)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["HEAD_KINDS", "rope_sections", "apply_rope_3d", "smooth_field", "synthetic_qkv"]

HEAD_KINDS = ("local", "spatial", "temporal", "global")

# Share of the positional energy in the (t, h, w) RoPE sections in the positional term, per head kind.
_AXIS_WEIGHTS = {
    "local": (1 / 3, 1 / 3, 1 / 3),
    "spatial": (1.0, 0.0, 0.0),
    "temporal": (0.0, 0.5, 0.5),
    "global": (0.0, 0.0, 0.0),
}


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim rotated by time, height and width positions (Wan's split)."""
    if head_dim % 2 or head_dim < 12:
        raise ValueError(f"head_dim must be even and >= 12 for a 3-D RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _grid_positions(grid: Sequence[int], device: torch.device) -> torch.Tensor:
    f, h, w = grid
    t = torch.arange(f, device=device).view(f, 1, 1).expand(f, h, w)
    y = torch.arange(h, device=device).view(1, h, 1).expand(f, h, w)
    x = torch.arange(w, device=device).view(1, 1, w).expand(f, h, w)
    return torch.stack([t, y, x], -1).reshape(-1, 3).float()  # [N, 3], frame-major


def apply_rope_3d(x: torch.Tensor, grid: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``[..., N, D]`` by their token's (t, h, w) position, as Wan does."""
    n, d = x.shape[-2], x.shape[-1]
    if n != math.prod(grid):
        raise ValueError(f"x has {n} tokens but grid {tuple(grid)} has {math.prod(grid)}")
    pos = _grid_positions(grid, x.device)
    angles = []
    for axis, dim in enumerate(rope_sections(d)):
        inv = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float64) / dim)
        angles.append(pos[:, axis, None].double() * inv)  # [N, dim/2]
    ang = torch.cat(angles, -1)
    cos, sin = torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)
    xf = x.float().reshape(*x.shape[:-1], d // 2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1)
    return out.reshape(x.shape).to(x.dtype)


def smooth_field(
    grid: Sequence[int],
    channels: int,
    generator: torch.Generator,
    num_waves: int = 32,
    max_cycles: tuple[float, float, float] = (1.0, 2.0, 2.0),
    time: float = 0.0,
) -> torch.Tensor:
    """A smooth random field ``[N, channels]`` on the grid: low-frequency plane waves, unit variance.

    ``max_cycles`` bounds how many periods a wave makes across the grid along (t, h, w); amplitudes
    fall off with frequency so coarse structure dominates. ``time`` advances every wave's phase at
    its own random speed (about one radian per unit).
    """
    pos = _grid_positions(grid, torch.device("cpu"))
    extent = torch.tensor([max(s, 1) for s in grid], dtype=torch.float32)
    cyc = (torch.rand(num_waves, 3, generator=generator) * 2 - 1) * torch.tensor(max_cycles)
    phase = torch.rand(num_waves, generator=generator) * 2 * math.pi
    speed = torch.randn(num_waves, generator=generator)
    amp = torch.randn(num_waves, channels, generator=generator)
    amp = amp / (1.0 + cyc.norm(dim=-1, keepdim=True))
    arg = 2 * math.pi * (pos / extent) @ cyc.T + phase + speed * time  # [N, waves]
    field = torch.cos(arg) @ amp
    field = field - field.mean(0, keepdim=True)
    return field / field.std(0, keepdim=True).clamp_min(1e-6)


def synthetic_qkv(
    grid: Sequence[int] = (8, 24, 32),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    *,
    seed: int = 0,
    time: float = 0.0,
    kinds: Sequence[str] | None = None,
    channels: int = 32,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiT-like ``q, k, v`` ``[B, H, F*H*W, D]`` on the latent ``grid`` (F, H, W).

    Args:
        grid: latent grid (frames, height, width); tokens are flattened frame-major.
        batch, heads, head_dim: output sizes. Batch entries get different content fields; heads share
            nothing but the field.
        seed: fixes everything; the same seed with a different ``time`` gives a drifted version.
        time: phase shift of the content field (0.1 is a small drift, 1.0 a large one).
        kinds: head kinds from :data:`HEAD_KINDS`, cycled over heads; default cycles all four.
        channels: width of the content field.
        noise: std of per-token noise added to q, k, v content (relative to unit-variance features).

    Per head, the positional kernel's peak logit is drawn from [3, 7] and a token's content logit with
    itself from [1.5, 3] ([3, 5] for global heads), which gives attention entropies of a few nats, as
    in DiT heads: sharp but not one-hot.
    """
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive sizes (F, H, W), got {grid!r}")
    kinds = tuple(kinds) if kinds is not None else HEAD_KINDS
    bad = [kd for kd in kinds if kd not in _AXIS_WEIGHTS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty list from {HEAD_KINDS}, got {list(kinds)!r}")
    grid = tuple(int(g) for g in grid)
    n = math.prod(grid)
    scale = head_dim**-0.5
    sections = rope_sections(head_dim)
    gen = torch.Generator().manual_seed(seed)

    head_q, head_k, head_v, head_pos = [], [], [], []
    for hd in range(heads):
        kind = kinds[hd % len(kinds)]
        wq = torch.randn(channels, head_dim, generator=gen) / math.sqrt(channels)
        # Keys see a slightly different projection than queries, as trained heads do.
        wk = wq + 0.5 * torch.randn(channels, head_dim, generator=gen) / math.sqrt(channels)
        wv = torch.randn(channels, head_dim, generator=gen) / math.sqrt(channels)
        lo, hi = (4.0, 6.0) if kind == "global" else (2.0, 4.0)
        content = lo + (hi - lo) * float(torch.rand((), generator=gen))
        sharp = 6.0 + 6.0 * float(torch.rand((), generator=gen))
        # Positional vector: in each RoPE section, energy per channel pair proportional to the pair's
        # frequency (slow pairs barely change across the grid; trained heads put their positional
        # energy where it discriminates), random directions, sized so that
        # scale * |c_section|^2 = sharpness * axis weight.
        pos = torch.zeros(head_dim)
        start = 0
        for dim, weight in zip(sections, _AXIS_WEIGHTS[kind]):
            if weight > 0:
                freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
                energy = sharp * weight / scale * freq / freq.sum()
                angle = torch.rand(dim // 2, generator=gen) * 2 * math.pi
                pair = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * energy.sqrt()[:, None]
                pos[start : start + dim] = pair.flatten()
            start += dim
        # A token's content logit with itself is about scale * D * g^2 = content for g below.
        g = math.sqrt(content * scale)
        head_q.append(wq * g)
        head_k.append(wk * g)
        head_v.append(wv)
        head_pos.append(pos)
    wq, wk, wv = torch.stack(head_q), torch.stack(head_k), torch.stack(head_v)  # [H, C, D]
    pos = torch.stack(head_pos)[:, None, :]  # [H, 1, D]

    qs, ks, vs = [], [], []
    for b in range(batch):
        fgen = torch.Generator().manual_seed(seed * 1000003 + 7919 * (b + 1))
        field = smooth_field(grid, channels, fgen, time=time)  # [N, C]
        tok = torch.Generator().manual_seed(seed * 1000003 + 104729 * (b + 1))
        nq = noise * torch.randn(heads, n, channels, generator=tok)
        nk = noise * torch.randn(heads, n, channels, generator=tok)
        nv = noise * torch.randn(heads, n, channels, generator=tok)
        q = torch.einsum("hnc,hcd->hnd", field + nq, wq) + pos
        k = torch.einsum("hnc,hcd->hnd", field + nk, wk) + pos
        v = torch.einsum("hnc,hcd->hnd", field + nv, wv)
        qs.append(apply_rope_3d(q, grid))
        ks.append(apply_rope_3d(k, grid))
        vs.append(v)
    out = [torch.stack(t).to(device=device, dtype=dtype) for t in (qs, ks, vs)]
    return out[0], out[1], out[2]
