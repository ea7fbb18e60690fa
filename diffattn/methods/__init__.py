"""Attention methods: configs, runtime state and the registry (no diffusers imports here)."""

import sys
import types

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
from .gna import GNAConfig, GNAMethod
from .tome import ToMeConfig, ToMeMethod
from .agent import AgentConfig, AgentMethod
from .adaspa import AdaSpaConfig, AdaSpaMethod
from .paro import PAROConfig, PAROMethod

__all__ = [
    "AgentConfig",
    "AgentMethod",
    "AdaSpaConfig",
    "AdaSpaMethod",
    "AttentionMethod",
    "AttnContext",
    "DenseConfig",
    "DenseMethod",
    "GNAConfig",
    "GNAMethod",
    "MethodConfig",
    "PAROConfig",
    "PAROMethod",
    "RadialConfig",
    "RadialMethod",
    "ToMeConfig",
    "ToMeMethod",
    "VideoSparseMethod",
    "get_method_class",
    "make_config",
    "method_names",
    "register_method",
]


class _MethodsModule(types.ModuleType):
    """``diffattn.methods()`` lists the registered names while ``diffattn.methods.<module>`` stays the
    subpackage: the public call and the import path share one name."""

    def __call__(self) -> list[str]:
        return method_names()


sys.modules[__name__].__class__ = _MethodsModule
