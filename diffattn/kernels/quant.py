"""Quantized block-sparse attention in plain PyTorch (the ``"torch"`` backend's quantized path), and
the integer operands the quantized Triton kernel consumes.

What is quantized, and how (PARO's recipe, with SageAttention's key smoothing):

* **Keys are smoothed** first: ``k <- k - mean_j(k_j)`` per (batch, head). Every score of a query row
  shifts by the same constant ``q_i . mean(k)``, so the softmax is unchanged, but the channel offsets
  that dominate DiT keys no longer eat the INT8 range. The LSE is corrected back exactly (in fp32).
* **Q·Kᵀ** in ``qk_bits`` (8 or 4) with one symmetric scale per tile: every ``block_q`` rows of Q and
  every ``block_k`` rows of K (per batch and head) get ``scale = absmax / (2**(bits-1) - 1)``; values
  round to nearest. The integer products are accumulated exactly (fp32 holds ``127 * 127 * 256`` with
  no rounding), then rescaled by ``s_q * s_k * softmax_scale``.
* **P** (``exp(s - rowmax)``, values in ``[0, 1]``) is quantized for P·V in ``pv_bits`` (8 or 4), one
  scale per ``block_q x block_k`` tile: ``scale = tile max / (2**bits - 1)``. P is non-negative, so it
  uses the unsigned range (integer MMA instructions take unsigned u8/u4 operands). The row sum ``l``
  is accumulated from P *before* its quantization, as flash-style kernels do. ``V`` stays in the input
  precision: the reference defines the error that P's rounding adds, whatever a kernel does with V.
* ``None`` for either stage keeps it in fp32 — with both ``None`` this is exact masked attention.

Error bounds (proved in :func:`diffattn.kernels.naive_quant.quantization_error_bound`, checked by tests on random and structured
inputs): for query row ``i`` let ``eps_i`` bound the score error,

    eps_i = softmax_scale * (||q_i||_1 * max_j dk_j + dq_i * max_j ||k~_j||_1)

where ``dq_i``, ``dk_j`` are half the quantization steps of q_i's and k_j's tiles and ``k~`` the smoothed,
quantized keys. Then ``|lse_i - lse_i^fp32| <= eps_i`` and the output error obeys

    max_d |o_id - o_id^fp32| <= vmax * ((exp(2 eps_i) - 1) + sum_{j kept} dp_ij / l_i)

with ``vmax = max |v|`` over the row's kept keys, ``dp_ij`` half the P step of the tile holding
(i, j) and ``l_i`` the row sum of P. Typical errors are far below these worst cases. Measured relative L2 error of ``o``
(``tests/tolerances.py: QUANT_REL_L2``): INT8 Q·Kᵀ alone 0.5% on DiT-like inputs / 1.2% on i.i.d.
Gaussian ones; + INT8 P 0.7% / 1.4%; + INT4 P 4.7% / 13% — INT4 P only suits block-concentrated
patterns, which is why PARO reorders tokens first.

>>> q = k = v = torch.randn(1, 2, 100, 32)
>>> layout = BlockSparseLayout.dense(1, 1, 100, 100)
>>> o, lse = quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=4)
>>> tuple(o.shape), tuple(lse.shape)
((1, 2, 100, 32), (1, 2, 100))
"""

from __future__ import annotations

import torch

from ._tuning import LOG2E
from .layout import BlockSparseLayout, cdiv

__all__ = ["quantized_block_sparse_attention", "quantize_blockwise", "quantize_qk_for_kernel"]

_CHUNK_ELEMENTS = 1 << 24
_BITS = (None, 4, 8)


