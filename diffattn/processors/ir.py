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

Regions are boxes or masks per subject, on the target and on the reference images; how they are
rasterised on each layer grid, overlaps resolved and references repositioned is in
:mod:`diffattn.patterns.regions`.

Isolation and reference attention leave the *ratios* of the remaining attention probabilities
unchanged: with ``P`` the softmax of the same scores over all concatenated keys with no mask, the
isolated probabilities are ``P[q, k] / sum_{k' allowed} P[q, k']`` on allowed keys and exactly 0 elsewhere.

Installed with :class:`IRAttention` (``diffattn.processors.api.install_processors``), the processors
share the UNet's diffattn state: the step and latent grid come from its schedule, as for every
diffattn method, and ``diffattn.remove(unet)`` restores the original processors.

Use: ``with IRAttention(pipe.unet, IRConfig(), regions, scheduler=pipe.scheduler): pipe(...)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..methods.base import MethodConfig
from ..patterns.regions import (
    IRRegions,
    RegionPlan,
    box_cells,
    check_box,
    ir_allowed_mask,
    label_map,
    plan_regions,
    region_cells,
    region_mask,
    reposition,
)
from .api import install_processors, restore_processors
from .ir_attention import IRAttnProcessor, IRCrossAttnProcessor, SubjectMapProcessor
from .models import layer_grid
from .sparse import state_of
from .state import ModelState

__all__ = [
    "IRConfig",
    "IRRegions",
    "IRState",
    "IRAttnProcessor",
    "IRCrossAttnProcessor",
    "SubjectMapProcessor",
    "IRAttention",
    "box_cells",
    "build_plan",
    "region_cells",
    "region_mask",
    "label_map",
    "reposition",
    "ir_allowed_mask",
    "self_attention_layers",
    "check_box",
]

# The official SDXL setting starts reference attention at self-attention layer 36 of 70.
_OFFICIAL_START_LAYER = 36
_OFFICIAL_NUM_LAYERS = 70

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


def build_plan(regions: IRRegions, config: IRConfig, h: int, w: int, device) -> RegionPlan:
    """The :class:`~diffattn.patterns.regions.RegionPlan` of ``regions`` on an ``h x w`` layer grid."""
    return plan_regions(
        regions, h, w, device, overlap=config.overlap, move=config.reposition,
        interpolation=config.interpolation, isolation=config.isolation,
    )


