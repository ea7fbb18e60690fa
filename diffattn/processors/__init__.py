"""Diffusers side: the wrapper processor, interception, per-model metadata, step/branch tracking."""

from .api import apply, denoisers, method_of, remove, stats
from .models import MODEL_SPECS, ModelSpec, spec_for, supported_models
from .sparse import SparseAttnProcessor
from .state import Stats

__all__ = [
    "MODEL_SPECS",
    "ModelSpec",
    "SparseAttnProcessor",
    "Stats",
    "apply",
    "denoisers",
    "method_of",
    "remove",
    "spec_for",
    "stats",
    "supported_models",
]