def _qmax(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def _pmax(bits: int) -> float:
    return float(2**bits - 1)


def _check_bits(value, name: str) -> None:
    if value not in _BITS:
        raise ValueError(f"{name} must be 8, 4 or None (no quantization), got {value!r}")


def quantize_blockwise(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tile quantization of ``x`` ``[B, H, N, D]`` along N in tiles of ``block`` rows.

    Returns the integer values (as fp32, exactly representable) ``[B, H, N, D]`` and the per-tile scales
    ``[B, H, ceil(N/block)]`` so that ``x ~ values * scale``; all-zero tiles get scale 1.
    """
    b, h, n, d = x.shape
    m = cdiv(n, block)
    xf = x.float()
    pad = xf.new_zeros(b, h, m * block - n, d)
    tiles = torch.cat([xf, pad], dim=2).view(b, h, m, block, d)
    amax = tiles.abs().amax(dim=(-1, -2))
    qmax = _qmax(bits)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    vals = torch.clamp(torch.round(tiles / scale[..., None, None]), -qmax, qmax)
    return vals.view(b, h, m * block, d)[:, :, :n], scale


def _row_block_mask(layout: BlockSparseLayout, m0: int, m1: int) -> BlockSparseLayout:
    """The layout restricted to query blocks ``m0:m1`` (so its token mask stays small)."""
    ids = None if layout.kv_mask_ids is None else layout.kv_mask_ids[:, :, m0:m1].contiguous()
    return BlockSparseLayout._built(
        layout.kv_indices[:, :, m0:m1].contiguous(),
        layout.kv_counts[:, :, m0:m1].contiguous(),
        layout.block_q,
        layout.block_k,
        layout.num_kv_blocks,
        kv_mask_ids=ids,
        block_masks=layout.block_masks if ids is not None else None,
    )


def _prepare(q, k, layout, qk_bits):
    """Smoothed keys, quantized (or not) q and k with their per-row half steps."""
    bq, bk = layout.block_q, layout.block_k
    kf = k.float()
    kmean = kf.mean(dim=2, keepdim=True)
    ks = kf - kmean
    if qk_bits is None:
        qv, kv = q.float(), ks
        dq = torch.zeros(q.shape[:3], device=q.device)
        dk = torch.zeros(k.shape[:3], device=k.device)
    else:
        qi, sq = quantize_blockwise(q, bq, qk_bits)
        ki, sk = quantize_blockwise(ks, bk, qk_bits)
        qv = qi * sq.repeat_interleave(bq, dim=2)[:, :, : q.shape[2], None]
        kv = ki * sk.repeat_interleave(bk, dim=2)[:, :, : k.shape[2], None]
        dq = 0.5 * sq.repeat_interleave(bq, dim=2)[:, :, : q.shape[2]]
        dk = 0.5 * sk.repeat_interleave(bk, dim=2)[:, :, : k.shape[2]]
    return qv, kv, kmean, dq, dk


def _chunks(layout: BlockSparseLayout, b: int, h: int, nk: int) -> int:
    per_block = max(b * h * layout.block_q * nk, 1)
    return max(1, _CHUNK_ELEMENTS // per_block)


def quantized_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    qk_bits: int | None = 8,
    pv_bits: int | None = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with quantized Q·Kᵀ and P·V (see the module docstring for the scheme).

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]`` (any float dtype; computed in fp32).
        layout: which key blocks each query block attends to (partial blocks are honoured).
        scale: softmax scale, default ``D ** -0.5``.
        qk_bits: 8 or 4 for integer Q·Kᵀ with per-tile scales, None for fp32.
        pv_bits: 8 or 4 for P quantized in ``block_q x block_k`` tiles, None for fp32.

    Returns:
        ``o`` ``[B, H, Nq, Dv]`` in q's dtype and ``lse`` float32 ``[B, H, Nq]`` (natural log, of the
        quantized scores). Rows with no kept key give zeros and ``-inf``.

    Memory stays bounded: query blocks are processed in chunks, each against all keys with the
    layout's token mask for those rows (a reference, not a fast path).
    """
    _check_bits(qk_bits, "qk_bits")
    _check_bits(pv_bits, "pv_bits")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    layout.check_inputs(b, h, nq, nk)
    if layout.kv_indices.device != q.device:
        layout = layout.to(q.device)
    scale = d**-0.5 if scale is None else float(scale)
    bq, bk = layout.block_q, layout.block_k
    mq, mk = layout.num_q_blocks, layout.num_kv_blocks
    qv, kv, kmean, _, _ = _prepare(q, k, layout, qk_bits)
    shift = (q.float() * kmean).sum(-1) * scale  # the per-row constant the smoothing removed
    vf = v.float()
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse_out = torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    step = _chunks(layout, b, h, nk)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        r0, r1 = m0 * bq, min(nq, m1 * bq)
        keep = _row_block_mask(layout, m0, m1).to_token_mask(r1 - r0, nk)
        s = torch.matmul(qv[:, :, r0:r1], kv.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        rowmax = s.amax(-1)
        finite = torch.isfinite(rowmax)
        safe = torch.where(finite, rowmax, torch.zeros_like(rowmax))
        p = torch.exp(s - safe[..., None]).masked_fill(~keep, 0.0)
        l = p.sum(-1)
        if pv_bits is not None:
            p = _quantize_p(p, bq, bk, mk, pv_bits)
        o = torch.matmul(p, vf) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
        out[:, :, r0:r1] = o
        lse_out[:, :, r0:r1] = torch.where(finite, safe + torch.log(l) + shift[:, :, r0:r1], rowmax)
    return out.to(q.dtype), lse_out


def _quantize_p(p: torch.Tensor, bq: int, bk: int, mk: int, bits: int) -> torch.Tensor:
    """Round non-negative P ``[B, H, r, Nk]`` to the integer grid of its ``bq x bk`` tile's scale."""
    b, h, r, nk = p.shape
    rq = cdiv(r, bq)
    padded = p.new_zeros(b, h, rq * bq, mk * bk)
    padded[:, :, :r, :nk] = p
    tiles = padded.view(b, h, rq, bq, mk, bk)
    tmax = tiles.amax(dim=(3, 5), keepdim=True)
    sc = torch.where(tmax > 0, tmax / _pmax(bits), torch.ones_like(tmax))
    deq = torch.round(tiles / sc) * sc
    return deq.view(b, h, rq * bq, mk * bk)[:, :, :r, :nk]


def quantize_qk_for_kernel(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, bits: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer Q·Kᵀ operands shared by the Triton kernel and :func:`online_quantized_attention`.

    Keys are smoothed (``k - mean_j k_j``) and both sides quantized per tile as in
    :func:`quantize_blockwise`. Returns ``q_int`` int8 ``[B, H, Nq, D]``, ``k_int`` int8 ``[B, H, Nk, D]``,
    the per-row factor ``row_f = s_q * scale * log2(e)`` fp32 ``[B, H, Nq]``, the per-key factor
    ``s_k`` fp32 ``[B, H, Nk]`` (so a base-2 score is ``(q_int . k_int) * row_f * s_k``, in that order) and
    the natural-log LSE shift ``scale * q . mean(k)`` fp32 ``[B, H, Nq]`` that the smoothing removed.
    """
    _check_bits(bits, "qk_bits")
    if bits is None:
        raise ValueError("qk_bits must be 8 or 4 for integer Q·Kᵀ, got None")
    nq, nk = q.shape[2], k.shape[2]
    kf = k.float()
    kmean = kf.mean(dim=2, keepdim=True)
    qi, sq = quantize_blockwise(q, block_q, bits)
    ki, sk = quantize_blockwise(kf - kmean, block_k, bits)
    row_f = sq.repeat_interleave(block_q, dim=2)[:, :, :nq] * (scale * LOG2E)
    sk_rows = sk.repeat_interleave(block_k, dim=2)[:, :, :nk]
    shift = (q.float() * kmean).sum(-1) * scale
    return qi.to(torch.int8), ki.to(torch.int8), row_f.contiguous(), sk_rows.contiguous(), shift
