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
``scripts/train_tiny.py``. The parts: :mod:`.data` (scenes, rendering, prompts), :mod:`.motion` (how a
video keeps the prompted motion), :mod:`.model` (text encoder, position channels, configs),
:mod:`.pipeline` (the pipeline and :func:`load_pipeline`). Names load on first use, so the data set and
the prompts import without Diffusers.

>>> from diffattn.pipelines.tiny import load_pipeline  # doctest: +SKIP
>>> pipe = load_pipeline("tiny")  # doctest: +SKIP
>>> video = pipe("a red circle moving left on a blue background", generator=torch.Generator().manual_seed(0)).frames[0]  # doctest: +SKIP
>>> video.shape  # doctest: +SKIP
(9, 64, 64, 3)
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule (the shipped model_index.json names ``diffattn.pipelines.tiny.model`` as the text encoder's library)
_LAZY = {
    **dict.fromkeys(("COLORS", "SHAPES", "DIRECTIONS", "VOCAB", "DEFAULT_PROMPTS", "Scene", "scene_prompt",
                     "parse_prompt", "random_scenes", "render_videos"), "data"),
    "measure_motion": "motion",
    **dict.fromkeys(("TinyTextEncoder", "POSITION_CHANNELS", "position_channels", "pixel_to_position",
                     "with_position_channels", "TINY_TRANSFORMER_CONFIG", "TINY_SCHEDULER_CONFIG"), "model"),
    **dict.fromkeys(("TinyVideoPipeline", "TinyVideoPipelineOutput", "PREDICTION_TYPES", "build_tiny_pipeline",
                     "tiny_asset_dir", "load_pipeline"), "pipeline"),
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name == "ModelMixin":
        # Folders saved before the model moved to .model name this package as the text encoder's
        # library; diffusers picks the loading method by looking ModelMixin up on that module.
        from diffusers import ModelMixin

        return ModelMixin
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
