"""Attention mass per (query block, key block) tile in Triton, given each query's LSE.

``mass[b, h, i, j] = sum_{r in Qblk i, c in Kblk j} exp(q_r . k_c * scale - lse_r)``: one pass over
``Q K^T`` tile by tile (no ``P V``, no ``Nq x Nk`` buffer). Tails past the sequence ends and rows
whose LSE is ``-inf`` contribute nothing.

File order: kernel → launcher → public function.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_blocks import LOG2E_C, load_tile, program_bh
from ._tuning import LOG2E, MAX_TILE, autotune_configs, interpreting, prune, shared_memory_estimate, shared_memory_limit
from .layout import cdiv, check_block

__all__ = ["triton_block_mass"]


_CONFIGS = autotune_configs(((4, 2), (4, 3), (8, 2), (8, 3), (8, 1)))


def _prune(configs, named_args, **meta):
    elem = named_args["Q"].element_size()
    bm, bn, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"]
    shared = {c: shared_memory_estimate(c, bm, bn, bd * elem, bd * elem) for c in configs}
    limit = shared_memory_limit(named_args["Q"].device)
    return prune(configs, block_m=bm, block_d=bd, elem=elem, shared=shared, limit=limit)


@triton.autotune(configs=_CONFIGS, key=["D", "BLOCK_M", "BLOCK_N"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _block_mass_kernel(
    Q, K, LSE, OUT,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_ob, stride_oh, stride_om, stride_ok,
    H, N_Q, N_K, M_K,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h = program_bh(H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = offs_m.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_tile(Q + b * stride_qb + h * stride_qh, rows_m, offs_d, stride_qn, stride_qd, offs_m < N_Q, d_ok, 0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows_m * stride_ln, mask=offs_m < N_Q, other=float("-inf"))
    # -inf rows (and the query tail) are dropped below; shift them by 0 so no inf - inf appears.
    row_ok = lse > float("-inf")
    lse2 = tl.where(row_ok, lse * LOG2E_C, 0.0)

    k_base = K + b * stride_kb + h * stride_kh
    out_base = OUT + b * stride_ob + h * stride_oh + pid_m.to(tl.int64) * stride_om
    for j in range(0, M_K):
        offs_n = j * BLOCK_N + offs_j
        col_ok = offs_n < N_K
        kt = load_tile(k_base, offs_n.to(tl.int64), offs_d, stride_kn, stride_kd, col_ok, d_ok, 0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(s), 0.0)
        tl.store(out_base + j * stride_ok, tl.sum(tl.sum(p, 1), 0))


def _launch(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_q: int, block_k: int, scale: float):
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    mq, mk = cdiv(nq, block_q), cdiv(nk, block_k)
    out = torch.empty(b, h, mq, mk, dtype=torch.float32, device=q.device)
    lse = lse.float()
    block_d = max(16, triton.next_power_of_2(d))
    _block_mass_kernel[(mq, b * h)](
        q, k, lse, out,
        scale * LOG2E,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(),
        h, nq, nk, mk,
        D=d,
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        BLOCK_D=block_d,
        UPCAST=q.dtype == torch.bfloat16 and interpreting(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def triton_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention mass of every tile with the Triton kernel.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]`` (fp16, bf16 or fp32, any strides, ``D <= 256``).
        lse: ``[B, H, Nq]`` natural-log LSE of each query (``-inf`` rows contribute nothing).
        block_q, block_k: tile sizes, powers of two in 16..128.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        float32 ``[B, H, ceil(Nq/block_q), ceil(Nk/block_k)]``.
    """
    check_block(block_q, "block_q", MAX_TILE)
    check_block(block_k, "block_k", MAX_TILE)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _launch(q, k, lse, block_q, block_k, scale)
