"""Block-sparse flash attention with integer Q·Kᵀ and online-quantized P, in Triton.

The scheme and its error bound are those of
:func:`diffattn.kernels.naive_quant.online_quantized_attention`, which this kernel reproduces:
a host pre-pass smooths the keys and quantizes q per query block and k per key block to int8
(:func:`~diffattn.kernels.quant.quantize_qk_for_kernel`); the kernel multiplies the int8 tiles
with int32 accumulation, dequantizes with the per-row and per-key scale product (``log2(e)`` and the
softmax scale folded in), and runs the online softmax in base 2. P = ``exp2(s - m_running)`` lies in
``[0, 1]``, so it is rounded on the fixed unsigned grid ``1/(2**pv_bits - 1)``; the integer-valued P
(exact in fp16) meets V in V's precision and the product is rescaled once per tile.

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
from ._tuning import MAX_TILE, autotune_configs, interpreting, prune, shared_memory_estimate, shared_memory_limit
from .layout import BlockSparseLayout
from .quant import quantize_qk_for_kernel

__all__ = ["triton_quantized_block_sparse_attention"]



_CONFIGS = autotune_configs(((4, 2), (4, 3), (8, 2), (8, 3), (4, 1)))


def _prune(configs, named_args, **meta):
    elem = named_args["V"].element_size()
    bm, bn, bd, bdv = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["BLOCK_DV"]
    mask_tile = bm * bn if meta["HAS_PARTIAL"] else 0
    # int8 Q and K tiles, V in its own dtype.
    shared = {c: shared_memory_estimate(c, bm, bn, bd, bd + bdv * elem, mask_tile) for c in configs}
    limit = shared_memory_limit(named_args["V"].device)
    return prune(configs, block_m=bm, block_d=max(bd, bdv), elem=elem, shared=shared, limit=limit)


@triton.autotune(
    configs=_CONFIGS,
    key=["D", "DV", "BLOCK_M", "BLOCK_N", "HAS_PARTIAL", "P_LEVELS"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _quant_block_sparse_fwd_kernel(
    QI, KI, ROWF, KSC, V, O, LSE,
    KV_IDX, KV_CNT, KV_MID, BMASK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rb, stride_rh, stride_rn,
    stride_sb, stride_sh, stride_sn,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_im, stride_ik,
    stride_cb, stride_ch, stride_cm,
    stride_mb, stride_mh, stride_mm, stride_mk,
    stride_pp, stride_pi, stride_pj,
    H, N_Q, N_K,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    P_LEVELS: tl.constexpr,  # 2**pv_bits - 1, or 0 for unquantized P
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h = program_bh(H)

    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    rows_m = offs_m.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    qi = load_tile(QI + b * stride_qb + h * stride_qh, rows_m, offs_d, stride_qn, stride_qd, row_ok, d_ok, 0)
    row_f = tl.load(ROWF + b * stride_rb + h * stride_rh + rows_m * stride_rn, mask=row_ok, other=0.0)
    k_base = KI + b * stride_kb + h * stride_kh
    ks_base = KSC + b * stride_sb + h * stride_sh
    v_base = V + b * stride_vb + h * stride_vh
    count, idx_base, mid_base = layout_row(
        KV_IDX, KV_CNT, KV_MID, b, h, pid_m,
        stride_ib, stride_ih, stride_im, stride_cb, stride_ch, stride_cm, stride_mb, stride_mh, stride_mm,
    )

    m_i, l_i, acc = softmax_state(BLOCK_M, BLOCK_DV)
    for t in range(0, count):
        kb, rows_n, col_ok = key_block(idx_base, t, stride_ik, offs_j, N_K, BLOCK_N)
        ki = load_tile(k_base, rows_n, offs_d, stride_kn, stride_kd, col_ok, d_ok, 0)
        k_sc = tl.load(ks_base + rows_n * stride_sn, mask=col_ok, other=0.0)
        s_int = tl.dot(qi, tl.trans(ki), out_dtype=tl.int32)
        # Same multiplication order as the reference: the integer product is exact, so s matches bitwise.
        s = (s_int.to(tl.float32) * row_f[:, None]) * k_sc[None, :]
        s = mask_scores(
            s, kb, t, col_ok, N_K, mid_base, stride_mk, BMASK, stride_pp, stride_pi, stride_pj, 0, offs_i, offs_j,
            BLOCK_N, HAS_PARTIAL,
        )
        p, alpha, l_i, m_i = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
        vb = load_tile(v_base, rows_n, offs_dv, stride_vn, stride_vd, col_ok, dv_ok, 0.0)
        if UPCAST:
            vb = vb.to(tl.float32)
        if P_LEVELS > 0:
            # Integer levels 0..P_LEVELS are exact in fp16/bf16, so the dot sees P's rounding only.
            x = p * P_LEVELS
            p_lvl = tl.floor(x + 0.5)
            # Ties to even, as torch.round does (p = 0.5 gives 7.5 levels at INT4).
            tie_odd = ((p_lvl - x) == 0.5) & ((p_lvl - 2.0 * tl.floor(p_lvl * 0.5)) == 1.0)
            p_lvl = tl.where(tie_odd, p_lvl - 1.0, p_lvl)
            acc += tl.dot(p_lvl.to(vb.dtype), vb, input_precision=DOT_PRECISION) * (1.0 / P_LEVELS)
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)

    store_output(
        acc, m_i, l_i, O, LSE, b, h, rows_m, offs_dv, row_ok, dv_ok,
        stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln,
    )


def _launch(q, k, v, layout: BlockSparseLayout, scale: float, qk_bits: int, pv_bits: int | None):
    b, h, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    bq, bk = layout.block_q, layout.block_k
    mq = layout.num_q_blocks
    qi, ki, row_f, k_sc, shift = quantize_qk_for_kernel(q, k, bq, bk, qk_bits, scale)

    o = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    idx, cnt, mid, bmask, has_partial = layout_operands(layout, b, h)

    # int8 MMA consumes 32-deep K slices.
    block_d = max(32, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    upcast = v.dtype == torch.bfloat16 and interpreting()
    precision = "ieee" if v.dtype == torch.float32 else "tf32"
    grid = (mq, b * h)
    _quant_block_sparse_fwd_kernel[grid](
        qi, ki, row_f, k_sc, v, o, lse,
        idx, cnt, mid, bmask,
        *qi.stride(), *ki.stride(), *row_f.stride(), *k_sc.stride(), *v.stride(), *o.stride(), *lse.stride(),
        *idx.stride(), *cnt.stride(), *mid.stride(), *bmask.stride(),
        h, nq, nk,
        D=d,
        DV=dv,
        BLOCK_M=bq,
        BLOCK_N=bk,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        HAS_PARTIAL=has_partial,
        P_LEVELS=0 if pv_bits is None else 2**pv_bits - 1,
        UPCAST=upcast,
        DOT_PRECISION=precision,
    )
    # The smoothing shifted every score of a row by the same constant; put it back into the LSE.
    return o, lse + shift


def triton_quantized_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    qk_bits: int = 8,
    pv_bits: int | None = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with INT8 (or INT4-valued) Q·Kᵀ and P rounded online to ``pv_bits``.

    Computes :func:`diffattn.kernels.naive_quant.online_quantized_attention` (semantics and error
    bound in its docstring).

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``; v: ``[B, H, Nk, Dv]`` — fp16, bf16 or fp32, on CUDA
            (or CPU under ``TRITON_INTERPRET=1``); ``D, Dv <= 256``.
        layout: block-sparse layout (partial blocks honoured) with ``block_q, block_k <= 128``; one
            program per query block, since Q's quantization scale is per query block.
        scale: softmax scale, default ``D ** -0.5``.
        qk_bits: 8 or 4 — the integer grid of q and k (both stored as int8).
        pv_bits: 8 or 4 to round P on the grid ``1/(2**bits - 1)``, None to keep it unrounded.

    Returns:
        ``o`` ``[B, H, Nq, Dv]`` in q's dtype and ``lse`` float32 ``[B, H, Nq]`` (natural log). Rows that
        see no key give zeros and ``lse = -inf``.
    """
    if qk_bits not in (4, 8):
        raise ValueError(f"qk_bits must be 8 or 4 for the quantized kernel, got {qk_bits!r}")
    if pv_bits not in (None, 4, 8):
        raise ValueError(f"pv_bits must be 8, 4 or None (no quantization), got {pv_bits!r}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.block_q > MAX_TILE or layout.block_k > MAX_TILE:
        raise ValueError(
            f"the quantized kernel uses the layout's blocks as tiles and supports block_q, block_k <= {MAX_TILE}, "
            f"got {layout.block_q} x {layout.block_k}; build the layout with smaller blocks"
        )
    b, h, nq, d = q.shape
    layout.check_inputs(b, h, nq, k.shape[-2])
    if layout.kv_indices.device != q.device:
        layout = layout.to(q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _launch(q, k, v, layout, scale, qk_bits, pv_bits)
