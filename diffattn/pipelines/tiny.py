"""The embedded tiny video model: a small Wan DiT trained on videos of moving coloured shapes.

Every method needs a real, trained attention pattern to be measured on, offline and in seconds on a
CPU. This module holds the three pieces that make one:

* a procedural data set — one shape (circle, square, triangle) of one colour moving left, right, up
  or down over a plain background, described by a short prompt such as
  ``"a red circle moving left on a blue background"`` (:func:`random_scenes`, :func:`render_videos`);
* :class:`TinyTextEncoder`, a word-level encoder (own vocabulary, no tokenizer download; unknown
  words map to ``<unk>``; a GRU over the sentence plus each word's own embedding) trained together
  with the transformer;
* :class:`TinyVideoPipeline`, a :class:`~diffusers.DiffusionPipeline` around Diffusers' own
  :class:`~diffusers.WanTransformer3DModel` working directly in pixel space (3 channels, patch
  ``(1, 4, 4)``: 9 frames of 64x64 px are a 9x16x16 grid of 2304 video tokens, head dim 32), sampled
  with flow matching and :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, classifier-free guidance
  done as two transformer calls per step (cond, uncond) exactly as ``WanPipeline`` does. The shipped
  transformer predicts the clean video (``prediction_type="sample"``), which the pipeline turns into
  the flow velocity ``(x - x0) / sigma`` for the scheduler: a model this narrow cannot carry the
  input noise through its 64 channels, which predicting the velocity ``noise - x0`` would require.

The weights ship in ``diffattn/assets/tiny`` (``save_pretrained`` layout) and are produced by
``scripts/train_tiny.py``.

>>> from diffattn.pipelines.tiny import load_pipeline  # doctest: +SKIP
>>> pipe = load_pipeline("tiny")  # doctest: +SKIP
>>> video = pipe("a red circle moving left on a blue background", generator=torch.Generator().manual_seed(0)).frames[0]  # doctest: +SKIP
>>> video.shape  # doctest: +SKIP
(9, 64, 64, 3)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

__all__ = [
    "COLORS",
    "SHAPES",
    "DIRECTIONS",
    "Scene",
    "random_scenes",
    "render_videos",
    "scene_prompt",
    "parse_prompt",
    "measure_motion",
    "TinyTextEncoder",
    "TinyVideoPipeline",
    "TinyVideoPipelineOutput",
    "build_tiny_pipeline",
    "tiny_asset_dir",
    "load_pipeline",
]

# -------------------------------------------------------------------------------------- the data set
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# (dx, dy) per frame in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

VOCAB: tuple[str, ...] = (
    "<pad>", "<unk>", "a", "an", "the", *COLORS, *SHAPES, *DIRECTIONS,
    "moving", "moves", "going", "on", "over", "in", "front", "of", "background", "and", "with",
)  # fmt: skip


@dataclass(frozen=True)
class Scene:
    """One video of the data set.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: shape colour, a key of :data:`COLORS`.
        background: background colour, a key of :data:`COLORS` (different from ``color``).
        direction: a key of :data:`DIRECTIONS`.
        x, y: centre of the shape at frame 0, in pixels.
        radius: half the shape's extent, in pixels.
        speed: pixels travelled per frame.
    """

    shape: str
    color: str
    background: str
    direction: str
    x: float
    y: float
    radius: float
    speed: float


def scene_prompt(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} moving {scene.direction} on a {scene.background} background"


def parse_prompt(prompt: str) -> dict[str, str]:
    """The shape/colour/background/direction words a prompt names (what the model was trained on).

    The first colour word before the shape is the shape's colour; a colour word followed by
    ``background`` is the background. Missing entries are left out.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    found: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in COLORS:
            if i + 1 < len(words) and words[i + 1] == "background":
                found.setdefault("background", w)
            else:
                found.setdefault("color", w)
        elif w in SHAPES:
            found.setdefault("shape", w)
        elif w in DIRECTIONS:
            found.setdefault("direction", w)
    return found


