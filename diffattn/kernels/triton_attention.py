"""Block-sparse flash attention forward in Triton, returning the natural-log LSE.

One program handles one query block of one (batch, head) and visits only the key blocks listed in the
layout, with an online softmax in fp32 (base-2 exponentials, ``log2(e)`` folded into the scale).
Sequence tails, head dims that are not powers of two and partial (token-masked) blocks are handled
with load/score masks, so q, k and v are read in place through their strides.

File order: kernel → launcher → public function.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_blocks import (
    key_block, layout_operands, layout_row, load_tile, mask_scores, online_softmax_step, program_bh, softmax_state,
    store_output,
)
from ._tuning import LOG2E, MAX_TILE, autotune_configs, interpreting, prune, shared_memory_estimate, shared_memory_limit
from .layout import BlockSparseLayout

__all__ = ["triton_block_sparse_attention"]



# Hopper: 64/128-row tiles are fed by 4 warps (one warpgroup) or 8; 2-4 stages hide K/V latency
# within the 228 KB of shared memory; one stage keeps fp32 tiles with D > 128 within it. _prune drops,
# per shape, the configs that would spill or not fit.
_CONFIGS = autotune_configs(((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4), (8, 1)))


def _prune(configs, named_args, **meta):
    elem = named_args["Q"].element_size()
    bm, bn, bd, bdv = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["BLOCK_DV"]
    mask_tile = bm * bn if meta["HAS_PARTIAL"] else 0
    shared = {c: shared_memory_estimate(c, bm, bn, bd * elem, (bd + bdv) * elem, mask_tile) for c in configs}
    limit = shared_memory_limit(named_args["Q"].device)
    return prune(configs, block_m=bm, block_d=max(bd, bdv), elem=elem, shared=shared, limit=limit)


@triton.autotune(
    configs=_CONFIGS,
    key=["D", "DV", "BLOCK_M", "SPLIT_M", "BLOCK_N", "HAS_PARTIAL"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, LSE,
    KV_IDX, KV_CNT, KV_MID, BMASK,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mk,
    stride_pp, stride_pi, stride_pj,
    H, N_Q, N_K,
    # Head dims are compile-time so the D-masks keep 16-byte vector loads (and async copies) alive.
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h = program_bh(H)
    # A layout query block of SPLIT_M * BLOCK_M rows may be served by SPLIT_M programs.
    q_blk = pid_m // SPLIT_M
    sub = (pid_m % SPLIT_M) * BLOCK_M

    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    rows_m = offs_m.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    if EVEN_D:
        d_ok = offs_d < BLOCK_D
        dv_ok = offs_dv < BLOCK_DV
    else:
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

    # Loaded in place rather than through load_tile: that costs this kernel 2-3 registers (ptxas, sm_90a).
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    count, idx_base, mid_base = layout_row(
        KV_IDX, KV_CNT, KV_MID, b, h, q_blk,
        stride_ib, stride_ih, stride_im, stride_cb, stride_ch, stride_cm, stride_mb, stride_mh, stride_mm,
    )

    m_i, l_i, acc = softmax_state(BLOCK_M, BLOCK_DV)
    for t in range(0, count):
        kb, rows_n, col_ok = key_block(idx_base, t, stride_ik, offs_j, N_K, BLOCK_N)
        kb_tile = load_tile(k_base, rows_n, offs_d, stride_kn, stride_kd, col_ok, d_ok, 0.0)
        if UPCAST:
            kb_tile = kb_tile.to(tl.float32)
        s = tl.dot(q, tl.trans(kb_tile), input_precision=DOT_PRECISION) * qk_scale
        s = mask_scores(
            s, kb, t, col_ok, N_K, mid_base, stride_mk, BMASK, stride_pp, stride_pi, stride_pj, sub, offs_i, offs_j,
            BLOCK_N, HAS_PARTIAL,
        )
        p, alpha, l_i, m_new = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        vb = load_tile(v_base, rows_n, offs_dv, stride_vn, stride_vd, col_ok, dv_ok, 0.0)
        if UPCAST:
            vb = vb.to(tl.float32)
        acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    store_output(
        acc, m_i, l_i, O, LSE, b, h, rows_m, offs_dv, row_ok, dv_ok,
        stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln,
    )


def _pick_block_m(block_q: int, block_k: int, block_d: int, block_dv: int, elem: int) -> int:
    """Rows per program: the layout's query block, halved while the tiles would not fit on chip.

    One stage of K and V tiles plus the Q tile must fit in ~160 KB of shared memory (Hopper has 228 KB),
    and head dims above 128 keep at most 64 rows so the accumulator stays in registers; fp32 operands
    (no tensor-core path at full precision) keep 32 (64 fp32 rows at head dim 128 spill on sm_90a).
    """
    bm = min(block_q, MAX_TILE)
    if max(block_d, block_dv) > 128:
        bm = min(bm, 64)
    if elem >= 4:
        bm = min(bm, 32)
    while bm > 16 and elem * (bm * block_d + block_k * (block_d + block_dv)) > 160 * 1024:
        bm //= 2
    return bm


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    bq, bk = layout.block_q, layout.block_k
    mq = layout.num_q_blocks

    o = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    idx, cnt, mid, bmask, has_partial = layout_operands(layout, b, h)

    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    upcast = q.dtype == torch.bfloat16 and interpreting()
    # fp32 inputs ask for fp32 results: no TF32 rounding of the operands.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if block_m is None:
        block_m = _pick_block_m(bq, bk, block_d, block_dv, q.element_size())
    elif block_m < 16 or block_m > min(bq, MAX_TILE) or bq % block_m:
        raise ValueError(
            f"block_m must be a power of two in 16..{min(bq, MAX_TILE)} dividing block_q={bq}, got {block_m}"
        )

    grid = (mq * (bq // block_m), b * h)
    _block_sparse_fwd_kernel[grid](
        q, k, v, o, lse,
        idx, cnt, mid, bmask,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
        *idx.stride(), *cnt.stride(), *mid.stride(), *bmask.stride(),
        h, nq, nk,
        D=d,
        DV=dv,
        BLOCK_M=block_m,
        SPLIT_M=bq // block_m,
        BLOCK_N=bk,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        EVEN_D=(block_d == d and block_dv == dv),
        HAS_PARTIAL=has_partial,
        UPCAST=upcast,
        DOT_PRECISION=precision,
    )
    return o, lse


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernel.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``; v: ``[B, H, Nk, Dv]`` — fp16, bf16 or fp32, any
            strides, on CUDA (or CPU under ``TRITON_INTERPRET=1``); ``D, Dv <= 256``.
        layout: ``ceil(Nq/block_q)`` query blocks and ``ceil(Nk/block_k)`` key blocks, batch/head dims
            1 or matching; ``block_k <= 128`` is the kernel's key tile.
        scale: softmax scale, default ``D ** -0.5``.
        block_m: query rows per program (speed only), a power of two dividing ``block_q``; by default
            ``min(block_q, 128)``, smaller where large head dims or fp32 tiles would not fit on chip.

    Returns:
        ``o`` ``[B, H, Nq, Dv]`` in q's dtype and ``lse`` float32 ``[B, H, Nq]`` (natural log). Rows that
        see no key give zeros and ``lse = -inf``.
    """
    b, h, nq, d = q.shape
    if layout.block_k > MAX_TILE:
        raise ValueError(
            f"the Triton kernel uses the layout's key blocks as its tile and supports block_k <= {MAX_TILE}, "
            f"got {layout.block_k}; build the layout with smaller key blocks or use backend='torch'"
        )
    layout.check_inputs(b, h, nq, k.shape[-2])
    if layout.kv_indices.device != q.device:
        layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _launch(q, k, v, layout, scale, block_m)
