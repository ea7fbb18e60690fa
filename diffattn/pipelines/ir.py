"""IR-Diffusion pipeline: consistent subjects across images with isolation and reposition attention.

Wraps any ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (SD 1.x / 2.x / SDXL / playground-v2.5
UNets). One call generates, in a single batch, one reference image per subject (each with its own
prompt) and the target image (combined prompt); the target's self-attention reads the references
through :class:`diffattn.processors.ir.IRAttnProcessor` (algorithm and region rules there).

Subject regions come from, per side (target / references):

1. boxes (normalised xyxy) or masks given by the user, or
2. a first, plain pass over the same batch and initial noise that averages the cross-attention maps of
   each subject's words (coarse layers, all steps or ``region_steps``), normalises each map to [0, 1]
   and keeps cells ``>= region_threshold``; target cells claimed by several subjects go to the subject
   with the stronger map, so derived target regions are disjoint. No external model is needed.

Words are found in the prompts with the pipeline's tokenizer; without a tokenizer, give token indices.

>>> from diffattn.pipelines.tiny_sd import tiny_sd_pipeline
>>> from diffattn.pipelines.ir import IRDiffusionPipeline
>>> ir = IRDiffusionPipeline(tiny_sd_pipeline())
>>> out = ir(["a photo of a dog", "a photo of a boy"], "a dog and a boy on the beach",
...          boxes=[(0.0, 0.3, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)], subject_words=["dog", "boy"],
...          num_inference_steps=2, output_type="pt")
>>> out.images.shape, out.reference_images.shape
(torch.Size([1, 3, 32, 32]), torch.Size([2, 3, 32, 32]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..processors.ir import IRAttention, IRConfig, IRRegions, check_box
from ..processors.tokens import word_token_indices

__all__ = ["IRDiffusionPipeline", "IRDiffusionOutput", "find_token_indices"]


@dataclass
class IRDiffusionOutput:
    """Result of :class:`IRDiffusionPipeline`.

    Attributes:
        images: the target image(s) (one), in the requested ``output_type`` (list of PIL, array, tensor).
        reference_images: the reference images, one per subject, in subject order.
        regions: the :class:`IRRegions` used (given or derived).
        subject_maps: when regions were derived, ``{"target": [n, h, w], "reference": [n, h, w]}`` the
            normalised cross-attention maps on the latent grid (``None`` entries where not derived).
        records: captured attention records (only with ``capture=True``).
    """

    images: Any
    reference_images: Any
    regions: IRRegions
    subject_maps: dict = field(default_factory=dict)
    records: list = field(default_factory=list)


def find_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (position 0 is the start token).

    Every occurrence counts. Raises ``ValueError`` listing the prompt's tokens if ``word`` is absent or
    lies beyond the tokenizer's length limit.
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"subject word {word!r} must be a non-empty string")
    limit = getattr(tokenizer, "model_max_length", 77)
    return word_token_indices(prompt, [word], tokenizer, limit, "subject word", match="tokens")


def _check_indices(indices: Any, n: int, limit: int, name: str) -> list[list[int]]:
    if not isinstance(indices, (list, tuple)) or len(indices) != n:
        raise ValueError(
            f"{name} must be a list of {n} lists of token positions (one per subject), got {indices!r}"
        )
    out = []
    for i, idx in enumerate(indices):
        idx = [idx] if isinstance(idx, int) else idx
        if not isinstance(idx, (list, tuple)) or not idx:
            raise ValueError(f"{name}[{i}]={idx!r} must be a non-empty list of token positions")
        for t in idx:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 < t < limit:
                raise ValueError(
                    f"{name}[{i}] has position {t!r}; positions are ints in [1, {limit - 1}] "
                    "(0 is the start token)"
                )
        out.append(list(idx))
    return out


def _normalise(m: torch.Tensor) -> torch.Tensor:
    lo = m.flatten(-2).min(-1).values[..., None, None]
    hi = m.flatten(-2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-12)


class IRDiffusionPipeline:
    """Multi-subject consistent generation (IR-Diffusion) on a Stable Diffusion / SDXL pipeline.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (or any pipeline with
            ``unet``, ``vae``, ``scheduler`` whose ``__call__`` takes ``prompt`` lists, ``latents``
            and ``callback_on_step_end``). The pipeline is used as is; processors are installed only
            during a call and the originals restored afterwards.
    """

    def __init__(self, pipe) -> None:
        for attr in ("unet", "vae", "scheduler"):
            if getattr(pipe, attr, None) is None:
                raise TypeError(
                    f"IRDiffusionPipeline needs a Stable Diffusion (1.x/2.x/XL) pipeline with .{attr}; "
                    f"got {type(pipe).__name__}"
                )
        self.pipe = pipe

    @classmethod
    def from_pipe(cls, pipe) -> "IRDiffusionPipeline":
        return cls(pipe)

    # ------------------------------------------------------------------------------------------ call
    def __call__(
        self,
        subject_prompts: Sequence[str] | None,
        prompt: str | None,
        *,
        boxes: Sequence | None = None,
        masks: Sequence | None = None,
        reference_boxes: Sequence | None = None,
        reference_masks: Sequence | None = None,
        subject_words: Sequence[str] | None = None,
        subject_token_indices: Sequence | None = None,
        reference_token_indices: Sequence | None = None,
        config: IRConfig | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        region_threshold: float = 0.5,
        region_steps: int | None = None,
        max_map_tokens: int = 32 * 32,
        output_type: str = "pil",
        capture: bool = False,
        **pipe_kwargs: Any,
    ) -> IRDiffusionOutput:
        """Generate the references and the target.

        Args:
            subject_prompts: one prompt per subject (its reference image), e.g. ``"a photo of a dog"``.
                May be ``None`` only with ``prompt_embeds`` (``[n+1, T, C]``, order refs…, target).
            prompt: the target prompt naming all subjects.
            boxes / masks: target subject regions (one per subject): normalised ``(x0, y0, x1, y1)``
                boxes or ``[H, W]`` masks in [0, 1]. ``None``: derived from cross-attention.
            reference_boxes / reference_masks: each subject's region in its reference image (same
                forms). ``None``: derived from cross-attention.
            subject_words: one word/phrase per subject, found in its reference prompt and in ``prompt``
                (needed to derive regions with a tokenizer).
            subject_token_indices: instead of words, per subject the token positions in ``prompt``.
            reference_token_indices: per subject the token positions in its reference prompt.
            config: :class:`IRConfig` (defaults: the official settings).
            num_inference_steps, guidance_scale, height, width, negative_prompt, generator: as in
                diffusers (official: 50 steps, CFG 7).
            latents: initial noise ``[n+1, C, h, w]`` (refs…, target); drawn from ``generator`` if None.
                Both passes start from it, so derived regions match the final images.
            region_threshold: threshold on the normalised cross-attention maps (derived regions).
            region_steps: run the region pass for only this many steps (faster; ``None`` = all).
            max_map_tokens: finest cross-attention layer (queries) averaged into the maps.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            capture: record attention probabilities of the final pass in ``records`` (inspection).
            pipe_kwargs: passed to the wrapped pipeline (e.g. ``prompt_embeds``, ``guidance_rescale``).
        """
        pipe = self.pipe
        if "num_images_per_prompt" in pipe_kwargs and pipe_kwargs["num_images_per_prompt"] != 1:
            raise ValueError(
                "num_images_per_prompt must be 1: the batch must stay [refs..., target]; call again "
                "with another generator/latents for more images"
            )
        pipe_kwargs.pop("num_images_per_prompt", None)
        for key in ("callback_on_step_end",):
            if key in pipe_kwargs:
                raise ValueError(f"{key} is used by IRDiffusionPipeline itself; it cannot be passed")
        embeds = pipe_kwargs.get("prompt_embeds")
        if subject_prompts is None or prompt is None:
            if embeds is None:
                raise ValueError("give subject_prompts (one per subject) and prompt, or prompt_embeds")
            n = embeds.shape[0] - 1
            prompts = None
        else:
            if isinstance(subject_prompts, str) or not all(isinstance(p, str) for p in subject_prompts):
                raise TypeError("subject_prompts must be a list of strings (one prompt per subject)")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            n = len(subject_prompts)
            prompts = list(subject_prompts) + [prompt]
            if embeds is not None:
                raise ValueError("give either prompts or prompt_embeds, not both")
        if n < 1:
            raise ValueError("IR-Diffusion needs at least one subject")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        if not 0.0 <= region_threshold <= 1.0:
            raise ValueError(f"region_threshold={region_threshold} must be in [0, 1]")
        if region_steps is not None and not 1 <= region_steps:
            raise ValueError(f"region_steps={region_steps} must be >= 1 (or None for all steps)")
        config = IRConfig() if config is None else config
        if not isinstance(config, IRConfig):
            raise TypeError(f"config must be an IRConfig, got {type(config).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator (the batch shares one noise draw)")

        target = self._user_regions(boxes, masks, n, "boxes", "masks")
        reference = self._user_regions(
            reference_boxes, reference_masks, n, "reference_boxes", "reference_masks"
        )

        unet = pipe.unet
        scale = pipe.vae_scale_factor
        height = height or unet.config.sample_size * scale
        width = width or unet.config.sample_size * scale
        if height % scale or width % scale:
            raise ValueError(f"height={height} and width={width} must be multiples of {scale}")
        shape = (n + 1, unet.config.in_channels, height // scale, width // scale)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32,
                                  device=generator.device if generator is not None else "cpu")
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; expected {shape} ({n} references + target)"
            )
        latents = latents.to(device=pipe.device, dtype=unet.dtype)
        cfg = guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None
        call = dict(
            prompt=prompts,
            negative_prompt=(
                None if negative_prompt is None or prompts is None else [negative_prompt] * (n + 1)
            ),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            **pipe_kwargs,
        )

        maps: dict = {}
        if target is None or reference is None:
            target_tokens, ref_tokens = self._tokens(
                prompts, n, subject_words, subject_token_indices, reference_token_indices,
                need_target=target is None, need_reference=reference is None,
            )
            derived_t, derived_r = self._derive_regions(
                call, latents, n, cfg, target_tokens, ref_tokens, region_threshold, region_steps,
                max_map_tokens, num_inference_steps,
            )
            maps = {"target": derived_t, "reference": derived_r}
            if target is None:
                target = self._disjoint_masks(derived_t, region_threshold)
            if reference is None:
                reference = []
                for d in derived_r:
                    m = d >= region_threshold
                    reference.append((m if m.any() else d == d.max()).float())
        regions = IRRegions(target=list(target), reference=list(reference))

        ir = IRAttention(unet, config, regions, capture=capture, scheduler=pipe.scheduler)
        with self._progress("IR-Diffusion"), ir:
            result = pipe(latents=latents.clone(), output_type=output_type, **call)
        images = result.images
        return IRDiffusionOutput(
            images=images[n:],
            reference_images=images[:n],
            regions=regions,
            subject_maps=maps,
            records=list(ir.state.records),
        )

    # ------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _user_regions(boxes, masks, n, box_name, mask_name):
        if boxes is not None and masks is not None:
            raise ValueError(f"give {box_name} or {mask_name} for a side, not both")
        given, name = (boxes, box_name) if boxes is not None else (masks, mask_name)
        if given is None:
            return None
        if isinstance(given, torch.Tensor) and given.ndim == 3 and name == mask_name:
            given = list(given)
        if not isinstance(given, (list, tuple)) or len(given) != n:
            count = len(given) if isinstance(given, (list, tuple)) else type(given).__name__
            raise ValueError(f"{name} has {count} entries but there are {n} subjects; give one per subject")
        if name == box_name:
            return [check_box(b, f"{box_name}[{i}]") for i, b in enumerate(given)]
        return list(given)

    def _tokens(self, prompts, n, words, target_idx, ref_idx, need_target, need_reference):
        tokenizer = getattr(self.pipe, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
        target_tokens = ref_tokens = None
        if need_target:
            if target_idx is not None:
                target_tokens = _check_indices(target_idx, n, limit, "subject_token_indices")
            elif words is not None and tokenizer is not None and prompts is not None:
                self._check_words(words, n)
                target_tokens = [find_token_indices(tokenizer, prompts[-1], w) for w in words]
            else:
                raise ValueError(
                    "target regions are needed: give boxes or masks, or subject_words (with a tokenizer "
                    "and prompts), or subject_token_indices"
                )
        if need_reference:
            if ref_idx is not None:
                ref_tokens = _check_indices(ref_idx, n, limit, "reference_token_indices")
            elif words is not None and tokenizer is not None and prompts is not None:
                self._check_words(words, n)
                ref_tokens = [find_token_indices(tokenizer, prompts[i], w) for i, w in enumerate(words)]
            else:
                raise ValueError(
                    "reference regions are needed: give reference_boxes or reference_masks, or "
                    "subject_words (with a tokenizer and prompts), or reference_token_indices"
                )
        return target_tokens, ref_tokens

    @staticmethod
    def _check_words(words, n):
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or len(words) != n:
            raise ValueError(f"subject_words must be a list of {n} words (one per subject), got {words!r}")

    def _derive_regions(self, call, latents, n, cfg, target_tokens, ref_tokens, threshold, region_steps,
                        max_map_tokens, num_steps):
        """Average subject-word cross-attention maps in a plain pass; return normalised maps."""
        cond = n + 1 if cfg else 0
        tokens: dict[int, list] = {}
        if ref_tokens is not None:
            for i in range(n):
                tokens[cond + i] = [ref_tokens[i]]
        if target_tokens is not None:
            tokens[cond + n] = target_tokens
        cap = IRAttention(self.pipe.unet, IRConfig(), None, subject_map_tokens=tokens,
                          max_map_tokens=max_map_tokens, scheduler=self.pipe.scheduler)
        stop = num_steps if region_steps is None else min(region_steps, num_steps)

        def interrupt(pipe, i, t, kwargs):
            if i + 1 >= stop:
                pipe._interrupt = True
            return {}

        with self._progress("IR-Diffusion regions"), cap:
            self.pipe(latents=latents.clone(), output_type="latent", callback_on_step_end=interrupt, **call)
        maps = cap.state.subject_maps
        if maps["count"] == 0:
            raise ValueError(
                f"no cross-attention layer has <= max_map_tokens={max_map_tokens} queries at this "
                "resolution; raise max_map_tokens"
            )
        norm = {row: _normalise((s / maps["count"]).cpu()) for row, s in maps["sum"].items()}
        target = norm[cond + n] if target_tokens is not None else None
        reference = [norm[cond + i][0] for i in range(n)] if ref_tokens is not None else None
        return target, reference

    @staticmethod
    def _disjoint_masks(maps: torch.Tensor, threshold: float) -> list[torch.Tensor]:
        """Target masks from normalised maps ``[n, h, w]``: above threshold, strongest subject wins."""
        best = maps.argmax(0)
        out = []
        for i in range(maps.shape[0]):
            m = (maps[i] >= threshold) & (best == i)
            if not m.any():
                m = maps[i] == maps[i].max()
            out.append(m.float())
        return out

    def _progress(self, desc: str):
        pipe = self.pipe

        class _Desc:
            def __enter__(self_inner):
                self_inner.saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
                pipe.set_progress_bar_config(**{**self_inner.saved, "desc": desc})

            def __exit__(self_inner, *exc):
                pipe._progress_bar_config = self_inner.saved

        return _Desc()
