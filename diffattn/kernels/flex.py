"""Block-sparse attention through PyTorch FlexAttention (``BlockMask.from_kv_blocks``).

The layout's blocks map one to one onto a FlexAttention ``BlockMask``: blocks that are entirely kept
become *full* blocks (no ``mask_mod`` call on the GPU), partial blocks and the blocks that hold a
sequence tail become *masked* blocks. The ``mask_mod`` looks the token up in the layout itself, so
the result is exact even where the block structure is ignored (eager mode on CPU evaluates
``mask_mod`` densely).

On CUDA the call is compiled with ``torch.compile`` (one compiled callable per process; it
recompiles for new shapes, up to 64 of them, then raises rather than run eagerly). Elsewhere it runs eagerly, which materialises ``Nq x Nk`` scores — for
tests, not for long sequences.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .layout import BlockSparseLayout

__all__ = [
    "cached_flex_block_mask", "flex_block_sparse_attention", "flex_mask_mod_attention", "layout_to_flex_block_mask",
]

_compiled = None
# Distinct (shape, block-mask size) specialisations one process may compile before raising.
_RECOMPILE_LIMIT = 64

# State of one (query block, key block) pair in the dense lookup table.
_NOT_LISTED = -2
_FULL = -1


def _block_state(layout: BlockSparseLayout) -> torch.Tensor:
    """int32 ``[B|1, H|1, Mq, Mk]``: -2 not listed, -1 full, ``p >= 0`` partial with mask ``p``."""
    b, h, mq, kmax = layout.kv_indices.shape
    dev = layout.kv_indices.device
    state = torch.full((b, h, mq, layout.num_kv_blocks + 1), _NOT_LISTED, dtype=torch.int32, device=dev)
    used = torch.arange(kmax, device=dev) < layout.kv_counts[..., None]
    # Unused slots scatter into a spare last column that is cut off afterwards.
    col = torch.where(used, layout.kv_indices, torch.full_like(layout.kv_indices, layout.num_kv_blocks))
    val = layout.kv_mask_ids if layout.kv_mask_ids is not None else torch.full_like(col, _FULL)
    state.scatter_(-1, col.long(), val)
    return state[..., : layout.num_kv_blocks].contiguous()


def cached_flex_block_mask(layout: BlockSparseLayout, batch: int, heads: int, seq_q: int, seq_k: int):
    """:func:`layout_to_flex_block_mask`, kept on the layout: a planned layout serves many calls, and
    building a ``BlockMask`` sorts every row of blocks. One entry per layout (one shape is the rule)."""
    key = (batch, heads, seq_q, seq_k)
    hit = layout.__dict__.get("_flex_block_mask")
    if hit is None or hit[0] != key:
        hit = (key, layout_to_flex_block_mask(layout, batch, heads, seq_q, seq_k))
        layout.__dict__["_flex_block_mask"] = hit
    return hit[1]


def layout_to_flex_block_mask(layout: BlockSparseLayout, batch: int, heads: int, seq_q: int, seq_k: int):
    """FlexAttention ``BlockMask`` computing exactly the tokens of ``layout``."""
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = layout.block_q, layout.block_k
    mq, mk = layout.num_q_blocks, layout.num_kv_blocks
    dev = layout.kv_indices.device
    state = _block_state(layout)
    lb, lh = state.shape[:2]
    masks = layout.block_masks if layout.block_masks is not None else torch.ones(1, bq, bk, dtype=torch.bool, device=dev)

    kb = torch.arange(mk, device=dev)
    tail = (kb == mk - 1) & (seq_k % bk != 0)
    full = (state == _FULL) & ~tail
    masked = (state >= 0) | ((state == _FULL) & tail)

    def to_rows(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sel = sel.expand(batch, heads, mq, mk)
        counts = sel.sum(-1, dtype=torch.int32)
        # Stable sort puts the selected key blocks first, in increasing order.
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts.contiguous(), order.contiguous()

    full_n, full_idx = to_rows(full)
    part_n, part_idx = to_rows(masked)

    def mask_mod(b, h, q_idx, kv_idx):
        st = state[b if lb > 1 else 0, h if lh > 1 else 0, q_idx // bq, kv_idx // bk]
        inside = masks[st.clamp(min=0), q_idx % bq, kv_idx % bk]
        return (kv_idx < seq_k) & ((st == _FULL) | ((st >= 0) & inside))

    def block_mod(b, h, q_idx, kv_idx):
        st = state[b if lb > 1 else 0, h if lh > 1 else 0, q_idx // bq, kv_idx // bk]
        return (kv_idx < seq_k) & (st == _FULL)

    return BlockMask.from_kv_blocks(
        part_n,
        part_idx,
        full_n,
        full_idx,
        BLOCK_SIZE=(bq, bk),
        # Without partial blocks the token lookup is dead weight (and eager mode evaluates it densely).
        mask_mod=mask_mod if layout.has_partial else block_mod,
        seq_lengths=(seq_q, seq_k),
    )


def _flex_call():
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    block_mask=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with FlexAttention.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``; v: ``[B, H, Nk, Dv]``.
        layout: the blocks to compute (batch/head dims 1 or matching).
        scale: softmax scale, default ``D ** -0.5``.
        block_mask: a ``BlockMask`` built by :func:`layout_to_flex_block_mask` for these shapes; by
            default the one cached on the layout (:func:`cached_flex_block_mask`).

    Returns:
        ``o`` ``[B, H, Nq, Dv]`` in q's dtype and ``lse`` float32 ``[B, H, Nq]`` (natural log); rows that
        see no key give zeros and ``lse = -inf``.
    """
    b, h, nq, d = q.shape
    if block_mask is None:
        block_mask = cached_flex_block_mask(layout, b, h, nq, k.shape[-2])
    # The kernel tile must divide the layout's blocks; the default tile may not.
    tiles = {"BLOCK_M": min(layout.block_q, 128), "BLOCK_N": min(layout.block_k, 64)}
    return _run(q, k, v, block_mask, scale, tiles)


