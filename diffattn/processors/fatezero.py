"""FateZero attention processors: store attention maps during inversion, fuse them during editing.

FateZero (Qi et al., arXiv 2303.09535; official code ChenyangQiQi/FateZero) edits a video without
training by (1) DDIM-inverting it with a source prompt while keeping every self- and cross-attention
map of the small-resolution layers, then (2) denoising with a target prompt while swapping those maps
back in, read in reverse step order so each edit step gets the map of the same timestep:

* cross-attention, steps ``[int(lo*(N+1)), int(hi*(N+1)))`` of ``cross_replace_steps`` (per word if
  asked): replace (word-swap token mapping), refine (maps of tokens aligned between the prompts; new
  tokens keep their own) and/or reweight (scale chosen tokens);
* self-attention, steps ``< self_replace_steps``: ``mask * edited + (1 - mask) * inverted``, where the
  mask comes from the source prompt's cross-attention to the blend words (or is 0 everywhere: full
  replacement, when no blend words are given);
* only the conditional half of a classifier-free-guidance batch ``[uncond, cond]`` is changed;
* optionally (``blend_latents``) the edited latents are blended with the inverted ones outside the
  union of the source and target words' masks, between 20% and 80% of the steps.

The defaults follow the official code (``prompt_attention/*``, ``p2p_ddim_spatial_temporal.py``): word
matching is exact and case-sensitive, the blend mask reads the stored cross-attention at the official
positions, ``blend_threshold >= 1`` means no masked fusion (the normalised map never exceeds 1).

Every UNet self-attention can also be *spatial-temporal*: the frames of a clip sit in the batch
(``[(B F), N, C]``) and each frame's keys/values are taken from a chosen list of frames (first,
previous, middle, ...), concatenated along the key axis, which keeps the edit consistent over time.

The processors compute attention **densely and explicitly** (``softmax(q k^T * scale) @ v``): the
probability maps must exist to be stored and rewritten, so no fused or sparse kernel is used while a
:class:`FateZeroState` is installed. Pure helpers (frame references, token alignment, blend mask) sit
in :mod:`.fatezero_rules` and know nothing of diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..methods.base import MethodConfig
from .attention_body import AttentionBody
from .models import layer_grid
from .state import ModelState
from .fatezero_rules import (
    _NAMED_REFS,
    FrameRef,
    StoredLayer,
    _bounds,
    blend_layer_names,
    blend_mask_from_maps,
    cross_alpha,
    cross_step_range,
    frame_reference_indices,
    refine_mapper,
    spatial_temporal_kv,
    step_range,
    word_swap_mapper,
)
from .tokens import word_token_indices

__all__ = [
    "FateZeroConfig",
    "FrameRef",
    "frame_reference_indices",
    "spatial_temporal_kv",
    "word_token_indices",
    "word_swap_mapper",
    "refine_mapper",
    "blend_mask_from_maps",
    "step_range",
    "cross_step_range",
    "cross_alpha",
    "blend_layer_names",
    "StoredLayer",
    "AttentionStore",
    "EditPlan",
    "FateZeroState",
    "FateZeroAttnProcessor",
    "fatezero_processors",
]

_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FateZeroConfig(MethodConfig):
    """What FateZero stores and how it fuses.

    Attributes:
        self_replace_steps: self-attention fusion runs for edit steps ``[int(lo*N), int(hi*N))``; a float
            ``hi`` means ``(0, hi)``. Paper/official configs use 0.5–0.9; default 0.8 (the official
            editing guidance).
        cross_replace_steps: the cross-attention edit runs for steps ``[int(lo*(N+1)), int(hi*(N+1)))``
            (the official schedule has ``N + 1`` rows); a float ``hi`` means ``(0, hi)``. Default 0.8
            (paper). A dict is read as the official one: ``{"default_": 0.8, "word": (lo, hi), ...}``
            (``default_`` missing means ``(0, 1)``), split into this field and ``cross_replace_word_steps``.
        cross_replace_word_steps: per-word schedules ``((word, hi) or (word, (lo, hi)), ...)``: the tokens of
            these target-prompt words follow their own range instead of ``cross_replace_steps``.
        cross_mode: ``"replace"`` maps each target token to its source token (word swap; prompts must
            have the same number of space-separated words), ``"refine"`` copies the maps of tokens
            aligned by a global token alignment and leaves inserted tokens alone, ``"auto"`` (official
            behaviour, default) picks replace when the word counts match, refine otherwise. Without a
            tokenizer, replace maps token ``i`` to token ``i`` and refine is unavailable.
        realign_swapped_words: word swap where a swapped word's token count differs: False (official)
            gives each target token of the word the sum of the source word's token maps divided by the
            target's token count, and after the last swapped word target token ``j`` reads source token
            ``j``; True gives the mean of the source tokens and keeps every later word, EOS and padding on
            its own source token (the official rule shifts them by the count difference).
        reweight_words: target-prompt words (or token indices) whose cross-attention is multiplied by
            ``reweight_values`` after replace/refine (the official "equalizer"; no renormalisation).
        reweight_values: one factor per reweighted word, e.g. ``(10.0,)`` for a style word.
        blend_words: source-prompt words (or token indices) to edit. With blend words the self-attention
            is ``mask * edited + (1 - mask) * inverted``; without, it is the inverted map (mask = 0).
        blend_threshold: the normalised blend map is thresholded with ``>`` this value. Paper: 0.3. A
            value >= 1 selects nothing (the official configs' way to turn masked fusion off): the
            self-attention is the inverted map, and latent blending keeps the inverted latents.
        blend_layers: which stored cross-attention layers the blend map averages: ``"reference"``
            (official: the stored down-block layers at positions 2–3 and the first three stored up-block
            layers, i.e. the 16×16 layers of SD at 512 px, three 24×24 up-block layers at 768 px) or
            ``"resolution"`` (the stored layers whose token count is nearest ``blend_resolution**2``:
            one fixed resolution at any image size). Where the reference positions hold no layers or
            layers of different grids (small UNets), the resolution rule is used, logged once.
        blend_resolution: the grid side ``blend_layers="resolution"`` looks for. Default 16.
        blend_latents: also blend the latents after each step ``int(0.2N) < j + 1 < int(0.8N)``:
            ``inverted + mask * (edited - inverted)``, the mask being the union of the source words' mask
            (``blend_words`` on the stored maps) and the target words' mask (``blend_target_words`` on
            the edit's cross-attention summed over the steps so far), as the official ``blend_latents``.
        blend_target_words: target-prompt words of the latent blend (official ``blend_words[1]``).
        word_match: how words are found in a prompt: ``"exact"`` (official: equal to a space-separated
            word, case and punctuation included) or ``"normalized"`` (case and trailing punctuation
            ignored: ``"tiger"`` finds ``"Tiger,"``).
        encode_mean: encode the video with the VAE posterior mean (deterministic) instead of a sample
            of it (official; seeded by ``invert(generator=...)``). Default False.
        max_query_tokens: maps are stored and fused only for layers with at most this many queries per
            frame. Paper: 32² = 1024 (all but the 64×64 layers of SD at 512 px).
        frame_refs: keys/values of each frame's self-attention come from these frames, concatenated:
            ``"first"``, ``"previous"``, ``"next"``, ``"middle"``, ``"last"``, ``"self"`` or an int
            offset (``-1`` = previous, clamped to the clip). Official configs: ``("middle",)``.
        temporal_min_channels: spatial-temporal attention only in self-attention layers whose width
            is at least this; narrower layers attend within their own frame. Official configs: 640.
        store_dtype: dtype of stored maps. Default fp16 (paper).
        store_device: where stored maps live. Default ``"cpu"`` (host memory).
        store_budget_bytes: inversion refuses to start when the stored maps would exceed this many bytes.
            Default 64 GiB (SD 1.x at 512 px, 8 frames, 50 steps, ``frame_refs=("middle",)`` stores
            36.2 GiB; ``("first", "previous")`` doubles the self-attention part, to 69.4 GiB).
    """

    method = "fatezero"

    self_replace_steps: Union[float, tuple[float, float]] = 0.8
    cross_replace_steps: Union[float, tuple[float, float]] = 0.8
    cross_replace_word_steps: tuple[tuple[Union[str, int], Union[float, tuple[float, float]]], ...] = ()
    cross_mode: Literal["auto", "replace", "refine"] = "auto"
    realign_swapped_words: bool = False
    reweight_words: tuple[Union[str, int], ...] = ()
    reweight_values: tuple[float, ...] = ()
    blend_words: tuple[Union[str, int], ...] = ()
    blend_threshold: float = 0.3
    blend_layers: Literal["reference", "resolution"] = "reference"
    blend_resolution: int = 16
    blend_latents: bool = False
    blend_target_words: tuple[Union[str, int], ...] = ()
    word_match: Literal["exact", "normalized"] = "exact"
    encode_mean: bool = False
    max_query_tokens: int = 1024
    frame_refs: tuple[Union[int, str], ...] = ("middle",)
    temporal_min_channels: int = 640
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    store_device: str = "cpu"
    store_budget_bytes: int = 64 * 2**30

    def __post_init__(self) -> None:
        steps = self.cross_replace_steps
        if isinstance(steps, dict):
            words = tuple((w, v) for w, v in steps.items() if w != "default_")
            object.__setattr__(self, "cross_replace_steps", steps.get("default_", (0.0, 1.0)))
            object.__setattr__(self, "cross_replace_word_steps", tuple(self.cross_replace_word_steps) + words)
        super().__post_init__()

    def validate(self) -> None:
        for name in ("self_replace_steps", "cross_replace_steps"):
            lo, hi = _bounds(getattr(self, name))
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: need 0 <= start <= end <= 1")
        for word, value in self.cross_replace_word_steps:
            lo, hi = _bounds(value)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"cross_replace_word_steps entry {(word, value)!r}: need 0 <= start <= end <= 1")
        if self.blend_latents and not (self.blend_words or self.blend_target_words):
            raise ValueError("blend_latents=True needs blend_words and/or blend_target_words (the masks' words)")
        if len(self.reweight_words) != len(self.reweight_values):
            raise ValueError(
                f"reweight_words={self.reweight_words!r} and reweight_values={self.reweight_values!r} "
                "must have the same length (one factor per word)"
            )
        if not 0.0 <= self.blend_threshold:
            raise ValueError(
                f"blend_threshold={self.blend_threshold!r}: need a value >= 0 (paper: 0.3; >= 1 turns masked fusion off)"
            )
        if self.blend_resolution < 1 or self.max_query_tokens < 1:
            raise ValueError("blend_resolution and max_query_tokens must be >= 1")
        if not self.frame_refs:
            raise ValueError("frame_refs=(): give at least one frame reference, e.g. ('self',) or ('middle',)")
        for ref in self.frame_refs:
            if isinstance(ref, str) and ref not in _NAMED_REFS:
                raise ValueError(f"frame_refs entry {ref!r}; use one of {list(_NAMED_REFS)} or an int offset")
        if self.store_budget_bytes < 0:
            raise ValueError(f"store_budget_bytes={self.store_budget_bytes}: must be >= 0")

    @property
    def torch_store_dtype(self) -> torch.dtype:
        return _STORE_DTYPES[self.store_dtype]


# --------------------------------------------------------------------------------------------- store
@dataclass
class AttentionStore:
    """Attention maps of every inversion step: ``steps[i][layer] -> [F, H, Nq, Nk]`` (``store_dtype``).

    Step ``i`` is the ``i``-th inversion step (increasing noise); editing step ``j`` of ``N`` reads
    step ``N - 1 - j``, which ran at the same timestep.
    """

    dtype: torch.dtype = torch.float16
    device: str = "cpu"
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    layers: dict[str, StoredLayer] = field(default_factory=dict)

    def add(self, step: int, layer: StoredLayer, probs: torch.Tensor) -> None:
        while len(self.steps) <= step:
            self.steps.append({})
        self.layers.setdefault(layer.name, layer)
        self.steps[step][layer.name] = probs.detach().to(device=self.device, dtype=self.dtype)

    def get(self, step: int, name: str) -> torch.Tensor:
        try:
            return self.steps[step][name]
        except (IndexError, KeyError):
            raise KeyError(
                f"no stored attention for layer {name!r} at inversion step {step} (store has "
                f"{len(self.steps)} steps): invert with the same frames, size and frame_refs as the edit"
            ) from None

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.steps for t in s.values())


# --------------------------------------------------------------------------------------------- state
@dataclass
class EditPlan:
    """Everything the edit needs per step, built once by the pipeline from a :class:`FateZeroConfig`."""

    self_range: tuple[int, int]
    cross_alpha: torch.Tensor  # [N + 1, T]: 1 where (step, token) takes the edited cross-attention
    mapper: Optional[torch.Tensor] = None  # [T, T] word swap
    refine_index: Optional[torch.Tensor] = None  # [T]
    refine_keep: Optional[torch.Tensor] = None  # [T]
    equalizer: Optional[torch.Tensor] = None  # [T]
    blend_weights: Optional[torch.Tensor] = None  # [T], None = full self replacement
    blend_threshold: float = 0.3
    blend_tokens: int = 256
    blend_layers: str = "reference"
    latent_source_weights: Optional[torch.Tensor] = None  # [T] source words of the latent blend
    latent_target_weights: Optional[torch.Tensor] = None  # [T] target words of the latent blend
    latent_range: Optional[tuple[int, int]] = None  # blend after step j when lo < j + 1 < hi
    # Copies of the tensors above on the attention's device and dtype, made at their first use (the
    # host tensors stay for the host's decisions): no host-to-device copy per attention call. Each is
    # kept with the tensor it copies, so a field set anew is copied anew.
    _copies: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _on(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Field ``name`` on ``like``'s device in ``dtype`` (default ``like``'s), copied there once."""
        dtype = like.dtype if dtype is None else dtype
        key, source = (name, like.device, dtype), getattr(self, name)
        hit = self._copies.get(key)
        if hit is None or hit[0] is not source:
            hit = self._copies[key] = (source, source.to(device=like.device, dtype=dtype))
        return hit[1]

    def cross_edit(self, stored: torch.Tensor, current: torch.Tensor, step: int) -> torch.Tensor:
        """The edited cross-attention ``[F, H, Nq, T]`` from the stored source map and the live one:
        the replaced/refined/reweighted map on the (step, token) pairs of ``cross_alpha``, the live map
        elsewhere."""
        if self.mapper is not None:
            out = torch.einsum("fhqs,st->fhqt", stored, self._on("mapper", stored))
        elif self.refine_index is not None:
            keep = self._on("refine_keep", stored)
            out = stored[..., self._on("refine_index", stored, self.refine_index.dtype)] * keep + current * (1 - keep)
        else:
            out = stored
        if self.equalizer is not None:
            out = out * self._on("equalizer", out)
        alpha = self._on("cross_alpha", out)[step]
        return out * alpha + current * (1 - alpha)


class FateZeroState:
    """Mutable state shared by the FateZero processors of one UNet.

    ``mode``: ``"off"`` (plain dense attention), ``"store"`` (inversion: keep maps of every call) or
    ``"edit"`` (fuse stored maps into the conditional half). The pipeline sets ``num_frames`` and
    ``cfg`` (batch is ``[uncond, cond]``). Installed on a UNet (:func:`fatezero_processors` with
    ``diffattn.processors.api.install_processors``), ``schedule`` is the UNet's diffattn state: the
    step and latent grid are those of its schedule, as for every diffattn method. Processors called
    on their own (no ``schedule``) read ``step`` and ``latent_hw`` set by hand.
    """

    def __init__(self, config: FateZeroConfig):
        self.config = config
        self.mode: Literal["off", "store", "edit"] = "off"
        self.store: Optional[AttentionStore] = None
        self.plan: Optional[EditPlan] = None
        self.schedule: Optional[ModelState] = None
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self.num_frames = 1
        self._latent_hw: tuple[int, int] = (1, 1)
        self.cfg = False
        self._mask_cache: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
        self._blend_names: Optional[list[str]] = None
        self.target_cross_sum: dict[str, torch.Tensor] = {}

    @property
    def step(self) -> int:
        """The denoising (or inversion) step of the current UNet call, and after it until the next."""
        return self._step if self.schedule is None else max(self.schedule.tracker.step, 0)

    @step.setter
    def step(self, value: int) -> None:
        self._step = value

    @property
    def latent_hw(self) -> tuple[int, int]:
        info = None if self.schedule is None else self.schedule.info
        return self._latent_hw if info is None or info.grid is None else tuple(info.grid[1:])

    @latent_hw.setter
    def latent_hw(self, value: tuple[int, int]) -> None:
        self._latent_hw = value

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of a layer with ``num_tokens`` queries."""
        grid = layer_grid((1, *self.latent_hw), num_tokens, multi_resolution=True)
        if grid is None:
            raise ValueError(f"{num_tokens} tokens is no UNet level of a {tuple(self.latent_hw)} latent")
        return grid[1:]

    # -- called by processors -------------------------------------------------------------------
    def temporal_refs(self, channels: int) -> Sequence[FrameRef]:
        return self.config.frame_refs if channels >= self.config.temporal_min_channels else ("self",)

    def wants_probs(self, nq: int) -> bool:
        """Whether a layer with ``nq`` queries stores or rewrites its probabilities (otherwise it is
        plain attention and need not build them)."""
        return self.mode != "off" and nq <= self.config.max_query_tokens

    def process(self, name: str, is_cross: bool, heads: int, probs: torch.Tensor) -> torch.Tensor:
        """Store or rewrite ``probs`` ``[batch, H, Nq, Nk]``; returns the probabilities to apply."""
        nq = probs.shape[-2]
        if not self.wants_probs(nq):
            return probs
        if self.mode == "store":
            grid = self.grid(nq)
            self.store.add(self.step, StoredLayer(name, is_cross, heads, nq, probs.shape[-1], grid), probs)
            return probs
        if is_cross and self.plan.latent_target_weights is not None and name in self.blend_names():
            # The official latent blend reads the edit's own cross-attention summed over the steps so far.
            live = probs[probs.shape[0] // 2 :] if self.cfg else probs
            total = self.target_cross_sum.get(name)
            self.target_cross_sum[name] = live.detach().float() if total is None else total + live.float()
        return self._edit(name, is_cross, probs)

    def blend_names(self) -> list[str]:
        if self._blend_names is None:
            self._blend_names = blend_layer_names(
                list(self.store.layers.values()), self.plan.blend_layers, self.plan.blend_tokens
            )
        return self._blend_names

    def _edit(self, name: str, is_cross: bool, probs: torch.Tensor) -> torch.Tensor:
        plan, step = self.plan, self.step
        if is_cross:
            if not bool(plan.cross_alpha[min(step, plan.cross_alpha.shape[0] - 1)].any()):
                return probs
        else:
            lo, hi = plan.self_range
            if not lo <= step < hi:
                return probs
        stored_step = self.store.num_steps - 1 - step
        stored = self.store.get(stored_step, name).to(device=probs.device, dtype=probs.dtype)
        half = probs.shape[0] // 2 if self.cfg else 0
        current = probs[half:]
        if stored.shape != current.shape:
            raise ValueError(
                f"stored map of {name} has shape {tuple(stored.shape)} but the edit computes "
                f"{tuple(current.shape)}: edit with the frames, size and frame_refs of the inversion"
            )
        if is_cross:
            edited = plan.cross_edit(stored, current, step)
        elif plan.blend_weights is None:
            edited = stored
        else:
            mask = self.blend_mask(stored_step, self.grid(current.shape[-2]))
            mask = mask.to(device=probs.device, dtype=probs.dtype)
            edited = mask * current + (1 - mask) * stored
        return torch.cat([probs[:half], edited], dim=0) if half else edited

    def blend_mask(self, stored_step: int, out_hw: tuple[int, int]) -> torch.Tensor:
        """``[F, 1, h*w, 1]`` blend mask at grid ``out_hw`` from inversion step ``stored_step``."""
        key = (stored_step, out_hw)
        if key not in self._mask_cache:
            names = self.blend_names()
            maps = [self.store.get(stored_step, n) for n in names]
            grids = [self.store.layers[n].grid for n in names]
            self._mask_cache[key] = blend_mask_from_maps(
                maps, grids, self.plan.blend_weights, out_hw, self.plan.blend_threshold
            )
        return self._mask_cache[key]

    def blend_latents(self, z: torch.Tensor, inverted: torch.Tensor) -> torch.Tensor:
        """The official latent blend after edit step ``self.step``: ``inverted + mask * (z - inverted)``.

        ``mask`` (per frame, on the latent grid) is the union of the source words' mask from the stored
        maps of the step's inversion step and the target words' mask from the edit's cross-attention
        summed so far; outside ``plan.latent_range`` ``z`` is returned as is.
        """
        plan = self.plan
        lo, hi = plan.latent_range
        if not lo < self.step + 1 < hi:
            return z
        names = self.blend_names()
        grids = [self.store.layers[n].grid for n in names]
        hw = tuple(z.shape[-2:])
        stored_step = self.store.num_steps - 1 - self.step
        mask = torch.zeros(z.shape[0], 1, hw[0] * hw[1], 1, device=z.device)
        if plan.latent_source_weights is not None:
            maps = [self.store.get(stored_step, n) for n in names]
            mask = mask + blend_mask_from_maps(maps, grids, plan.latent_source_weights, hw, plan.blend_threshold).to(z.device)
        if plan.latent_target_weights is not None:
            maps = [self.target_cross_sum[n] for n in names]
            mask = mask + blend_mask_from_maps(maps, grids, plan.latent_target_weights, hw, plan.blend_threshold).to(z.device)
        mask = mask.clamp(max=1.0).reshape(z.shape[0], 1, *hw).to(z.dtype)
        inverted = inverted.to(device=z.device, dtype=z.dtype)
        return inverted + mask * (z - inverted)


# ----------------------------------------------------------------------------------------- processor
class FateZeroAttnProcessor:
    """Dense attention processor for UNet ``Attention`` modules that exposes the probability maps.

    Computes ``softmax(q k^T * scale)`` in fp32, hands it to :meth:`FateZeroState.process` (store or
    fuse), applies it to ``v`` and the module's output projection. Self-attention layers take their
    keys/values from the frames in ``state.config.frame_refs`` (spatial-temporal attention, batch
    ``[(B F), N, C]``). Attention always runs dense here, whatever other processor was installed.

    Args:
        name: the layer's processor name (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``).
        state: shared :class:`FateZeroState`.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: str, state: FateZeroState):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        body = AttentionBody(attn, hidden_states, temb)
        batch = body.hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        q = body.query()
        k, v = body.key_value(encoder_hidden_states, encoder=True)

        state = self.state
        heads = attn.heads
        refs = ("self",) if is_cross else state.temporal_refs(heads * q.shape[-1])
        if tuple(refs) != ("self",):
            if attention_mask is not None:
                raise ValueError(f"{self.name}: spatial-temporal self-attention does not take an attention_mask")
            k, v = spatial_temporal_kv(k, v, state.num_frames, refs)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[-2], batch).view(batch, heads, -1, k.shape[-2])
        if not state.wants_probs(q.shape[-2]):
            # Nothing stored or rewritten here (the largest layers): no [Nq, Nk] probability matrix.
            return body.finish(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        if mask is not None:
            scores = scores + mask.float()
        probs = state.process(self.name, is_cross, heads, scores.softmax(dim=-1))
        return body.finish(torch.matmul(probs.to(v.dtype), v))


def fatezero_processors(unet: torch.nn.Module, state: FateZeroState) -> dict[str, FateZeroAttnProcessor]:
    """A :class:`FateZeroAttnProcessor` for every attention layer of ``unet``, by processor key (for
    ``install_processors``)."""
    return {key: FateZeroAttnProcessor(key[: -len(".processor")], state) for key in unet.attn_processors}
