"""diffattn: training-free sparse, quantized and editable attention for Hugging Face Diffusers.

>>> import diffattn
>>> "dense" in diffattn.methods()
True

Typical use::

    diffattn.apply(pipe, "radial")          # install on the pipeline's transformer / unet
    video = pipe(prompt).frames[0]
    print(diffattn.stats(pipe).summary())   # density, time, searches, cache hits per layer
    diffattn.remove(pipe)                   # the original processors, exactly
"""

from . import methods
from .methods import AttnContext, MethodConfig, get_method_class, make_config, method_names
from .processors import (
    ModelSpec,
    SparseAttnProcessor,
    Stats,
    apply,
    method_of,
    remove,
    stats,
    supported_models,
)

__version__ = "0.1.0"


def _config_classes() -> dict[str, type[MethodConfig]]:
    """Every registered method's config class by name (DenseConfig, RadialConfig, GNAConfig, ...)."""
    return {get_method_class(m).config_cls.__name__: get_method_class(m).config_cls for m in method_names()}


def __getattr__(name: str):
    # The config classes come from the registry, so a new method needs no line here.
    configs = _config_classes()
    if name in configs:
        return configs[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_config_classes()})


__all__ = [
    "AttnContext",
    "MethodConfig",
    "ModelSpec",
    "SparseAttnProcessor",
    "Stats",
    "apply",
    "make_config",
    "method_of",
    "methods",
    "remove",
    "stats",
    "supported_models",
    "__version__",
    *sorted(_config_classes()),
]
