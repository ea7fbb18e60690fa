"""FateZero: zero-shot text-driven video editing by fusing inverted attention maps.

Qi et al., "FateZero: Fusing Attentions for Zero-shot Text-based Video Editing", arXiv 2303.09535;
official code ChenyangQiQi/FateZero. Built on any Stable Diffusion 1.x/2.x (epsilon-prediction)
UNet: the frames of the clip are processed as one batch, with spatial-temporal self-attention tying
them together (:mod:`diffattn.processors.fatezero`).

1. :meth:`FateZeroPipeline.invert`: encode the frames, DDIM-invert them with the source prompt (no
   guidance) and keep every attention map of the layers with at most ``max_query_tokens`` queries,
   fp16 on the CPU by default. The size is computed before the first step, reported (log and progress
   bar) and checked against ``store_budget_bytes``.
2. :meth:`FateZeroPipeline.edit`: denoise the inverted latents with the target prompt and guidance,
   fusing the stored maps (reverse step order) into the conditional half of the batch.

Attention runs **dense** in both stages, explicitly (``softmax(q k^T) v`` in fp32): the maps must be
materialised to be stored and fused. Sparse processors installed with ``diffattn.apply`` are set
aside for the call and restored afterwards; expect the memory and time of dense attention.

Example on a real checkpoint (needs the weights and a GPU; not run in tests)::

    import torch
    from diffusers import StableDiffusionPipeline
    from diffattn.pipelines import FateZeroPipeline

    sd = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", torch_dtype=torch.float16)
    pipe = FateZeroPipeline.from_pipe(sd).to("cuda")
    out = pipe(
        "car-turn.mp4",                       # or a list of PIL images / HxWx3 uint8 arrays
        source_prompt="a silver jeep driving down a curvy road in the countryside",
        target_prompt="a silver porsche driving down a curvy road in the countryside",
        height=512, width=512, max_frames=8,
        num_inference_steps=50, guidance_scale=7.5,
        blend_words=("jeep",), self_replace_steps=0.8, cross_replace_steps=0.8,
        output_path="jeep_porsche.mp4", fps=8,
    )
    out.frames[0].save("first_frame.png")
    print(out.inversion.store_plan.describe())   # what the inversion stored
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .._extras import need

need("transformers", "edit", "FateZeroPipeline")
from transformers import PreTrainedTokenizerBase  # noqa: E402  (after the one-line missing-extra check)

from ..processors.api import denoising_step, install_processors, restore_processors
from ..processors.fatezero import (
    AttentionStore,
    EditPlan,
    FateZeroConfig,
    FateZeroState,
    StoredLayer,
    cross_alpha,
    fatezero_processors,
    refine_mapper,
    step_range,
    word_swap_mapper,
    word_token_indices,
)
from .video_io import write_video

__all__ = ["FateZeroPipeline", "FateZeroInversion", "FateZeroOutput", "StorePlan", "write_video"]

logger = logging.getLogger(__name__)

VideoInput = Union[str, os.PathLike, Sequence[Any], np.ndarray]
_STORE_FIELDS = ("max_query_tokens", "frame_refs", "temporal_min_channels")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@dataclass
class StorePlan:
    """What the inversion will store: one row per stored layer (maps ``[F, heads, queries, keys]``)."""

    layers: list[StoredLayer]
    num_frames: int
    num_steps: int
    itemsize: int

    @property
    def bytes_per_step(self) -> int:
        return sum(self.num_frames * l.heads * l.queries * l.keys for l in self.layers) * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_step * self.num_steps

    def describe(self) -> str:
        n_cross = sum(l.is_cross for l in self.layers)
        return (
            f"{_fmt_bytes(self.total_bytes)} of attention maps: {self.num_steps} steps x "
            f"{_fmt_bytes(self.bytes_per_step)} ({len(self.layers) - n_cross} self + {n_cross} cross "
            f"layers, {self.num_frames} frames)"
        )


@dataclass
class FateZeroInversion:
    """Result of :meth:`FateZeroPipeline.invert`, reusable for several edits.

    Attributes:
        latents: the inverted latents ``[F, C, h, w]`` (edit starting point).
        trajectory: latents after each inversion step (on CPU), ``trajectory[0]`` = encoded frames.
        store: the stored attention maps.
        store_plan: the size computed before the inversion.
        source_prompt, source_ids: the source prompt and its unpadded token ids (None without tokenizer).
        source_embeds: ``[1, T, D]`` source prompt embeddings.
        timesteps: the DDIM timesteps (descending, as the edit runs them).
        config: the config the maps were stored with.
    """

    latents: torch.Tensor
    trajectory: list[torch.Tensor]
    store: AttentionStore
    store_plan: StorePlan
    source_prompt: Optional[str]
    source_ids: Optional[list[int]]
    source_embeds: torch.Tensor
    timesteps: torch.Tensor
    config: FateZeroConfig

    @property
    def num_frames(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclass
class FateZeroOutput(BaseOutput):
    """``frames``: list of PIL images, ``uint8 [F, H, W, 3]`` or latents; ``video_path``: the mp4 if written."""

    frames: Any
    video_path: Optional[str]
    inversion: FateZeroInversion


class FateZeroPipeline(DiffusionPipeline):
    """FateZero video editing on a Stable Diffusion UNet (see the module docstring for the method).

    Build it from any ``StableDiffusionPipeline``: ``FateZeroPipeline.from_pipe(sd_pipe)`` (components
    are shared, not copied). A non-DDIM scheduler is replaced by a DDIM one with the same config.
    ``tokenizer``/``text_encoder`` may be None: then give prompt embeddings and token indices.
    Attention runs dense (explicit fp32 softmax) during :meth:`invert` and :meth:`edit`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: Optional[torch.nn.Module],
        tokenizer: Optional[PreTrainedTokenizerBase],
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def size_multiple(self) -> int:
        """Frame height/width must be multiples of this (VAE factor x UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def load_video(
        self,
        video: VideoInput,
        height: Optional[int] = None,
        width: Optional[int] = None,
        max_frames: Optional[int] = None,
    ) -> torch.Tensor:
        """Frames as float ``[F, 3, H, W]`` in ``[-1, 1]``.

        Args:
            video: a video file path (read with imageio/ffmpeg), a list of PIL images or ``HxWx3``
                (or ``HxW``/``HxWx4``) arrays (uint8, or float in [0, 1]), or an array ``[F, H, W, 3]``.
            height, width: resize every frame to this size (both or neither).
            max_frames: keep the first ``max_frames`` frames.
        """
        from PIL import Image

        if isinstance(video, (str, os.PathLike)):
            path = Path(video)
            if not path.is_file():
                raise FileNotFoundError(f"video={str(video)!r}: no such file; give a video path or a list of frames")
            imageio = need("imageio.v2", "video")
            reader = imageio.get_reader(str(path))
            try:
                frames = []
                for frame in reader:
                    frames.append(np.asarray(frame))
                    if max_frames is not None and len(frames) >= max_frames:
                        break
            finally:
                reader.close()
        elif isinstance(video, np.ndarray) and video.ndim == 4:
            frames = list(video)
        elif isinstance(video, (list, tuple)):
            frames = list(video)
        else:
            raise TypeError(
                f"video of type {type(video).__name__}; give a file path, a list of PIL images/arrays or an "
                "array [F, H, W, 3]"
            )
        if max_frames is not None:
            frames = frames[:max_frames]
        if not frames:
            raise ValueError("video has no frames")
        if (height is None) != (width is None):
            raise ValueError(f"height={height}, width={width}: give both or neither")

        arrays = []
        for i, f in enumerate(frames):
            if isinstance(f, Image.Image):
                f = f.convert("RGB")
                if height is not None:
                    f = f.resize((width, height), Image.BICUBIC)
                a = np.asarray(f)
            else:
                a = np.asarray(f)
                if a.ndim == 2:
                    a = np.repeat(a[..., None], 3, axis=-1)
                if a.ndim != 3 or a.shape[-1] not in (3, 4):
                    raise ValueError(f"video frame {i} has shape {a.shape}; expected HxWx3 (RGB)")
                a = a[..., :3]
                if a.dtype != np.uint8:
                    if not np.issubdtype(a.dtype, np.floating):
                        raise TypeError(f"video frame {i} has dtype {a.dtype}; use uint8 or float in [0, 1]")
                    a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
                if height is not None and a.shape[:2] != (height, width):
                    a = np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC))
            arrays.append(a)
        size0 = arrays[0].shape[:2]
        for i, a in enumerate(arrays):
            if a.shape[:2] != size0:
                raise ValueError(
                    f"video frame {i} is {a.shape[1]}x{a.shape[0]} but frame 0 is {size0[1]}x{size0[0]}; "
                    "all frames must have one size (or pass height= and width= to resize)"
                )
        m = self.size_multiple
        if size0[0] % m or size0[1] % m:
            raise ValueError(
                f"frames are {size0[1]}x{size0[0]} (WxH); height and width must be multiples of {m} for this "
                "model: pass height= and width= to resize"
            )
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x

    def encode_prompt_embeds(
        self, prompt: Optional[str], prompt_embeds: Optional[torch.Tensor], what: str
    ) -> tuple[torch.Tensor, Optional[list[int]]]:
        """``([1, T, D] embeddings, unpadded token ids or None)`` for a prompt or given embeddings."""
        if prompt_embeds is not None:
            if prompt_embeds.ndim == 2:
                prompt_embeds = prompt_embeds[None]
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
                raise ValueError(f"{what}_embeds has shape {tuple(prompt_embeds.shape)}; expected [1, T, D]")
            ids = self.tokenizer(prompt).input_ids if (prompt is not None and self.tokenizer is not None) else None
            return prompt_embeds.to(self.device, self.unet.dtype), ids
        if prompt is None:
            raise ValueError(f"give {what} (a string) or {what}_embeds")
        if not isinstance(prompt, str):
            raise TypeError(f"{what}={prompt!r} must be one string (one video is edited at a time)")
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(f"this pipeline has no tokenizer/text encoder: pass {what}_embeds instead of {what}")
        tok = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            emb = self.text_encoder(tok.input_ids.to(self.device))[0]
        return emb.to(self.unet.dtype), self.tokenizer(prompt).input_ids

    def _progress(self, iterable, desc: str):
        """tqdm over ``iterable`` with the pipeline's progress-bar config (``set_progress_bar_config``)."""
        from tqdm.auto import tqdm

        options = {"desc": desc, **getattr(self, "_progress_bar_config", {})}
        return tqdm(iterable, **options)

    # ------------------------------------------------------------------------------------------ store
    def plan_store(
        self, num_frames: int, height: int, width: int, num_inference_steps: int,
        config: Optional[FateZeroConfig] = None, text_len: int = 77,
    ) -> StorePlan:
        """The stored layers and bytes for a clip of ``num_frames`` frames of ``height x width`` pixels."""
        config = config or FateZeroConfig()
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        n_down = len(self.unet.config.down_block_types)
        n_up = len(self.unet.config.up_block_types)
        num_refs = len(config.frame_refs)
        layers = []
        for proc_name in self.unet.attn_processors:
            name = proc_name[: -len(".processor")]
            parts = name.split(".")
            if parts[0] == "down_blocks":
                level = int(parts[1])
            elif parts[0] == "up_blocks":
                level = n_up - 1 - int(parts[1])
            elif parts[0] == "mid_block":
                level = n_down - 1
            else:
                raise ValueError(f"cannot place attention layer {name!r} in the UNet; FateZero needs a UNet2DConditionModel")
            h, w = latent
            for _ in range(level):
                h, w = -(-h // 2), -(-w // 2)
            module = self.unet.get_submodule(name)
            queries = h * w
            if queries > config.max_query_tokens:
                continue
            if module.is_cross_attention:
                keys = text_len
            else:
                keys = queries * (num_refs if module.inner_dim >= config.temporal_min_channels else 1)
            layers.append(StoredLayer(name, module.is_cross_attention, module.heads, queries, keys, (h, w)))
        itemsize = torch.empty((), dtype=config.torch_store_dtype).element_size()
        return StorePlan(layers, num_frames, num_inference_steps, itemsize)

    @contextmanager
    def _fusing(self, state: FateZeroState):
        """The FateZero processors on the UNet for a block, on diffattn's state and schedule; whatever
        was installed before (a ``diffattn.apply`` method) comes back after."""
        state.schedule = install_processors(self.unet, fatezero_processors(self.unet, state))
        try:
            yield
        finally:
            restore_processors(self.unet)
            state.schedule = None

    # ----------------------------------------------------------------------------------------- invert
    @torch.no_grad()
    def invert(
        self,
        video: VideoInput,
        source_prompt: Optional[str] = None,
        *,
        source_prompt_embeds: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        height: Optional[int] = None,
        width: Optional[int] = None,
        max_frames: Optional[int] = None,
        config: Optional[FateZeroConfig] = None,
        vae_batch_size: int = 8,
        generator: Optional[torch.Generator] = None,
        **config_kwargs: Any,
    ) -> FateZeroInversion:
        """DDIM-invert ``video`` with the source prompt, storing attention maps at every step.

        Frames are encoded with a sample of the VAE posterior (official; drawn from ``generator``), or
        its mean with ``encode_mean=True``. Each inversion step ``i`` runs
        the UNet at timestep ``timesteps[N-1-i]`` on the current latents with the source prompt only (no
        guidance) and applies the inverse DDIM update (eta = 0). Attention is dense. Raises
        ``ValueError`` before any UNet call when the store would exceed ``config.store_budget_bytes``.

        Args:
            video: see :meth:`load_video`.
            source_prompt / source_prompt_embeds: the prompt describing the input video.
            num_inference_steps: DDIM steps (the edit uses the same number).
            height, width, max_frames: see :meth:`load_video`.
            config: a :class:`FateZeroConfig`; ``config_kwargs`` override its fields.
            generator: draws the VAE posterior sample (unless ``encode_mean``).
        """
        config = _merge_config(config, config_kwargs)
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"scheduler prediction_type={self.scheduler.config.prediction_type!r}; FateZero inversion here "
                "supports epsilon-prediction models (SD 1.x, SD 2 base)"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: need >= 1")
        frames = self.load_video(video, height, width, max_frames)
        num_frames, _, height, width = frames.shape
        cond, source_ids = self.encode_prompt_embeds(source_prompt, source_prompt_embeds, "source_prompt")

        plan = self.plan_store(num_frames, height, width, num_inference_steps, config, text_len=cond.shape[1])
        logger.info("FateZero inversion will store %s", plan.describe())
        if plan.total_bytes > config.store_budget_bytes:
            raise ValueError(
                f"the inversion would store {plan.describe()}, over store_budget_bytes={config.store_budget_bytes} "
                f"({_fmt_bytes(config.store_budget_bytes)}); raise store_budget_bytes, or use fewer steps, frames "
                "or pixels, or a smaller max_query_tokens"
            )

        device, dtype = self.device, self.unet.dtype
        latents = []
        for i in range(0, num_frames, vae_batch_size):
            chunk = frames[i : i + vae_batch_size].to(device, self.vae.dtype)
            posterior = self.vae.encode(chunk).latent_dist
            latents.append(posterior.mean if config.encode_mean else posterior.sample(generator))
        z = torch.cat(latents).to(dtype) * self.vae.config.scaling_factor

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        alphas = self.scheduler.alphas_cumprod.to(device)
        final_alpha = torch.as_tensor(self.scheduler.final_alpha_cumprod, device=device)
        stride = self.scheduler.config.num_train_timesteps // num_inference_steps

        state = FateZeroState(config)
        state.num_frames = num_frames
        state.mode = "store"
        state.store = AttentionStore(dtype=config.torch_store_dtype, device=config.store_device)
        emb = cond.expand(num_frames, -1, -1)
        trajectory = [z.cpu()]
        with self._fusing(state):
            desc = f"FateZero inversion (storing {_fmt_bytes(plan.total_bytes)})"
            for i, t in enumerate(self._progress(list(reversed(timesteps)), desc)):
                with denoising_step(self.unet, i, num_inference_steps):
                    eps = self.unet(z, t, encoder_hidden_states=emb).sample
                prev_t = int(t) - stride
                a_prev = alphas[prev_t] if prev_t >= 0 else final_alpha
                a_t = alphas[int(t)]
                x0 = (z.float() - (1 - a_prev).sqrt() * eps.float()) / a_prev.sqrt()
                z = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps.float()).to(dtype)
                trajectory.append(z.cpu())
        return FateZeroInversion(
            latents=z, trajectory=trajectory, store=state.store, store_plan=plan, source_prompt=source_prompt,
            source_ids=source_ids, source_embeds=cond, timesteps=timesteps.clone(), config=config,
        )

    # ------------------------------------------------------------------------------------------- edit
    def edit_plan(
        self, inversion: FateZeroInversion, target_prompt: Optional[str], target_ids: Optional[list[int]],
        config: FateZeroConfig, text_len: int,
    ) -> EditPlan:
        """Step ranges, token mapping, equalizer and blend weights for one edit."""
        n = inversion.num_steps
        tokenizer = self.tokenizer
        source = inversion.source_prompt
        match = config.word_match
        word_steps = [
            (word_token_indices(target_prompt, [word], tokenizer, text_len, "cross_replace_word_steps", match), value)
            for word, value in config.cross_replace_word_steps
        ]
        plan = EditPlan(
            self_range=step_range(config.self_replace_steps, n),
            cross_alpha=cross_alpha(n, text_len, config.cross_replace_steps, word_steps),
            blend_threshold=config.blend_threshold,
            blend_tokens=config.blend_resolution**2,
            blend_layers=config.blend_layers,
        )
        have_words = tokenizer is not None and source is not None and target_prompt is not None
        mode = config.cross_mode
        if mode == "auto":
            same_words = not have_words or len(source.split(" ")) == len(target_prompt.strip().split(" "))
            mode = "replace" if same_words else "refine"
        if mode == "replace":
            plan.mapper = word_swap_mapper(
                source, target_prompt, tokenizer if have_words else None, text_len, config.realign_swapped_words
            )
        else:
            if inversion.source_ids is None or target_ids is None:
                raise ValueError(
                    "cross_mode='refine' aligns the prompts' tokens and needs a tokenizer and both prompts as "
                    "strings; use cross_mode='replace' (token i -> token i) with prompt embeddings"
                )
            plan.refine_index, plan.refine_keep = refine_mapper(inversion.source_ids, target_ids, text_len)
        if config.reweight_words:
            eq = torch.ones(text_len)
            for word, value in zip(config.reweight_words, config.reweight_values):
                idx = word_token_indices(target_prompt, [word], tokenizer, text_len, "reweight_words", match)
                eq[idx] = value
            plan.equalizer = eq
        def weights(prompt, words, what):
            w = torch.zeros(text_len)
            w[word_token_indices(prompt, words, tokenizer, text_len, what, match)] = 1.0
            return w

        if config.blend_words:
            plan.blend_weights = weights(source, config.blend_words, "blend_words")
        if config.blend_latents:
            if config.blend_words:
                plan.latent_source_weights = plan.blend_weights
            if config.blend_target_words:
                plan.latent_target_weights = weights(target_prompt, config.blend_target_words, "blend_target_words")
            plan.latent_range = (int(0.2 * n), int(0.8 * n))
        return plan

    @torch.no_grad()
    def edit(
        self,
        inversion: FateZeroInversion,
        target_prompt: Optional[str] = None,
        *,
        target_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 7.5,
        config: Optional[FateZeroConfig] = None,
        output_type: str = "pil",
        output_path: Optional[Union[str, os.PathLike]] = None,
        fps: float = 8,
        vae_batch_size: int = 8,
        **config_kwargs: Any,
    ) -> FateZeroOutput:
        """Denoise the inverted latents with the target prompt, fusing the stored attention.

        Edit step ``j`` reads inversion step ``N-1-j`` (same timestep). With guidance the UNet batch is
        ``[uncond frames, cond frames]`` and only the conditional half is fused. Attention is dense.

        Args:
            inversion: from :meth:`invert`.
            target_prompt / target_prompt_embeds: the edit prompt.
            negative_prompt / negative_prompt_embeds: the unconditional prompt for guidance.
            guidance_scale: classifier-free guidance (paper: 7.5); ``<= 1`` runs the target prompt alone.
            config: defaults to the inversion's; ``config_kwargs`` override its fields. The stored-map
                fields (``max_query_tokens``, ``frame_refs``, ``temporal_min_channels``) must match.
            output_type: ``"pil"`` (list of images), ``"np"`` (``uint8 [F, H, W, 3]``) or ``"latent"``
                (the final latents ``[F, C, h, w]``, not decoded).
            output_path: also write an mp4 there (atomically) at ``fps``.
        """
        config = _merge_config(config or inversion.config, config_kwargs)
        for name in _STORE_FIELDS:
            if getattr(config, name) != getattr(inversion.config, name):
                raise ValueError(
                    f"config.{name}={getattr(config, name)!r} differs from the inversion's "
                    f"{getattr(inversion.config, name)!r}; invert again to change it"
                )
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'pil', 'np' or 'latent'")
        if output_type == "latent" and output_path is not None:
            raise ValueError("output_path needs decoded frames; use output_type='pil' or 'np'")
        cond, target_ids = self.encode_prompt_embeds(target_prompt, target_prompt_embeds, "target_prompt")
        text_len = cond.shape[1]
        if text_len != inversion.source_embeds.shape[1]:
            raise ValueError(
                f"target prompt has {text_len} tokens but the source had {inversion.source_embeds.shape[1]}; "
                "encode both to the same length"
            )
        cfg = guidance_scale > 1.0
        num_frames = inversion.num_frames
        if cfg:
            if negative_prompt_embeds is None and (self.tokenizer is None or self.text_encoder is None):
                raise ValueError("guidance without a tokenizer needs negative_prompt_embeds")
            uncond, _ = self.encode_prompt_embeds(negative_prompt, negative_prompt_embeds, "negative_prompt")
            emb = torch.cat([uncond.expand(num_frames, -1, -1), cond.expand(num_frames, -1, -1)])
        else:
            emb = cond.expand(num_frames, -1, -1)

        state = FateZeroState(config)
        state.num_frames = num_frames
        state.mode = "edit"
        state.cfg = cfg
        state.store = inversion.store
        state.plan = self.edit_plan(inversion, target_prompt, target_ids, config, text_len)

        self.scheduler.set_timesteps(inversion.num_steps, device=self.device)
        if not torch.equal(self.scheduler.timesteps.cpu(), inversion.timesteps.cpu()):
            raise ValueError("the scheduler's timesteps differ from the inversion's; do not change the scheduler between invert and edit")
        z = inversion.latents.to(self.device, self.unet.dtype)
        with self._fusing(state):
            for j, t in enumerate(self._progress(self.scheduler.timesteps, "FateZero edit")):
                inp = torch.cat([z, z]) if cfg else z
                inp = self.scheduler.scale_model_input(inp, t)
                with denoising_step(self.unet, j, inversion.num_steps, "cond_uncond" if cfg else "cond"):
                    eps = self.unet(inp, t, encoder_hidden_states=emb).sample
                if cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                z = self.scheduler.step(eps, t, z, eta=0.0).prev_sample
                if state.plan.latent_range is not None:
                    z = state.blend_latents(z, inversion.trajectory[inversion.num_steps - j])

        if output_type == "latent":
            return FateZeroOutput(frames=z, video_path=None, inversion=inversion)
        video = self.decode(z, vae_batch_size)
        path = str(write_video(output_path, video, fps)) if output_path is not None else None
        if output_type == "pil":
            from PIL import Image

            frames = [Image.fromarray(f) for f in video]
        else:
            frames = video
        return FateZeroOutput(frames=frames, video_path=path, inversion=inversion)

    def decode(self, latents: torch.Tensor, vae_batch_size: int = 8) -> np.ndarray:
        """Latents ``[F, C, h, w]`` to ``uint8 [F, H, W, 3]``."""
        out = []
        with torch.no_grad():
            for i in range(0, latents.shape[0], vae_batch_size):
                chunk = latents[i : i + vae_batch_size].to(self.vae.dtype) / self.vae.config.scaling_factor
                out.append(self.vae.decode(chunk).sample.float())
        x = torch.cat(out).clamp(-1, 1)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------------------------------- call
    def __call__(
        self,
        video: VideoInput,
        source_prompt: Optional[str] = None,
        target_prompt: Optional[str] = None,
        *,
        source_prompt_embeds: Optional[torch.Tensor] = None,
        target_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt: str = "",
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        max_frames: Optional[int] = None,
        config: Optional[FateZeroConfig] = None,
        output_type: str = "pil",
        output_path: Optional[Union[str, os.PathLike]] = None,
        fps: float = 8,
        **config_kwargs: Any,
    ) -> FateZeroOutput:
        """Invert ``video`` with ``source_prompt`` and edit it with ``target_prompt``.

        ``config_kwargs`` are :class:`~diffattn.processors.fatezero.FateZeroConfig` fields
        (``self_replace_steps``, ``cross_replace_steps``, ``blend_words``, ``frame_refs``, ...).
        Attention runs dense. See :meth:`invert` and :meth:`edit`.
        """
        config = _merge_config(config, config_kwargs)
        inversion = self.invert(
            video, source_prompt, source_prompt_embeds=source_prompt_embeds, num_inference_steps=num_inference_steps,
            height=height, width=width, max_frames=max_frames, config=config,
        )
        return self.edit(
            inversion, target_prompt, target_prompt_embeds=target_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds, guidance_scale=guidance_scale, config=config,
            output_type=output_type, output_path=output_path, fps=fps,
        )


def _merge_config(config: Optional[FateZeroConfig], overrides: dict[str, Any]) -> FateZeroConfig:
    config = config or FateZeroConfig()
    if not isinstance(config, FateZeroConfig):
        raise TypeError(f"config={config!r} must be a FateZeroConfig")
    if overrides:
        known = {f.name for f in dataclasses.fields(FateZeroConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown argument(s) {unknown}; FateZeroConfig fields are {sorted(known)}")
        config = config.replace(**overrides)
    return config
