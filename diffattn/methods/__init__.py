"""Attention methods: configs, runtime state and the registry (no diffusers imports here)."""

import sys
import types

from .base import (
    AttentionMethod,
    AttnContext,
    Drawing,
    MethodConfig,
    MethodInfo,
    Variant,
    benchmark_variants,
    describe,
    get_method_class,
    make_config,
    method_names,
    register_method,
)
from .sparse import VideoSparseMethod

# The registry: each line imports a method's module, which registers it; the order here is the order
# of `diffattn.methods()` and of the benchmarks' tables.
from .sparse import DenseConfig, DenseMethod
from .radial import RadialConfig, RadialMethod
from .gna import GNAConfig, GNAMethod
from .adaspa import AdaSpaConfig, AdaSpaMethod
from .paro import PAROConfig, PAROMethod
from .tome import ToMeConfig, ToMeMethod
from .agent import AgentConfig, AgentMethod

__all__ = [
    "AttentionMethod",
    "AttnContext",
    "Drawing",
    "MethodConfig",
    "MethodInfo",
    "Variant",
    "VideoSparseMethod",
    "benchmark_variants",
    "describe",
    "get_method_class",
    "make_config",
    "method_names",
    "register_method",
    *(name for m in method_names() for name in (get_method_class(m).__name__, get_method_class(m).config_cls.__name__)),
]


class _MethodsModule(types.ModuleType):
    """``diffattn.methods()`` lists the registered names while ``diffattn.methods.<module>`` stays the
    subpackage: the public call and the import path share one name."""

    def __call__(self) -> list[str]:
        return method_names()


sys.modules[__name__].__class__ = _MethodsModule
