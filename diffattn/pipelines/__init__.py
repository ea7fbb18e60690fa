"""Pipelines on top of the processors: batch generation, the embedded tiny model, FateZero and
IR-Diffusion editing.

Names are imported on first use, so ``import diffattn.pipelines`` costs nothing and the editing
pipelines' dependency (``transformers``, the ``edit`` extra) is needed only by those who use them::

    from diffattn.pipelines import load_pipeline; pipe = load_pipeline("tiny")
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FateZeroPipeline", "IRDiffusionPipeline", "TinyVideoPipeline", "load_pipeline"]

# name -> (module, extra it needs beyond the base install or None)
_LAZY = {
    "FateZeroPipeline": ("fatezero", "edit"),
    "IRDiffusionPipeline": ("ir", None),  # wraps a pipeline the caller built
    "TinyVideoPipeline": ("tiny", None),
    "load_pipeline": ("tiny", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, extra = _LAZY[name]
    if extra is not None:
        from .._extras import need

        need("transformers", extra, name)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
