"""Block-sparse attention kernels (Triton) with plain-PyTorch references. Imports torch/triton only."""

from .api import available_backends, block_mass, block_sparse_attention, can_run, resolve_backend
from .layout import BlockSparseLayout, cdiv
from .reference import (
    block_mass_reference,
    dense_masked_attention,
    gathered_block_attention,
    merge_attention,
)

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
