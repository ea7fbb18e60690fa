"""diffattn: training-free sparse, quantized and editable attention for Hugging Face Diffusers.

>>> import diffattn
>>> "dense" in diffattn.methods()
True
"""

from .methods import AttnContext, DenseConfig, MethodConfig, make_config
from .methods import method_names as methods

__version__ = "0.1.0"

__all__ = ["AttnContext", "DenseConfig", "MethodConfig", "make_config", "methods", "__version__"]
