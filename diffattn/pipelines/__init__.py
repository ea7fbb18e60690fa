from .fatezero import FateZeroPipeline
from .ir import IRDiffusionPipeline
