"""The block loop every Triton kernel here is made of, as ``@triton.jit`` helpers (inlined at compile
time; ``python -m diffattn.kernels.aot`` reports the same registers as with the code written out),
and the layout's operands for their launchers: which (batch, head) a program serves, masked tile
loads through strides with int64 row offsets, a layout row's key-block list, the tail and
partial-block masks, one online-softmax step and the epilogue that writes ``o`` and the natural-log
LSE."""

import torch
import triton
import triton.language as tl

from ._tuning import LN2, LOG2E

LN2_C = tl.constexpr(LN2)
LOG2E_C = tl.constexpr(LOG2E)


def layout_operands(layout, b: int, h: int):
    """The layout as kernel operands for ``b x h`` programs' worth of rows: indices, counts, mask ids,
    block masks as bytes, and whether any block is partial (without partial blocks, placeholders)."""
    mq, kmax = layout.num_q_blocks, layout.max_kv
    # expand() gives stride 0 on size-1 batch/head dims: one pattern serves every head without copies.
    idx = layout.kv_indices.expand(b, h, mq, kmax)
    cnt = layout.kv_counts.expand(b, h, mq)
    if layout.kv_mask_ids is None:
        return idx, cnt, idx, idx.new_zeros(1, 1, 1).view(torch.uint8), False
    return idx, cnt, layout.kv_mask_ids.expand(b, h, mq, kmax), layout.block_masks.view(torch.uint8), True


@triton.jit
def program_bh(H):
    """(batch, head) of this program from the grid's second axis, as int64 for pointer arithmetic."""
    pid_bh = tl.program_id(1)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def load_tile(base, rows, cols, stride_n, stride_d, row_ok, col_ok, other):
    """``base[rows, cols]`` with masked-out entries set to ``other``. Token index x row stride passes
    2**31 on fused-QKV views of long videos, so ``rows`` must be int64."""
    return tl.load(
        base + rows[:, None] * stride_n + cols[None, :] * stride_d,
        mask=row_ok[:, None] & col_ok[None, :],
        other=other,
    )


@triton.jit
def layout_row(KV_IDX, KV_CNT, KV_MID, b, h, q_blk,
               stride_ib, stride_ih, stride_im, stride_cb, stride_ch, stride_cm, stride_mb, stride_mh, stride_mm):
    """The listed key-block count of query block ``q_blk`` and the bases of its index and mask-id rows."""
    count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + q_blk * stride_cm)
    idx_base = KV_IDX + b * stride_ib + h * stride_ih + q_blk * stride_im
    mid_base = KV_MID + b * stride_mb + h * stride_mh + q_blk * stride_mm
    return count, idx_base, mid_base


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Running max (-inf), row sum and output accumulator of an online softmax, before any key."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def key_block(idx_base, t, stride_ik, offs_j, N_K, BLOCK_N: tl.constexpr):
    """Slot ``t`` of a layout row: the key block, its token rows (int64) and which of them exist."""
    kb = tl.load(idx_base + t * stride_ik)
    offs_n = kb * BLOCK_N + offs_j
    return kb, offs_n.to(tl.int64), offs_n < N_K


@triton.jit
def mask_scores(s, kb, t, col_ok, N_K, mid_base, stride_mk, BMASK, stride_pp, stride_pi, stride_pj, sub, offs_i, offs_j,
                BLOCK_N: tl.constexpr, HAS_PARTIAL: tl.constexpr):
    """Scores of key block ``kb`` (slot ``t`` of the row) with the key tail and, for a partial block,
    the tokens its mask drops set to -inf; this program's rows start ``sub`` rows into the block."""
    # Only the block holding the key tail needs its columns masked.
    if (kb + 1) * BLOCK_N > N_K:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    if HAS_PARTIAL:
        mid = tl.load(mid_base + t * stride_mk)
        if mid >= 0:
            keep = tl.load(
                BMASK + mid.to(tl.int64) * stride_pp + (sub + offs_i)[:, None] * stride_pi + offs_j[None, :] * stride_pj
            )
            s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key tile of the base-2 online softmax: its probabilities ``p``, the factor ``alpha`` that
    rescales what was accumulated, and the new row sum and max."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every score masked so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def store_output(acc, m_i, l_i, O, LSE, b, h, rows_m, offs_dv, row_ok, dv_ok,
                 stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln):
    """``o = acc / l`` and the natural-log LSE; rows that saw no key get zeros and -inf."""
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * LN2_C, float("-inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + rows_m * stride_ln, lse, mask=row_ok)
