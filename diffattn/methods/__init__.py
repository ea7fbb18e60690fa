"""Attention methods: configs, runtime state and the registry (no diffusers imports here)."""

from .base import (
    AttentionMethod,
    AttnContext,
    MethodConfig,
    get_method_class,
    make_config,
    method_names,
    register_method,
)
from .sparse import DenseConfig, DenseMethod, VideoSparseMethod

__all__ = [
    "AttentionMethod",
    "AttnContext",
    "DenseConfig",
    "DenseMethod",
    "MethodConfig",
    "VideoSparseMethod",
    "get_method_class",
    "make_config",
    "method_names",
    "register_method",
]