def flex_mask_mod_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod,
    scale: float | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention under a pointwise rule ``mask_mod(b, h, q_idx, kv_idx)`` (e.g.
    :func:`diffattn.patterns.radial.radial_mask_mod`): token-exact, its ``BlockMask`` derived from the
    rule by ``create_block_mask`` in ``block_size`` tiles. Returns ``(o, lse)`` as above."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, nq, _ = q.shape
    block_mask = create_block_mask(
        mask_mod, b, h, nq, k.shape[-2], device=q.device, BLOCK_SIZE=block_size, _compile=q.is_cuda
    )
    return _run(q, k, v, block_mask, scale, {"BLOCK_M": min(block_size, 128), "BLOCK_N": min(block_size, 64)})


def _run(q, k, v, block_mask, scale, tiles):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel_options = None
    compiled = contextlib.nullcontext()
    if q.is_cuda:
        fn = _flex_call()
        kernel_options = tiles
        # Every new shape or block-mask size compiles once more; past torch's recompile limit (8) the
        # call would run eagerly with an Nq x Nk score matrix. Allow many shapes, and raise past them.
        import torch._dynamo

        compiled = torch._dynamo.config.patch(
            recompile_limit=max(_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit),
            fail_on_recompile_limit_hit=True,
        )
    else:
        fn = flex_attention
    with warnings.catch_warnings(), compiled:
        # Eager mode warns that it materialises the scores; that is the documented CPU behaviour.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        o, aux = fn(
            q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options,
            return_aux=AuxRequest(lse=True),
        )
    lse = aux.lse.float()
    # Rows without any key must read as zeros with lse = -inf whatever the kernel leaves there.
    empty = ~(lse > float("-inf"))
    lse = lse.masked_fill(empty, float("-inf"))
    o = o.masked_fill(empty[..., None], 0.0)
    return o.to(q.dtype), lse
