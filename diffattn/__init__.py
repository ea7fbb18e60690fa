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
from .methods import AttnContext, MethodConfig, make_config
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

_methods = methods

# Every method's config class (DenseConfig, RadialConfig, GNAConfig, AdaSpaConfig, PAROConfig, ...).
_configs = {n: getattr(_methods, n) for n in _methods.__all__ if n.endswith("Config") and n != "MethodConfig"}
globals().update(_configs)

__version__ = "0.1.0"

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
    *sorted(_configs),
]
