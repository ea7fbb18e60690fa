from .fatezero import FateZeroPipeline
