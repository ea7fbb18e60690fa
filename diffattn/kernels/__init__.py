"""Block-sparse attention behind one entry point (Triton, C++ on CPU, FlexAttention and plain-PyTorch
backends, quantized or not), with the plain-PyTorch oracles they are tested against in ``naive`` and
``naive_quant``. Imports torch/triton only."""

from .api import available_backends, block_mass, block_sparse_attention, can_run, resolve_backend
from .layout import BlockSparseLayout, cdiv
from .naive import block_mass_reference, dense_masked_attention
from .torch_attention import gathered_block_attention, merge_attention

__all__ = [
    "BlockSparseLayout",
    "available_backends",
    "block_mass",
    "block_mass_reference",
    "block_sparse_attention",
    "can_run",
    "cdiv",
    "dense_masked_attention",
    "gathered_block_attention",
    "merge_attention",
    "resolve_backend",
]