def measure_motion(video: np.ndarray | torch.Tensor, prompt: str) -> dict[str, Any]:
    """How the prompted shape moves in ``video`` (``[F, H, W, 3]`` in [0, 1], e.g. a pipeline output).

    The shape is found by projecting each pixel onto the line from the prompt's background colour to its
    shape colour (so anti-aliased edges count by their coverage); its per-frame centroid gives a fitted
    speed along the prompt's direction and across it, in pixels per frame (positive = the prompted way).

    Returns:
        ``{"centroids": [F, 2] (x, y), "speed": along the direction, "drift": across it}``; the speeds
        are None when the prompt does not name a colour, a background and a direction.
    """
    frames = torch.as_tensor(np.asarray(video), dtype=torch.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video must be [frames, height, width, 3], got shape {tuple(frames.shape)}")
    words = parse_prompt(prompt)
    if not {"color", "background", "direction"} <= set(words):
        return {"centroids": None, "speed": None, "drift": None}
    fg = torch.tensor(COLORS[words["color"]], dtype=torch.float32) / 255
    bg = torch.tensor(COLORS[words["background"]], dtype=torch.float32) / 255
    d = fg - bg
    cover = (((frames - bg) @ d) / (d @ d)).clamp(0, 1)  # [F, H, W]
    ys = torch.arange(frames.shape[1], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(frames.shape[2], dtype=torch.float32).view(1, 1, -1)
    mass = cover.sum((1, 2)).clamp(min=1e-6)
    cent = torch.stack([(cover * xs).sum((1, 2)) / mass, (cover * ys).sum((1, 2)) / mass], dim=1)  # [F, 2]
    along = torch.tensor(DIRECTIONS[words["direction"]], dtype=torch.float32)
    across = along.flip(0)
    t = torch.arange(len(cent), dtype=torch.float32)
    t = t - t.mean()

    def slope(v: torch.Tensor) -> float:
        return float((t * (v - v.mean())).sum() / (t * t).sum()) if len(v) > 1 else 0.0

    return {"centroids": cent.numpy(), "speed": slope(cent @ along), "drift": slope(cent @ across)}


def random_scenes(
    n: int,
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    radius: tuple[float, float] = (0.15, 0.19),
    jitter: float = 1.0,
    directions: Sequence[str] | None = None,
) -> list[Scene]:
    """``n`` random scenes whose whole trajectory over ``num_frames`` stays inside the frame.

    ``radius`` is the range of the shape's half-extent as a fraction of the smaller side. ``jitter``
    is the share of the free room the start position is drawn from, around the placement that centres
    the trajectory in the frame: 1 uses all of it, 0 always centres it (the prompt then fixes where the
    shape is, which a small model learns far faster than choosing a position itself).
    ``directions`` restricts the motion to some keys of :data:`DIRECTIONS` (default: all).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    directions = list(DIRECTIONS) if directions is None else list(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"directions must be a non-empty subset of {list(DIRECTIONS)}, got {directions}")
    g = generator

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def choice(seq: Sequence[str]) -> str:
        return seq[int(torch.randint(len(seq), (), generator=g))]

    radius_range = radius
    colors = list(COLORS)
    scenes = []
    for _ in range(n):
        color = choice(colors)
        background = choice([c for c in colors if c != color])
        direction = choice(directions)
        dx, dy = DIRECTIONS[direction]
        radius = uniform(*radius_range) * min(height, width)
        along = width if dx else height
        room = max(along - 2 * radius - 2, 0.0)
        speed = min(uniform(0.045, 0.055) * along, room / max(num_frames - 1, 1))
        travel = speed * (num_frames - 1)
        # start so that the end of the trajectory is inside too
        lo_along, hi_along = radius + 1, along - radius - 1 - travel
        start_along = _around_middle(lo_along, max(hi_along, lo_along), jitter, uniform)
        if dx < 0 or dy < 0:
            start_along = along - start_along
        across = height if dx else width
        start_across = _around_middle(radius + 1, across - radius - 1, jitter, uniform)
        x, y = (start_along, start_across) if dx else (start_across, start_along)
        scenes.append(Scene(choice(list(SHAPES)), color, background, direction, x, y, radius, speed))
    return scenes


def _around_middle(lo: float, hi: float, jitter: float, uniform: Callable[[float, float], float]) -> float:
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * jitter
    return uniform(mid - half, mid + half)


def render_videos(
    scenes: Sequence[Scene], num_frames: int, height: int, width: int, supersample: int = 4
) -> torch.Tensor:
    """Anti-aliased videos of ``scenes``: float32 ``[B, 3, num_frames, height, width]`` in [0, 1]."""
    ss = supersample
    b = len(scenes)
    ys = (torch.arange(height * ss, dtype=torch.float32) + 0.5) / ss
    xs = (torch.arange(width * ss, dtype=torch.float32) + 0.5) / ss
    yy, xx = ys.view(1, 1, -1, 1), xs.view(1, 1, 1, -1)
    f = torch.arange(num_frames, dtype=torch.float32).view(1, -1, 1, 1)

    def per_scene(fn: Callable[[Scene], float]) -> torch.Tensor:
        return torch.tensor([fn(s) for s in scenes], dtype=torch.float32).view(b, 1, 1, 1)

    cx = per_scene(lambda s: s.x) + per_scene(lambda s: DIRECTIONS[s.direction][0] * s.speed) * f
    cy = per_scene(lambda s: s.y) + per_scene(lambda s: DIRECTIONS[s.direction][1] * s.speed) * f
    r = per_scene(lambda s: s.radius)
    ux, uy = xx - cx, yy - cy  # [B, F, H*ss, W*ss]
    circle = ux**2 + uy**2 <= r**2
    # squares and triangles are sized to cover about the area of the circle of the same radius
    side = 0.89 * r
    square = (ux.abs() <= side) & (uy.abs() <= side)
    big = 1.3 * r  # circumradius of an upward equilateral triangle centred on its centroid
    depth = uy + big  # distance below the apex
    triangle = (uy <= big / 2) & (depth >= 0) & (ux.abs() <= depth / math.sqrt(3))
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes]).view(b, 1, 1, 1)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    cover = F.avg_pool2d(mask.view(b * num_frames, 1, height * ss, width * ss), ss)
    cover = cover.view(b, 1, num_frames, height, width)
    fg = torch.tensor([COLORS[s.color] for s in scenes], dtype=torch.float32).view(b, 3, 1, 1, 1) / 255
    bg = torch.tensor([COLORS[s.background] for s in scenes], dtype=torch.float32).view(b, 3, 1, 1, 1) / 255
    return bg + (fg - bg) * cover


# -------------------------------------------------------------------------------------- text encoder
class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Word-level prompt encoder: embedding + bidirectional GRU + projection (+ each word's own embedding).

    Prompts are lower-cased and split into words; words outside ``vocab`` become ``<unk>``; at most
    ``max_length`` words are kept. Like Wan's T5 embeddings, positions past the prompt are zeros, so
    the empty prompt (the unconditional branch) is all zeros.

    Args:
        vocab: the words, ``vocab[0] == "<pad>"`` and ``vocab[1] == "<unk>"``.
        max_length: number of text tokens the transformer sees.
        embed_dim: word embedding width.
        hidden_dim: GRU width per direction.
        out_dim: output width (the transformer's ``text_dim``).
        word_skip: also add a per-word embedding straight to each output position, so every token keeps
            its word's identity however the GRU mixes the sentence (the transformer's cross-attention can
            then find e.g. the direction word by itself).
    """

    @register_to_config
    def __init__(
        self,
        vocab: list[str] = list(VOCAB),
        max_length: int = 16,
        embed_dim: int = 64,
        hidden_dim: int = 64,
        out_dim: int = 64,
        word_skip: bool = False,
    ) -> None:
        super().__init__()
        if list(vocab[:2]) != ["<pad>", "<unk>"]:
            raise ValueError(f"vocab must start with '<pad>', '<unk>', got {list(vocab[:2])}")
        self._index = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), embed_dim, padding_idx=0)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.word = nn.Embedding(len(vocab), out_dim, padding_idx=0) if word_skip else None

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, max_length]`` (int64, 0 = padding) and lengths ``[B]``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
            words = re.findall(r"[a-z]+", prompt.lower())[:length]
            ids[row, : len(words)] = torch.tensor([self._index.get(w, 1) for w in words], dtype=torch.long)
            lengths[row] = len(words)
        return ids, lengths

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, max_length, out_dim]`` for ``ids`` ``[B, max_length]``; zeros past ``lengths``."""
        b, n = ids.shape
        out = torch.zeros(b, n, self.config.out_dim, dtype=self.proj.weight.dtype, device=ids.device)
        keep = lengths > 0
        if keep.any():
            x = self.embed(ids[keep])
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths[keep].cpu(), batch_first=True, enforce_sorted=False
            )
            h, _ = self.rnn(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=n)
            h = self.norm(self.proj(h))
            if self.word is not None:
                h = h + self.word(ids[keep])
            valid = torch.arange(n, device=ids.device)[None, :] < lengths[keep].to(ids.device)[:, None]
            out[keep] = h * valid[..., None]
        return out

    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        ids, lengths = self.tokenize(prompts)
        return self(ids.to(device or self.device), lengths)


# -------------------------------------------------------------------------------------------- pipeline
@dataclass
class TinyVideoPipelineOutput(BaseOutput):
    """``frames``: ``np.ndarray`` float32 ``[B, F, H, W, 3]`` in [0, 1] (``output_type="np"``), a tensor
    ``[B, F, 3, H, W]`` (``"pt"``), or the raw pixel-space sample ``[B, 3, F, H, W]`` in [-1, 1]
    (``"latent"``)."""

    frames: Any


# "velocity": the transformer predicts noise - x0 (flow matching); "sample": it predicts x0.
PREDICTION_TYPES = ("velocity", "sample")
POSITION_CHANNELS = 3


def position_channels(
    batch: int, frames: int, height: int, width: int, device=None, origin: torch.Tensor | None = None
) -> torch.Tensor:
    """Absolute position of every pixel, ``[B, 3, F, H, W]``: frame offset from the clip's middle (in units
    of 4 frames), then y and x in [-1, 1].

    Wan's transformer only knows relative positions (RoPE) and its patch embedding has no padding, so on
    its own it cannot tell the centre of the frame from an edge; the tiny model gets these as extra
    input channels (its ``in_channels`` is ``out_channels + 3``). ``origin`` (``[B, 2]``, (y, x) in the
    same units) moves each video's coordinate origin there from the frame centre; training uses it to
    tell the model where a translated scene is centred.
    """
    t = (torch.arange(frames, dtype=torch.float32, device=device) - (frames - 1) / 2) / 4
    y = pixel_to_position(torch.arange(height, dtype=torch.float32, device=device) + 0.5, height)
    x = pixel_to_position(torch.arange(width, dtype=torch.float32, device=device) + 0.5, width)
    grid = torch.stack(torch.meshgrid(t, y, x, indexing="ij"))  # [3, F, H, W]
    grid = grid.unsqueeze(0).expand(batch, -1, -1, -1, -1)
    if origin is None:
        return grid
    if tuple(origin.shape) != (batch, 2):
        raise ValueError(f"origin must have shape ({batch}, 2), got {tuple(origin.shape)}")
    shift = torch.zeros(batch, 3, 1, 1, 1, dtype=grid.dtype, device=grid.device)
    shift[:, 1:] = origin.to(grid).view(batch, 2, 1, 1, 1)
    return grid - shift


def pixel_to_position(coordinate, size: int):
    """The y/x position-channel value at ``coordinate`` pixels (a float or tensor; pixel ``i`` is centred at
    ``i + 0.5``): -1 at the first pixel's centre, 1 at the last one's."""
    return -1 + 2 * (coordinate - 0.5) / (size - 1)


def with_position_channels(
    latents: torch.Tensor, in_channels: int, origin: torch.Tensor | None = None
) -> torch.Tensor:
    """The transformer input: ``latents`` plus :func:`position_channels` when the model takes them."""
    extra = in_channels - latents.shape[1]
    if extra == 0:
        return latents
    if extra != POSITION_CHANNELS:
        raise ValueError(
            f"the transformer takes {in_channels} input channels for {latents.shape[1]} latent channels; "
            f"expected equal counts or {POSITION_CHANNELS} position channels more"
        )
    b, _, f, h, w = latents.shape
    pos = position_channels(b, f, h, w, latents.device, origin=origin)
    return torch.cat([latents, pos.to(latents.dtype)], dim=1)


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


# ------------------------------------------------------------------------------------ build and load
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 6,  # 3 colour channels + position_channels()
    "out_channels": 3,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
TINY_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


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
    return Path(__file__).resolve().parent.parent / "assets" / "tiny"


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
