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
from .radial import RadialConfig, RadialMethod
from .adaspa import AdaSpaConfig, AdaSpaMethod

__all__ = [
    "AdaSpaConfig",
    "AdaSpaMethod",
    "AttentionMethod",
    "AttnContext",
    "DenseConfig",
    "DenseMethod",
    "MethodConfig",
    "RadialConfig",
    "RadialMethod",
    "VideoSparseMethod",
    "get_method_class",
    "make_config",
    "method_names",
    "register_method",
]
