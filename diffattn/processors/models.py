"""Per-model knowledge, in one table: which attention modules are self-attention over the latent
tokens, where text tokens sit in joint sequences, and how the latent grid follows from the inputs.

Text placement differs between families: HunyuanVideo's joint sequence is ``[video, text]`` with a
padding mask; CogVideoX and Flux are ``[text, image]`` (Flux single-stream blocks see the concatenated
sequence without the text length — it is ``N - F*H*W``); Wan, LTX-Video and UNets keep text in
cross-attention only.

A model outside the table can still be used by passing a :class:`ModelSpec` to ``diffattn.apply``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "spec_for",
    "supported_models",
    "bind_forward_args",
    "default_processor",
    "layer_grid",
]

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class ModelSpec:
    """How diffattn reads one denoiser family.

    Attributes:
        name: family name used in messages and stats.
        classes: class names of the denoiser this spec serves.
        self_attention: regex over module names (``model.named_modules()``) of the attention modules
            whose core attention is replaced; every other attention module keeps its processor.
        text_first: in joint self-attention, text tokens come before the video tokens (else after).
        grid: ``fn(model, inputs) -> (F, H, W)`` token grid from the forward's bound arguments.
        timestep_arg: name of the forward argument holding the diffusion timestep.
        multi_resolution: attention layers see the grid downsampled by powers of two (UNets).
        target_processor: ``"module:Class"`` of the processor the target modules use by default, for
            models whose attention class does not declare one (used when a processor is set directly
            with ``set_attn_processor`` and the original must be recreated).
        first_call_probes: ``(submodule, argument names by position, gives the grid)`` entries that read
            the forward's inputs from the positional inputs of embedding layers, for the one forward
            during which a model meets a processor set with ``set_attn_processor`` (a process-wide
            hook sees no keyword arguments).
    """

    name: str
    classes: tuple[str, ...]
    self_attention: str
    text_first: bool
    grid: Callable[[torch.nn.Module, dict[str, Any]], Grid | None]
    timestep_arg: str = "timestep"
    multi_resolution: bool = False
    target_processor: str | None = None
    first_call_probes: tuple[tuple[str, tuple[str | None, ...], bool], ...] = ()

    def is_target(self, module_name: str) -> bool:
        return re.fullmatch(self.self_attention, module_name) is not None


def _patch(cfg: Any, name: str, default: int = 1) -> int:
    value = getattr(cfg, name, None)
    if value is None:
        return default
    return int(value)


def _grid_wan(model, inputs) -> Grid:
    hs = inputs["hidden_states"]  # [B, C, F, H, W]
    pt, ph, pw = model.config.patch_size
    return (hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw)


def _grid_hunyuan(model, inputs) -> Grid:
    hs = inputs["hidden_states"]  # [B, C, F, H, W]
    p, pt = _patch(model.config, "patch_size"), _patch(model.config, "patch_size_t")
    return (hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p)


def _grid_cogvideox(model, inputs) -> Grid:
    hs = inputs["hidden_states"]  # [B, F, C, H, W]
    p, pt = _patch(model.config, "patch_size"), _patch(model.config, "patch_size_t")
    return (hs.shape[1] // pt, hs.shape[3] // p, hs.shape[4] // p)


def _grid_ltx(model, inputs) -> Grid | None:
    f, h, w = inputs.get("num_frames"), inputs.get("height"), inputs.get("width")
    if f is None or h is None or w is None:
        return None
    return (int(f), int(h), int(w))


def _grid_flux(model, inputs) -> Grid | None:
    ids = inputs.get("img_ids")
    if ids is None:
        return None
    if ids.ndim == 3:
        ids = ids[0]
    frames = int(torch.unique(ids[:, 0]).numel())
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return (frames, h, w)


def _grid_unet(model, inputs) -> Grid:
    sample = inputs["sample"]  # [B, C, H, W]
    return (1, sample.shape[-2], sample.shape[-1])


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "wan",
        ("WanTransformer3DModel",),
        r"blocks\.\d+\.attn1",
        text_first=False,
        grid=_grid_wan,
        first_call_probes=(("patch_embedding", ("hidden_states",), True), ("condition_embedder", ("timestep",), False)),
    ),
    ModelSpec(
        "hunyuanvideo",
        ("HunyuanVideoTransformer3DModel",),
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        text_first=False,
        grid=_grid_hunyuan,
        first_call_probes=(("x_embedder", ("hidden_states",), True), ("time_text_embed", ("timestep",), False)),
        target_processor="diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",
    ),
    ModelSpec(
        "cogvideox",
        ("CogVideoXTransformer3DModel",),
        r"transformer_blocks\.\d+\.attn1",
        text_first=True,
        grid=_grid_cogvideox,
        first_call_probes=(("patch_embed", (None, "hidden_states"), True), ("time_proj", ("timestep",), False)),
        target_processor="diffusers.models.attention_processor:CogVideoXAttnProcessor2_0",
    ),
    ModelSpec(
        "ltx",
        ("LTXVideoTransformer3DModel",),
        r"transformer_blocks\.\d+\.attn1",
        text_first=False,
        grid=_grid_ltx,
        first_call_probes=(
            ("rope", (None, "num_frames", "height", "width"), True), ("time_embed", ("timestep",), False),
        ),
    ),
    ModelSpec(
        "flux",
        ("FluxTransformer2DModel",),
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        text_first=True,
        grid=_grid_flux,
        first_call_probes=(("pos_embed", ("img_ids",), True), ("time_text_embed", ("timestep",), False)),
    ),
    ModelSpec(
        "unet",
        ("UNet2DConditionModel",),
        r".*attentions\.\d+\.transformer_blocks\.\d+\.attn1",
        text_first=False,
        grid=_grid_unet,
        multi_resolution=True,
        first_call_probes=(("conv_in", ("sample",), True), ("time_proj", ("timestep",), False)),
    ),
)


def supported_models() -> list[str]:
    return [c for s in MODEL_SPECS for c in s.classes]


def spec_for(model: torch.nn.Module) -> ModelSpec | None:
    """The table entry for ``model``'s class (or a base class of it), or None."""
    for cls in type(model).__mro__:
        for spec in MODEL_SPECS:
            if cls.__name__ in spec.classes:
                return spec
    return None


def bind_forward_args(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a forward call's positional and keyword arguments to parameter names."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    return dict(bound.arguments)


def layer_grid(base: Grid | None, num_tokens: int, multi_resolution: bool) -> Grid | None:
    """The grid seen by a layer with ``num_tokens`` video tokens (UNets downsample by powers of two)."""
    if base is None:
        return None
    f, h, w = base
    if f * h * w == num_tokens or not multi_resolution:
        return base
    factor = 2
    while factor <= 64:
        g = (f, -(-h // factor), -(-w // factor))
        if g[0] * g[1] * g[2] == num_tokens:
            return g
        factor *= 2
    return None


def default_processor(spec: ModelSpec | None, name: str, module: torch.nn.Module) -> Any:
    """A fresh instance of the processor ``module`` uses when nothing else was set."""
    import importlib

    if spec is not None and spec.target_processor and spec.is_target(name):
        mod, cls = spec.target_processor.split(":")
        return getattr(importlib.import_module(mod), cls)()
    cls = getattr(module, "_default_processor_cls", None)
    if cls is not None:
        return cls()
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
