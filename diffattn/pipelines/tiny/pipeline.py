"""The tiny model's pipeline, and loading it (or any Diffusers folder / hub id)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .model import TINY_SCHEDULER_CONFIG, TINY_TRANSFORMER_CONFIG, TinyTextEncoder, with_position_channels

__all__ = ["TinyVideoPipeline", "TinyVideoPipelineOutput", "PREDICTION_TYPES", "build_tiny_pipeline",
           "tiny_asset_dir", "load_pipeline"]


@dataclass
class TinyVideoPipelineOutput(BaseOutput):
    """``frames``: ``np.ndarray`` float32 ``[B, F, H, W, 3]`` in [0, 1] (``output_type="np"``), a tensor
    ``[B, F, 3, H, W]`` (``"pt"``), or the raw pixel-space sample ``[B, 3, F, H, W]`` in [-1, 1]
    (``"latent"``)."""

    frames: Any


# "velocity": the transformer predicts noise - x0 (flow matching); "sample": it predicts x0.
PREDICTION_TYPES = ("velocity", "sample")


class TinyVideoPipeline(DiffusionPipeline):
    """Text-to-video with the tiny pixel-space Wan transformer (see the module docstring).

    The denoising loop mirrors ``WanPipeline``: flow-matching Euler steps, and with guidance one
    conditional and one unconditional transformer call per step inside ``cache_context("cond")`` /
    ``cache_context("uncond")``.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: TinyTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
        prediction_type: str = "velocity",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES} (what the transformer outputs), "
                f"got {prediction_type!r}"
            )
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
        self.register_to_config(prediction_type=prediction_type)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    def check_inputs(self, num_frames: int, height: int, width: int, num_inference_steps: int) -> None:
        _, ph, pw = self.patch_size
        for name, value, mult in (("height", height, ph), ("width", width, pw)):
            if not isinstance(value, int) or value < mult or value % mult:
                raise ValueError(
                    f"{name}={value!r} is not possible for the tiny model: use a positive multiple of {mult} "
                    "(the transformer's patch size), e.g. 64"
                )
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive int, e.g. 9")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int, e.g. 20")

    def encode_prompt(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negative_prompt = ""
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one per prompt"
            )
        dtype = self.transformer.dtype
        pos = self.text_encoder.encode(prompts, device).to(dtype)
        neg = self.text_encoder.encode(negatives, device).to(dtype)
        return pos, neg

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 9,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> TinyVideoPipelineOutput | tuple:
        """Generate videos of ``num_frames x height x width`` (height/width multiples of 4).

        Returns:
            :class:`TinyVideoPipelineOutput` (or ``(frames,)``); see its docstring for the layouts.
        """
        self.check_inputs(num_frames, height, width, num_inference_steps)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; choose 'np', 'pt' or 'latent'")
        device = self._execution_device
        self._interrupt = False
        self._current_timestep = None

        prompt_embeds, negative_embeds = self.encode_prompt(prompt, negative_prompt, device)
        if num_videos_per_prompt > 1:
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, 0)
            negative_embeds = negative_embeds.repeat_interleave(num_videos_per_prompt, 0)
        batch = prompt_embeds.shape[0]
        do_cfg = guidance_scale > 1.0
        dtype = self.transformer.dtype

        shape = (batch, self.transformer.config.out_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    continue
                self._current_timestep = t
                x = with_position_channels(latents, self.transformer.config.in_channels).to(dtype)
                timestep = t.expand(batch)
                ctx = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
                with self.transformer.cache_context("cond", **ctx):
                    v = self.transformer(
                        hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs, return_dict=False,
                    )[0]
                if do_cfg:
                    with self.transformer.cache_context("uncond", **ctx):
                        v_uncond = self.transformer(
                            hidden_states=x, timestep=timestep, encoder_hidden_states=negative_embeds,
                            attention_kwargs=attention_kwargs, return_dict=False,
                        )[0]
                    v = v_uncond + guidance_scale * (v - v_uncond)
                if self.config.prediction_type == "sample":
                    # guidance is affine, so guiding x0 predictions equals guiding the velocities
                    v = (latents - v.float()) / float(self.scheduler.sigmas[i])
                latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    # locals() inside a comprehension is the comprehension's own scope: take it here.
                    scope = locals()
                    values = {k: scope[k] for k in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, values).pop("latents", latents)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            frames: Any = latents
        else:
            video = ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
            frames = video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return TinyVideoPipelineOutput(frames=frames)




def build_tiny_pipeline(
    seed: int = 0, prediction_type: str = "sample", **transformer_overrides: Any
) -> TinyVideoPipeline:
    """A freshly initialised (untrained) tiny pipeline; ``scripts/train_tiny.py`` trains it."""
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **transformer_overrides})
    text_encoder = TinyTextEncoder(out_dim=transformer.config.text_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)
    return TinyVideoPipeline(
        transformer=transformer, text_encoder=text_encoder, scheduler=scheduler, prediction_type=prediction_type
    )


def tiny_asset_dir() -> Path:
    """Folder of the shipped tiny model (``save_pretrained`` layout)."""
    return Path(__file__).resolve().parents[2] / "assets" / "tiny"


def _model_index_class(folder: Path) -> str | None:
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    with open(index) as fh:
        return json.load(fh).get("_class_name")


def _dtype_kwarg() -> str:
    # newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` and warn on the old name
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(
    model: str | os.PathLike = "tiny",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> DiffusionPipeline:
    """Load ``"tiny"`` (the shipped model), a local Diffusers folder or a hub id.

    Folders saved from :class:`TinyVideoPipeline` load as one; anything else goes through
    ``DiffusionPipeline.from_pretrained`` (a local folder never touches the network).

    Args:
        model: ``"tiny"``, a folder with ``model_index.json``, or a hub id (``org/name``).
        dtype: weights dtype (default: the checkpoint's; float32 for ``tiny``).
        device: where to put the pipeline (default: stay on CPU).
        **kwargs: passed to ``from_pretrained``.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'tiny', a folder or a hub id, got {type(model).__name__}")
    name = os.fspath(model)
    folder = tiny_asset_dir() if name == "tiny" else Path(name).expanduser()
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    if name == "tiny" or folder.is_dir():
        if not (folder / "model_index.json").is_file():
            hint = (
                "the package was installed without its assets; reinstall diffattn"
                if name == "tiny"
                else "point --model at a folder written by save_pretrained"
            )
            raise FileNotFoundError(f"model={name!r}: {folder} has no model_index.json ({hint})")
        cls = TinyVideoPipeline if _model_index_class(folder) == TinyVideoPipeline.__name__ else DiffusionPipeline
        pipe = cls.from_pretrained(folder, **kwargs)
    else:
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise FileNotFoundError(
                f"model={name!r} is neither an existing folder nor a hub id (org/name); check the path"
            )
        pipe = DiffusionPipeline.from_pretrained(name, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
