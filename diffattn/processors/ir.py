"""IR-Diffusion: isolation and reposition attention for multi-subject consistency.

Paper: "Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and
Reposition Attention" (2024); official code: hehuiguo/DreamStory (``DreamStoryScaledAttnProcessor``).

One UNet batch holds, per classifier-free-guidance half, ``[reference_0, ..., reference_{n-1}, target]``:
one reference image per subject (each with its own prompt) and the target image (combined prompt).
The processor changes only the *target's* self-attention; references attend to themselves as usual.

- **Reference attention.** The target's queries also see keys/values of the references: keys are
  ``[ref_0 (N), ..., ref_{n-1} (N), target (N)]`` per CFG half.
- **Reposition attention.** Before the K/V projection each reference's hidden states (on the layer's
  2-D grid) are cropped to the reference subject's box and resized into the target subject's box, zeros
  elsewhere, so reference positions line up with target positions.
- **Isolation attention.** A target query in subject region ``i``

  * never attends to target keys in subject region ``j != i`` (background target keys stay
    visible, as in the official code),
  * uses reference keys of subject ``i`` only, and only those inside the (repositioned) subject region.

  A *background* target query (in no subject region) attends to every target key and to no reference
  key, as in the official code (its reference columns are masked by the query-side spatial mask).
- **Mutual cross-attention** (official run, from DreamStory): in subject region ``i`` the target's
  cross-attention output is blended with its queries attending to reference ``i``'s prompt.

Regions are given per subject as a normalised ``(x0, y0, x1, y1)`` box or a mask (any resolution) for
the target and for the reference images. On a layer's ``h x w`` grid a cell belongs to a box when the
cell centre lies inside it (``[x0, x1) x [y0, y1)``); along an axis where the box covers no centre it
keeps the cell under the box's centre. A mask is area-resized to the grid and thresholded at 0.5 (if
nothing survives, its strongest cell is kept). Where target regions overlap, the cell goes to the
*larger* region (areas counted in cells of the grid; equal areas: the later subject), the rule of the
official mask post-processing (``post_process_sam_mask`` with its no-overlap step: masks visited from
small to large, each losing what any other still covers). ``IRConfig(overlap="smaller")`` gives it to
the smaller region instead, so a small subject in front of a large one is not swallowed.

Isolation and reference attention leave the *ratios* of the remaining attention probabilities
unchanged: with ``P`` the softmax of the same scores over all concatenated keys with no mask, the
isolated probabilities are ``P[q, k] / sum_{k' allowed} P[q, k']`` on allowed keys and exactly 0 elsewhere.

>>> import torch
>>> from diffattn.processors.ir import box_cells, reposition
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
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence, Union

import torch
import torch.nn.functional as F

from ..methods.base import MethodConfig

__all__ = [
    "IRConfig",
    "IRRegions",
    "IRPlan",
    "IRState",
    "IRAttnProcessor",
    "IRCrossAttnProcessor",
    "SubjectMapProcessor",
    "IRAttention",
    "box_cells",
    "region_cells",
    "region_mask",
    "label_map",
    "reposition",
    "ir_allowed_mask",
    "self_attention_layers",
    "layer_grid",
    "check_box",
]

# The official SDXL setting starts reference attention at self-attention layer 36 of 70.
_OFFICIAL_START_LAYER = 36
_OFFICIAL_NUM_LAYERS = 70

Region = Union[tuple, list, torch.Tensor]


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IRConfig(MethodConfig):
    """What IR-Diffusion computes (official defaults: playground-v2.5 / SDXL, 50 steps, CFG 7).

    Attributes:
        isolation: Isolation attention in the target: queries of subject ``i`` do not see target keys
            of other subjects (default True). Reference keys are always subject-restricted (a query of
            subject ``i`` reads reference ``i`` only; background reads none), as the official
            spatial self-attention mask.
        isolate_every_layer: Apply isolation in every self-attention layer and step, not only where
            reference attention runs (default True, as the official ``is_isolate_sa``).
        reference_attention: Let target queries attend to reference keys/values (default True).
        reposition: Crop each reference subject to its box and resize it into the target subject's box
            before the K/V projection (default True, official ``is_rescale_self_attn``).
        start_layer: First self-attention layer (forward order, 0-based) with reference attention.
            ``None`` = 36 on a 70-layer SDXL UNet, scaled to other depths (8 of 16 on SD 1.x).
        start_step: First denoising step with reference attention (default 0).
        end_step: Step at which reference attention stops (exclusive); ``None`` = never (default).
        interpolation: Resampling used by reposition. ``"nearest"`` (default) is the official choice
            (PyTorch's legacy nearest: source index ``floor(dst * in / out)``); ``"nearest-exact"`` maps
            cell centres to cell centres (symmetric: a box moved into one of the same size shifted by
            half a cell is not skewed towards its top-left); ``"bilinear"``.
        overlap: which target region gets a cell where regions overlap: ``"larger"`` (default, the
            official mask post-processing) or ``"smaller"`` (a small subject in front of a large one
            keeps its cells).
        reference_dropout: Fraction of target subject queries that skip the references, redrawn at
            every step (per grid); trades some consistency for variety (default 0.5, the official
            run's ``dropout``; 0 = every subject query reads its reference).
        seed: Seed of the dropout draws (same seed and step give the same draw on any device).
        mutual_cross_attention: Weight ``lam`` of the mutual cross-attention in the target's subject
            regions: there the cross-attention output becomes ``(1 - lam) * own + lam * mutual_i``,
            ``mutual_i`` being the target's queries attending to reference ``i``'s prompt (every
            layer and step). Default 0.9, the official run's setting (its DreamStory heritage);
            0 = off, leaving cross-attention untouched.
    """

    method: ClassVar[str] = "ir"

    isolation: bool = True
    isolate_every_layer: bool = True
    reference_attention: bool = True
    reposition: bool = True
    start_layer: int | None = None
    start_step: int = 0
    end_step: int | None = None
    interpolation: Literal["nearest", "nearest-exact", "bilinear"] = "nearest"
    overlap: Literal["larger", "smaller"] = "larger"
    reference_dropout: float = 0.5
    seed: int = 0
    mutual_cross_attention: float = 0.9

    def validate(self) -> None:
        if self.start_layer is not None and self.start_layer < 0:
            raise ValueError(f"IRConfig.start_layer={self.start_layer} must be >= 0 (or None for auto)")
        if not 0.0 <= self.reference_dropout < 1.0:
            raise ValueError(
                f"IRConfig.reference_dropout={self.reference_dropout} must be in [0, 1) (0 = off)"
            )
        if not 0.0 <= self.mutual_cross_attention <= 1.0:
            raise ValueError(
                f"IRConfig.mutual_cross_attention={self.mutual_cross_attention} must be in [0, 1] (0 = off)"
            )
        if self.start_step < 0:
            raise ValueError(f"IRConfig.start_step={self.start_step} must be >= 0")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(
                f"IRConfig.end_step={self.end_step} must be > start_step={self.start_step} (or None)"
            )

    def resolved_start_layer(self, num_layers: int) -> int:
        if self.start_layer is not None:
            return self.start_layer
        return int(round(_OFFICIAL_START_LAYER * num_layers / _OFFICIAL_NUM_LAYERS))


# --------------------------------------------------------------------------------------------- regions
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


# ------------------------------------------------------------------------------------------- model glue
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_order_key(name: str) -> tuple:
    head = name.split(".", 1)[0]
    return (_BLOCK_ORDER.get(head, 3), [int(t) for t in re.findall(r"\.(\d+)(?=\.|$)", name)], name)


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names of the UNet's self-attention modules (``attn1``) in forward order.

    ``unet.attn_processors`` lists modules in registration order (down, up, mid); the forward pass
    runs down, mid, up, which is the order layer indices (and ``start_layer``) refer to.
    """
    names = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    return sorted(names, key=_forward_order_key)


def layer_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` grid of a UNet layer with ``num_tokens`` tokens for latents of ``latent_hw``.

    UNet downsamplers (3x3, stride 2, padding 1) map a side ``s`` to ``ceil(s / 2)``.
    """
    h, w = latent_hw
    while h * w > num_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != num_tokens:
        raise ValueError(
            f"a self-attention layer has {num_tokens} tokens, which is no downsampled grid of the "
            f"latents {tuple(latent_hw)}; IR attention needs square-pixel UNet latents"
        )
    return h, w


@dataclass
class IRPlan:
    """Per-grid tensors of one IR setup (cached per ``(h, w)``, device).

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


def build_plan(regions: IRRegions, config: IRConfig, h: int, w: int, device) -> IRPlan:
    labels = label_map(regions.target, h, w, device, config.overlap)
    src = [region_cells(r, h, w) for r in regions.reference]
    dst = [region_cells(r, h, w) for r in regions.target]
    ref_allowed = []
    for i in range(regions.num_subjects):
        ref_mask = region_mask(regions.reference[i], h, w, device)
        if config.reposition:
            # The subject's reference cells, carried into the target box by the same resampling.
            moved = reposition(ref_mask[None, None].float(), src[i], dst[i], config.interpolation)[0, 0]
            ref_mask = moved >= 0.5
            if not ref_mask.any():
                t0, t1, u0, u1 = dst[i]
                ref_mask[t0:t1, u0:u1] = True
        ref_allowed.append(ref_mask.flatten())
    ref_allowed_t = torch.stack(ref_allowed)
    return IRPlan(
        labels=labels,
        ref_allowed=ref_allowed_t,
        src=src,
        dst=dst,
        allowed_iso=ir_allowed_mask(labels, None, config.isolation),
        allowed_ref=ir_allowed_mask(labels, ref_allowed_t, config.isolation),
    )


@dataclass
class IRState:
    """Mutable state shared by all IR processors of one UNet; :meth:`reset` before a new generation.

    Attributes:
        config: the :class:`IRConfig`.
        regions: subject regions (``None`` while only capturing subject maps).
        num_layers: number of self-attention layers.
        step: index of the current UNet call (one per denoising step; CFG is batched). A timestep
            larger than the previous call's starts a new generation at step 0.
        latent_hw: latent grid of the current call.
        capture: when True, processors record ``q``, keys, probabilities and masks in ``records``.
    """

    config: IRConfig
    regions: IRRegions | None = None
    num_layers: int = 1
    step: int = -1
    latent_hw: tuple[int, int] | None = None
    capture: bool = False
    records: list = field(default_factory=list)
    plans: dict = field(default_factory=dict)
    keeps: dict = field(default_factory=dict)
    subject_maps: dict = field(default_factory=dict)
    last_timestep: float | None = None

    def reset(self) -> None:
        self.step = -1
        self.latent_hw = None
        self.last_timestep = None
        self.records.clear()
        self.plans.clear()
        self.keeps.clear()
        self.subject_maps.clear()

    def on_unet_forward(self, sample: torch.Tensor, timestep: Any = None) -> None:
        t = None
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            t = float(timestep.flatten()[0])
        elif isinstance(timestep, (int, float)):
            t = float(timestep)
        # Denoising runs from high to low timesteps; going back up means a new generation began.
        if t is not None and self.last_timestep is not None and t > self.last_timestep:
            self.step = -1
        self.last_timestep = t
        self.step += 1
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def plan(self, h: int, w: int, device) -> IRPlan:
        key = (h, w, str(device))
        if key not in self.plans:
            self.plans[key] = build_plan(self.regions, self.config, h, w, device)
        return self.plans[key]

    def query_keep(self, h: int, w: int, device) -> torch.Tensor | None:
        """bool ``[N]``: target queries that read references at this step (``None`` = all).

        Drawn once per (step, grid), shared by the layers of that step, as the official code does.
        A subject whose queries would all be dropped keeps them all.
        """
        p = self.config.reference_dropout
        if p <= 0.0:
            return None
        key = (h, w, str(device))
        if self.keeps.get(key, (None,))[0] != self.step:
            labels = self.plan(h, w, device).labels
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step * 1009 + h * 31 + w)
            keep = (torch.rand(h * w, generator=g) >= p).to(device)
            for i in range(self.regions.num_subjects):
                own = labels == i
                if own.any() and not (keep & own).any():
                    keep = keep | own
            self.keeps[key] = (self.step, keep)
        return self.keeps[key][1]

    def reference_active(self, layer_index: int) -> bool:
        c = self.config
        if not c.reference_attention or layer_index < c.resolved_start_layer(self.num_layers):
            return False
        return self.step >= c.start_step and (c.end_step is None or self.step < c.end_step)


# ---------------------------------------------------------------------------------------- processors
def _attend(q, k, v, allowed, scale, want_probs):
    """Masked attention ``[B, H, Nq, D]``; with ``want_probs`` also the fp32 probabilities."""
    if not want_probs:
        mask = None if allowed is None or bool(allowed.all()) else allowed
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype), probs


class IRAttnProcessor:
    """Self-attention processor of one UNet ``attn1`` module with reference/isolation/reposition.

    The batch must be ``G`` groups of ``[ref_0, ..., ref_{n-1}, target]`` (``G = 2`` with CFG: the
    unconditional and conditional halves keep that order each). Reference rows get ordinary
    self-attention; the target row gets the IR attention described in the module docstring.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: IRState, layer_index: int, layer_name: str = "") -> None:
        self.state = state
        self.layer_index = layer_index
        self.layer_name = layer_name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"IRAttnProcessor on {self.layer_name!r} got encoder_hidden_states/attention_mask; "
                "install it on self-attention (attn1) modules only"
            )
        st = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        bsz, n_tok, _ = hidden_states.shape
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        k = split(attn.to_k(hidden_states))
        v = split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scale = attn.scale

        use_ref = st.regions is not None and st.reference_active(self.layer_index)
        use_iso = (
            st.regions is not None
            and st.config.isolation
            and (st.config.isolate_every_layer or use_ref)
        )
        if not (use_ref or use_iso):
            out, probs = _attend(q, k, v, None, scale, st.capture)
            if st.capture:
                self._record(q, k, probs, None, "plain")
        else:
            out = self._ir_attention(attn, hidden_states, q, k, v, scale, use_ref, use_iso, split)

        out = out.transpose(1, 2).reshape(bsz, n_tok, -1).to(q.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _ir_attention(self, attn, hidden_states, q, k, v, scale, use_ref, use_iso, split):
        st = self.state
        n = st.regions.num_subjects
        group = n + 1
        bsz, n_tok, channels = hidden_states.shape
        if bsz % group:
            raise ValueError(
                f"IR attention got a batch of {bsz} on {self.layer_name!r}, not a multiple of "
                f"{group} = {n} references + 1 target; the batch must be [refs..., target] per CFG half"
            )
        if st.latent_hw is None:
            raise RuntimeError("IR attention needs the latent size; install it with IRAttention")
        h, w = layer_grid(n_tok, st.latent_hw)
        plan = st.plan(h, w, q.device)
        rows = torch.arange(bsz, device=q.device).view(-1, group)
        tgt, refs = rows[:, -1], rows[:, :-1].flatten()
        ngroups = rows.shape[0]

        out = torch.empty_like(q)
        o_ref, p_ref = _attend(q[refs], k[refs], v[refs], None, scale, st.capture)
        out[refs] = o_ref
        q_t = q[tgt]
        if use_ref:
            ref_hs = hidden_states[refs].view(ngroups, n, n_tok, channels)
            if st.config.reposition:
                grid = ref_hs.transpose(-1, -2).reshape(ngroups, n, channels, h, w)
                moved = [
                    reposition(grid[:, i], plan.src[i], plan.dst[i], st.config.interpolation)
                    for i in range(n)
                ]
                ref_hs = torch.stack(moved, 1).flatten(3).transpose(-1, -2)
            ref_hs = ref_hs.reshape(ngroups * n, n_tok, channels)
            k_r = split(attn.to_k(ref_hs))
            v_r = split(attn.to_v(ref_hs))
            if attn.norm_k is not None:
                k_r = attn.norm_k(k_r)
            # [G*n, H, N, D] -> [G, H, n*N, D], subject-major like the mask's key order.
            k_r = k_r.view(ngroups, n, *k_r.shape[1:]).transpose(1, 2).flatten(2, 3)
            v_r = v_r.view(ngroups, n, *v_r.shape[1:]).transpose(1, 2).flatten(2, 3)
            keys = torch.cat([k_r, k[tgt]], dim=2)
            values = torch.cat([v_r, v[tgt]], dim=2)
            # use_ref without use_iso only happens with config.isolation off, which the plan reflects.
            allowed = plan.allowed_ref
            keep = st.query_keep(h, w, q.device)
            if keep is not None:
                allowed = allowed.clone()
                allowed[~keep, : n * n_tok] = False
        else:
            keys, values = k[tgt], v[tgt]
            allowed = plan.allowed_iso
        o_t, p_t = _attend(q_t, keys, values, allowed, scale, st.capture)
        out[tgt] = o_t
        if st.capture:
            self._record(q_t, keys, p_t, allowed, "reference" if use_ref else "isolation",
                         q_ref=q[refs], k_ref=k[refs], probs_ref=p_ref, grid=(h, w))
        return out

    def _record(self, q, k, probs, allowed, kind, **extra):
        self.state.records.append(
            dict(layer=self.layer_name, layer_index=self.layer_index, step=self.state.step, kind=kind,
                 q=q.detach(), k=k.detach(), probs=probs.detach(), allowed=allowed, **extra)
        )


class IRCrossAttnProcessor:
    """Cross-attention (``attn2``) processor adding mutual cross-attention to the target rows.

    Runs the module's own processor, then in the target's subject region ``i`` blends its output with
    the output of the target's queries attending to reference ``i``'s text keys/values (same CFG
    half), weight ``config.mutual_cross_attention``. Reference rows and background cells keep the
    module's own output.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: IRState, original, layer_name: str = "") -> None:
        self.state = state
        self.original = original
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        st = self.state
        lam = st.config.mutual_cross_attention
        if (
            lam <= 0.0
            or st.regions is None
            or encoder_hidden_states is None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or st.latent_hw is None
        ):
            return out
        n = st.regions.num_subjects
        group = n + 1
        bsz, n_tok, _ = hidden_states.shape
        if bsz % group:
            raise ValueError(
                f"IR cross-attention got a batch of {bsz} on {self.layer_name!r}, not a multiple of "
                f"{group} = {n} references + 1 target"
            )
        h, w = layer_grid(n_tok, st.latent_hw)
        labels = st.plan(h, w, hidden_states.device).labels
        rows = torch.arange(bsz, device=hidden_states.device).view(-1, group)
        tgt, refs = rows[:, -1], rows[:, :-1].flatten()
        x = hidden_states[tgt]
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        ctx = encoder_hidden_states[refs]
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(x))  # [G, H, N, D]
        k = split(attn.to_k(ctx))  # [G*n, H, T, D]
        v = split(attn.to_v(ctx))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        g = q.shape[0]
        q = q.repeat_interleave(n, 0)  # row g*n + i: target of group g with reference i
        mutual = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        mutual = mutual.transpose(1, 2).reshape(g * n, n_tok, -1).to(x.dtype)
        mutual = attn.to_out[1](attn.to_out[0](mutual))
        if attn.residual_connection:
            mutual = mutual + hidden_states[tgt].repeat_interleave(n, 0)
        mutual = (mutual / attn.rescale_output_factor).view(g, n, n_tok, -1)
        # Per cell: the mutual output of its own subject; background cells keep their own output.
        own = labels.clamp_min(0)
        pick = mutual.gather(1, own.view(1, 1, n_tok, 1).expand(g, 1, n_tok, mutual.shape[-1]))[:, 0]
        weight = (labels >= 0).to(out.dtype).view(1, n_tok, 1) * lam
        out = out.clone()
        out[tgt] = out[tgt] + weight * (pick - out[tgt])
        return out


class SubjectMapProcessor:
    """Cross-attention processor that accumulates subject-token attention maps (no change to output).

    For every batch row listed in ``state.subject_maps["tokens"]`` (``{row: [[token ids of subject
    0], ...]}``) it adds, per subject, the head-averaged attention to those tokens, resized to the latent
    grid, into ``state.subject_maps["sum"][row]`` (``[n, H_lat, W_lat]``), counting layers in
    ``state.subject_maps["count"]``. Layers with more than ``max_tokens`` queries are skipped (fine
    layers are noisy and costly), as the official code aggregates the coarse layers.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: IRState, original, max_tokens: int = 32 * 32) -> None:
        self.state = state
        self.original = original
        self.max_tokens = max_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        maps = self.state.subject_maps
        if encoder_hidden_states is None or hidden_states.ndim != 3 or not maps.get("tokens"):
            return out
        n_tok = hidden_states.shape[1]
        if n_tok > self.max_tokens or self.state.latent_hw is None:
            return out
        h, w = layer_grid(n_tok, self.state.latent_hw)
        rows = sorted(maps["tokens"])
        x = hidden_states[rows]
        ctx = encoder_hidden_states[rows]
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        heads = attn.heads
        q = attn.to_q(x)
        k = attn.to_k(ctx)
        q = q.view(len(rows), n_tok, heads, -1).transpose(1, 2).float()
        k = k.view(len(rows), k.shape[1], heads, -1).transpose(1, 2).float()
        probs = (torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale).softmax(-1).mean(1)  # [R, N, T]
        for j, row in enumerate(rows):
            per_subject = torch.stack([probs[j][:, idx].sum(-1) for idx in maps["tokens"][row]])
            grid = per_subject.view(-1, 1, h, w)
            up = F.interpolate(grid, size=self.state.latent_hw, mode="bilinear", align_corners=False)[:, 0]
            maps["sum"][row] = maps["sum"].get(row, 0) + up.cpu()
        maps["count"] = maps.get("count", 0) + 1
        return out


class IRAttention:
    """Install IR processors on a UNet (``unet.set_attn_processor``) and remove them exactly.

    >>> # ir = IRAttention(pipe.unet, IRConfig(), regions); ir.install(); pipe(...); ir.remove()
    >>> # or: with IRAttention(pipe.unet, IRConfig(), regions) as ir: pipe(...)

    Args:
        unet: a ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL architecture).
        config: :class:`IRConfig`.
        regions: :class:`IRRegions`, or ``None`` to only capture subject maps.
        capture: record attention probabilities (tests/inspection; slower, explicit softmax).
        subject_map_tokens: ``{batch row: [[token ids per subject]]}`` to capture cross-attention
            maps of subject words (a region-finding pass); the self-attention is then left untouched.
        max_map_tokens: finest layer size (queries) used for subject maps.
    """

    def __init__(self, unet, config: IRConfig | None = None, regions: IRRegions | None = None,
                 capture: bool = False, subject_map_tokens: dict | None = None,
                 max_map_tokens: int = 32 * 32) -> None:
        if not hasattr(unet, "set_attn_processor") or not hasattr(unet, "attn_processors"):
            raise TypeError(
                f"IRAttention needs a diffusers UNet2DConditionModel (pipe.unet), got {type(unet).__name__}"
            )
        config = IRConfig() if config is None else config
        if not isinstance(config, IRConfig):
            raise TypeError(f"config must be an IRConfig, got {type(config).__name__}")
        if regions is not None and not isinstance(regions, IRRegions):
            raise TypeError(f"regions must be IRRegions or None, got {type(regions).__name__}")
        self.unet = unet
        self.layers = self_attention_layers(unet)
        if not self.layers:
            raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) modules")
        self.state = IRState(config=config, regions=regions, num_layers=len(self.layers), capture=capture)
        self.subject_map_tokens = subject_map_tokens
        self.max_map_tokens = max_map_tokens
        self._originals: dict | None = None
        self._hook = None

    @property
    def installed(self) -> bool:
        return self._originals is not None

    def install(self) -> "IRAttention":
        if self.installed:
            return self
        if getattr(self.unet, "_diffattn_ir", None) is not None:
            raise RuntimeError("another IRAttention is installed on this UNet; call its remove() first")
        originals = dict(self.unet.attn_processors)
        procs = dict(originals)
        if self.subject_map_tokens is not None:
            for name, proc in originals.items():
                if name.endswith("attn2.processor"):
                    procs[name] = SubjectMapProcessor(self.state, proc, self.max_map_tokens)
        else:
            for i, name in enumerate(self.layers):
                procs[name] = IRAttnProcessor(self.state, i, name[: -len(".processor")])
            if self.state.config.mutual_cross_attention > 0 and self.state.regions is not None:
                for name, proc in originals.items():
                    if name.endswith("attn2.processor"):
                        procs[name] = IRCrossAttnProcessor(self.state, proc, name[: -len(".processor")])
        self.state.reset()
        if self.subject_map_tokens is not None:
            self.state.subject_maps.update(tokens=self.subject_map_tokens, sum={}, count=0)
        self.unet.set_attn_processor(procs)
        self._hook = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._originals = originals
        self.unet._diffattn_ir = self
        return self

    def _pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.state.on_unet_forward(sample, timestep)

    def remove(self) -> None:
        """Restore the original processor objects and drop the step hook."""
        if not self.installed:
            return
        # set_attn_processor consumes the dict it is given; keep ours intact.
        self.unet.set_attn_processor(dict(self._originals))
        self._hook.remove()
        self._hook = None
        self._originals = None
        self.unet._diffattn_ir = None

    def __enter__(self) -> "IRAttention":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