class IRState:
    """Mutable state shared by all IR processors of one UNet; :meth:`reset` before a new generation.

    Attributes:
        config: the :class:`IRConfig`.
        regions: subject regions (``None`` while only capturing subject maps).
        num_layers: number of self-attention layers.
        capture: when True, processors record ``q``, keys, probabilities and masks in ``records``.
        schedule: the UNet's diffattn state while installed (:class:`IRAttention`): ``step`` and
            ``latent_hw`` are then its schedule's. Processors called on their own read ``step`` and
            ``latent_hw`` set by hand.
    """

    def __init__(
        self, config: IRConfig, regions: IRRegions | None = None, num_layers: int = 1, capture: bool = False,
        latent_hw: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        self.regions = regions
        self.num_layers = num_layers
        self.capture = capture
        self.schedule: ModelState | None = None
        self.records: list = []
        self.plans: dict = {}
        self.keeps: dict = {}
        self.full_masks: dict = {}
        self.subject_maps: dict = {}
        self._step = -1
        self._latent_hw = latent_hw

    def reset(self) -> None:
        self._step = -1
        self._latent_hw = None
        self.records.clear()
        self.plans.clear()
        self.keeps.clear()
        self.full_masks.clear()
        self.subject_maps.clear()

    @property
    def step(self) -> int:
        """The denoising step of the current UNet call (CFG is batched: one call per step)."""
        return self._step if self.schedule is None else self.schedule.tracker.step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        """The latent grid of the current UNet call."""
        info = None if self.schedule is None else self.schedule.info
        return self._latent_hw if info is None or info.grid is None else tuple(info.grid[1:])

    @latent_hw.setter
    def latent_hw(self, value: tuple[int, int] | None) -> None:
        self._latent_hw = value

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of a layer with ``num_tokens`` tokens."""
        grid = layer_grid((1, *self.latent_hw), num_tokens, multi_resolution=True)
        if grid is None:
            raise ValueError(
                f"a self-attention layer has {num_tokens} tokens, which is no downsampled grid of the "
                f"latents {tuple(self.latent_hw)}; IR attention needs square-pixel UNet latents"
            )
        return grid[1:]

    def plan(self, h: int, w: int, device) -> RegionPlan:
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

    def reference_mask(self, allowed_ref: torch.Tensor, h: int, w: int, n_ref_keys: int, device) -> torch.Tensor:
        """``allowed_ref`` with the reference keys (the first ``n_ref_keys``) cut for the target queries
        :meth:`query_keep` drops: built once per (step, grid), shared by that step's layers."""
        keep = self.query_keep(h, w, device)
        if keep is None:
            return allowed_ref
        key = (h, w, str(device))
        entry = self.keeps[key]
        if len(entry) == 2 or entry[2] is not allowed_ref:
            masked = allowed_ref.clone()
            masked[~keep, :n_ref_keys] = False
            entry = self.keeps[key] = (entry[0], entry[1], allowed_ref, masked)
        return entry[3]

    def attention_mask(self, allowed: torch.Tensor | None) -> torch.Tensor | None:
        """``allowed`` as an SDPA mask, or None where it keeps every key: decided once per mask object
        (plans and their masked copies live across layers), not with a device read per call."""
        if allowed is None:
            return None
        hit = self.full_masks.get(id(allowed))
        if hit is None or hit[0] is not allowed:
            hit = self.full_masks[id(allowed)] = (allowed, bool(allowed.all()))
        return None if hit[1] else allowed

    def reference_active(self, layer_index: int) -> bool:
        c = self.config
        if not c.reference_attention or layer_index < c.resolved_start_layer(self.num_layers):
            return False
        return self.step >= c.start_step and (c.end_step is None or self.step < c.end_step)


class IRAttention:
    """IR processors on a UNet for a block (``with``) or between :meth:`install` and :meth:`remove`.

    They go in with ``install_processors``: on the UNet's diffattn state and schedule (the step is
    the pipeline scheduler's ``step_index`` when given, else one per UNet call, a larger timestep
    starting a new generation), and :meth:`remove` or ``diffattn.remove(unet)`` restores the
    processors that were there.

    Args:
        unet: a ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL architecture).
        config: :class:`IRConfig`.
        regions: :class:`IRRegions`, or ``None`` to only capture subject maps.
        capture: record attention probabilities (tests/inspection; slower, explicit softmax).
        subject_map_tokens: ``{batch row: [[token ids per subject]]}`` to capture cross-attention
            maps of subject words (a region-finding pass); the self-attention is then left untouched.
        max_map_tokens: finest layer size (queries) used for subject maps.
        scheduler: the pipeline's scheduler, whose ``step_index`` gives the step.
    """

    def __init__(self, unet, config: IRConfig | None = None, regions: IRRegions | None = None,
                 capture: bool = False, subject_map_tokens: dict | None = None,
                 max_map_tokens: int = 32 * 32, scheduler: Any = None) -> None:
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
        self.scheduler = scheduler

    @property
    def installed(self) -> bool:
        return self.state.schedule is not None

    def processors(self) -> dict[str, Any]:
        """The processors this installation puts on the UNet, by processor key."""
        current = self.unet.attn_processors
        cross = [key for key in current if key.endswith("attn2.processor")]
        if self.subject_map_tokens is not None:
            return {key: SubjectMapProcessor(self.state, current[key], self.max_map_tokens) for key in cross}
        procs: dict[str, Any] = {
            key: IRAttnProcessor(self.state, i, key[: -len(".processor")]) for i, key in enumerate(self.layers)
        }
        if self.state.config.mutual_cross_attention > 0 and self.state.regions is not None:
            for key in cross:
                procs[key] = IRCrossAttnProcessor(self.state, current[key], key[: -len(".processor")])
        return procs

    def install(self) -> "IRAttention":
        if self.installed:
            return self
        self.state.reset()
        if self.subject_map_tokens is not None:
            self.state.subject_maps.update(tokens=self.subject_map_tokens, sum={}, count=0)
        schedule = install_processors(self.unet, self.processors(), scheduler=self.scheduler)
        self._one_call_per_step = schedule.tracker.one_call_per_step
        schedule.tracker.one_call_per_step = True
        self.state.schedule = schedule
        return self

    def remove(self) -> None:
        """Restore the processors that were in place before :meth:`install`."""
        if not self.installed:
            return
        schedule, self.state.schedule = self.state.schedule, None
        schedule.tracker.one_call_per_step = self._one_call_per_step
        if schedule is state_of(self.unet):
            restore_processors(self.unet)

    def __enter__(self) -> "IRAttention":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
