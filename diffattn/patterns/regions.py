"""Subject regions for IR-Diffusion (:mod:`diffattn.processors.ir`): boxes and masks rasterised on a
layer's grid, the target's label map, reposition (crop a reference subject into the target's box) and
the keys each target query may attend to. Pure PyTorch on small tensors; nothing here knows diffusers.

Regions are given per subject as a normalised ``(x0, y0, x1, y1)`` box or a mask (any resolution) for
the target and for the reference images. On a layer's ``h x w`` grid a cell belongs to a box when the
cell centre lies inside it (``[x0, x1) x [y0, y1)``); along an axis where the box covers no centre it
keeps the cell under the box's centre. A mask is area-resized to the grid and thresholded at 0.5 (if
nothing survives, its strongest cell is kept). Where target regions overlap, the cell goes to the
*larger* region (areas counted in cells of the grid; equal areas: the later subject), the rule of the
official mask post-processing (``post_process_sam_mask`` with its no-overlap step: masks visited from
small to large, each losing what any other still covers). ``IRConfig(overlap="smaller")`` gives it to
the smaller region instead, so a small subject in front of a large one is not swallowed.

>>> import torch
>>> from diffattn.patterns.regions import box_cells, reposition
>>> box_cells((0.25, 0.0, 0.75, 0.5), 4, 4)        # rows [0, 2), cols [1, 3)
(0, 2, 1, 3)
>>> x = torch.zeros(1, 1, 4, 4); x[..., 0:2, 0:2] = 1.0
>>> reposition(x, (0, 2, 0, 2), (2, 4, 2, 4))[0, 0]
tensor([[0., 0., 0., 0.],
        [0., 0., 0., 0.],
        [0., 0., 1., 1.],
        [0., 0., 1., 1.]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "IRRegions",
    "RegionPlan",
    "box_cells",
    "check_box",
    "ir_allowed_mask",
    "label_map",
    "plan_regions",
    "region_cells",
    "region_mask",
    "reposition",
]


def check_box(box: Any, name: str) -> tuple[float, float, float, float]:
    """Validate a normalised ``(x0, y0, x1, y1)`` box; return it as floats."""
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    if not isinstance(box, (tuple, list)) or len(box) != 4:
        raise ValueError(f"{name}={box!r} must be 4 numbers (x0, y0, x1, y1), normalised to [0, 1]")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={box!r} must contain numbers (x0, y0, x1, y1)") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(
            f"{name}={box!r} lies outside [0, 1]; give normalised coordinates (pixel / image size)"
        )
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{name}={box!r} is empty; need x0 < x1 and y0 < y1 (xyxy order)")
    return (x0, y0, x1, y1)


def _check_mask(mask: Any, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a box (4 numbers) or a mask tensor [H, W], got {type(mask).__name__}"
        )
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a mask [H, W] (or [1, H, W]), got shape {tuple(mask.shape)}")
    mask = mask.detach().float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{name} must hold values in [0, 1] (bool or float mask)")
    if mask.max() <= 0:
        raise ValueError(f"{name} is empty (all zero); give a mask that covers the subject")
    return mask


def _check_region(region: Any, name: str) -> tuple | torch.Tensor:
    if isinstance(region, torch.Tensor) and region.ndim >= 2:
        return _check_mask(region, name)
    return check_box(region, name)


@dataclass
class IRRegions:
    """Subject regions: one box or mask per subject in the target and in the reference images.

    Attributes:
        target: per subject, a normalised ``(x0, y0, x1, y1)`` box or a mask ``[H, W]`` in [0, 1] on the
            target image.
        reference: per subject, its region in its own reference image (same forms).
    """

    target: list
    reference: list

    def __post_init__(self) -> None:
        if not isinstance(self.target, (list, tuple)) or not isinstance(self.reference, (list, tuple)):
            raise TypeError("IRRegions.target and .reference must be lists (one region per subject)")
        if len(self.target) == 0:
            raise ValueError("IRRegions needs at least one subject")
        if len(self.target) != len(self.reference):
            raise ValueError(
                f"IRRegions has {len(self.target)} target regions but {len(self.reference)} reference "
                "regions; give one of each per subject"
            )
        self.target = [_check_region(r, f"target region {i}") for i, r in enumerate(self.target)]
        self.reference = [_check_region(r, f"reference region {i}") for i, r in enumerate(self.reference)]

    @property
    def num_subjects(self) -> int:
        return len(self.target)


def box_cells(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """Cells ``(r0, r1, c0, c1)`` (half-open) of an ``h x w`` grid whose centres lie in ``box``.

    ``box`` is normalised ``(x0, y0, x1, y1)``. Along an axis where the box covers no cell centre it
    keeps the cell under the box's centre, so every subject has at least one cell on every grid.
    """
    x0, y0, x1, y1 = box

    def span(a: float, b: float, n: int) -> tuple[int, int]:
        lo, hi = math.ceil(a * n - 0.5), math.ceil(b * n - 0.5)
        lo, hi = max(lo, 0), min(hi, n)
        if hi <= lo:
            c = min(int((a + b) / 2 * n), n - 1)
            lo, hi = c, c + 1
        return lo, hi

    r0, r1 = span(y0, y1, h)
    c0, c1 = span(x0, x1, w)
    return r0, r1, c0, c1


def region_mask(region: tuple | torch.Tensor, h: int, w: int, device=None) -> torch.Tensor:
    """Bool ``[h, w]``: the region rasterised on an ``h x w`` grid (rules in the module docstring)."""
    out = torch.zeros(h, w, dtype=torch.bool, device=device)
    if isinstance(region, torch.Tensor):
        soft = F.interpolate(region[None, None].float(), size=(h, w), mode="area")[0, 0].to(device)
        out = soft >= 0.5
        if not out.any():
            out.view(-1)[soft.argmax()] = True
        return out
    r0, r1, c0, c1 = box_cells(region, h, w)
    out[r0:r1, c0:c1] = True
    return out


def region_cells(region: tuple | torch.Tensor, h: int, w: int) -> tuple[int, int, int, int]:
    """The region's box on the grid, ``(r0, r1, c0, c1)`` half-open (a mask's bounding box)."""
    if isinstance(region, torch.Tensor):
        m = region_mask(region, h, w)
        rows = torch.nonzero(m.any(1)).flatten()
        cols = torch.nonzero(m.any(0)).flatten()
        return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return box_cells(region, h, w)


def label_map(
    regions: Sequence[tuple | torch.Tensor], h: int, w: int, device=None, overlap: str = "larger"
) -> torch.Tensor:
    """Long ``[h*w]``: subject index per cell, -1 for background.

    Overlapping cells go to the ``"larger"`` or ``"smaller"`` region (areas in grid cells); on equal
    areas the later subject wins.
    """
    if overlap not in ("larger", "smaller"):
        raise ValueError(f"overlap must be 'larger' or 'smaller', got {overlap!r}")
    masks = [region_mask(r, h, w, device) for r in regions]
    areas = [int(m.sum()) for m in masks]
    labels = torch.full((h, w), -1, dtype=torch.long, device=device)
    sign = 1 if overlap == "larger" else -1
    # The region painted last owns the cell; a stable sort paints equal areas in list order.
    for i in sorted(range(len(masks)), key=lambda i: sign * areas[i]):
        labels[masks[i]] = i
    return labels.flatten()


def reposition(
    x: torch.Tensor,
    src: tuple[int, int, int, int],
    dst: tuple[int, int, int, int],
    mode: str = "nearest",
) -> torch.Tensor:
    """Crop ``x[..., src]`` and resize it into ``dst`` of a zero tensor of the same shape.

    Args:
        x: ``[B, C, h, w]`` features on the layer's grid.
        src, dst: cell boxes ``(r0, r1, c0, c1)`` (half-open), e.g. from :func:`region_cells`.
        mode: ``"nearest"`` (the official choice), ``"nearest-exact"`` (centre to centre) or ``"bilinear"``.
    Returns:
        ``[B, C, h, w]``: the resized crop inside ``dst``, zeros elsewhere.
    """
    r0, r1, c0, c1 = src
    t0, t1, u0, u1 = dst
    crop = x[:, :, r0:r1, c0:c1]
    size = (t1 - t0, u1 - u0)
    if crop.shape[-2:] != size:
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        crop = F.interpolate(crop.float(), size=size, mode=mode, **kwargs).to(x.dtype)
    out = torch.zeros_like(x)
    out[:, :, t0:t1, u0:u1] = crop
    return out


def ir_allowed_mask(
    labels: torch.Tensor,
    ref_allowed: torch.Tensor | None,
    isolation: bool,
) -> torch.Tensor:
    """Which keys each target query may attend to.

    Args:
        labels: long ``[N]``, subject of each target cell (-1 = background).
        ref_allowed: bool ``[n, N]``, the usable keys of each reference (after reposition), or
            ``None`` for no reference attention.
        isolation: mask target keys of other subjects.
    Returns:
        bool ``[N, (n+1)*N]`` with key order ``[ref_0, ..., ref_{n-1}, target]`` (``[N, N]`` without
        references); True = may attend.
    """
    lq = labels[:, None]
    lk = labels[None, :]
    if isolation:
        own = (lq < 0) | (lk < 0) | (lq == lk)
    else:
        own = torch.ones(labels.numel(), labels.numel(), dtype=torch.bool, device=labels.device)
    if ref_allowed is None:
        return own
    n = ref_allowed.shape[0]
    subjects = torch.arange(n, device=labels.device)
    # [N, n, N]: query of subject i reads reference i's allowed keys only.
    ref = (labels[:, None, None] == subjects[None, :, None]) & ref_allowed[None]
    return torch.cat([ref.flatten(1), own], dim=1)


@dataclass
class RegionPlan:
    """The tensors of one IR setup on one layer grid.

    Attributes:
        labels: long ``[N]``, target subject per cell (-1 background).
        ref_allowed: bool ``[n, N]``, usable keys of each reference.
        src, dst: per subject, the reference and target cell boxes used by reposition.
        allowed_iso: bool ``[N, N]``, target-only attention with isolation.
        allowed_ref: bool ``[N, (n+1)N]``, reference + target attention.
    """

    labels: torch.Tensor
    ref_allowed: torch.Tensor
    src: list
    dst: list
    allowed_iso: torch.Tensor
    allowed_ref: torch.Tensor


def plan_regions(
    regions: IRRegions, h: int, w: int, device=None, *, overlap: str = "larger", move: bool = True,
    interpolation: str = "nearest", isolation: bool = True,
) -> RegionPlan:
    """:class:`RegionPlan` of ``regions`` on an ``h x w`` grid.

    ``move``: the references are repositioned into the target boxes (with ``interpolation``), and
    their usable keys move with them; ``isolation``: target queries of a subject do not see target
    keys of other subjects; ``overlap``: see :func:`label_map`.
    """
    labels = label_map(regions.target, h, w, device, overlap)
    src = [region_cells(r, h, w) for r in regions.reference]
    dst = [region_cells(r, h, w) for r in regions.target]
    ref_allowed = []
    for i in range(regions.num_subjects):
        ref_mask = region_mask(regions.reference[i], h, w, device)
        if move:
            # The subject's reference cells, carried into the target box by the same resampling.
            moved = reposition(ref_mask[None, None].float(), src[i], dst[i], interpolation)[0, 0]
            ref_mask = moved >= 0.5
            if not ref_mask.any():
                t0, t1, u0, u1 = dst[i]
                ref_mask[t0:t1, u0:u1] = True
        ref_allowed.append(ref_mask.flatten())
    ref_allowed_t = torch.stack(ref_allowed)
    return RegionPlan(
        labels=labels,
        ref_allowed=ref_allowed_t,
        src=src,
        dst=dst,
        allowed_iso=ir_allowed_mask(labels, None, isolation),
        allowed_ref=ir_allowed_mask(labels, ref_allowed_t, isolation),
    )
