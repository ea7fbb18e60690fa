"""Plain-PyTorch oracles of the quantized attention, and its proved error bounds.

* :func:`naive_quantized_attention`: the quantization recipe of :mod:`diffattn.kernels.quant` written
  out densely (own rounding of Q, K and P tiles over the whole score matrix), the oracle of the
  ``"torch"`` backend's quantized path.
* :func:`online_quantized_attention`: P rounded against the running row max, as a one-pass kernel
  does; the oracle of the quantized Triton kernel (same integer operands, so scores agree bitwise).
* :func:`quantization_error_bound`: worst-case distance of either scheme from fp32 attention.
"""

from __future__ import annotations

import torch

from ._tuning import LN2
from .layout import BlockSparseLayout, cdiv
from .quant import _check_bits, _chunks, _pmax, _prepare, _row_block_mask, quantize_qk_for_kernel
from .torch_attention import pad_rows

__all__ = [
    "naive_quantized_attention",
    "online_quantized_attention",
    "quantization_error_bound",
]


def naive_quantized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout, scale: float | None = None,
    qk_bits: int | None = 8, pv_bits: int | None = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention computed the obvious way: keys minus their mean; q and k rounded to the
    symmetric grid ``absmax / (2**(bits-1) - 1)`` of their own ``block``-row tile; the full masked score
    matrix; P = exp(s - rowmax) rounded on the unsigned grid ``tile max / (2**bits - 1)`` of its
    ``block_q x block_k`` tile; ``o = P V / sum(P before rounding)``. ``None`` keeps a stage in fp32."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    bq, bk = layout.block_q, layout.block_k
    scale = d**-0.5 if scale is None else float(scale)
    kf = k.float()
    kmean = kf.mean(dim=2, keepdim=True)

    def rounded(x: torch.Tensor, block: int) -> torch.Tensor:
        rows = x.shape[2]
        t = torch.zeros(b, h, cdiv(rows, block) * block, d, device=x.device)
        t[:, :, :rows] = x
        t = t.view(b, h, -1, block, d)
        step = t.abs().amax(dim=(-1, -2), keepdim=True) / (2 ** (qk_bits - 1) - 1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        return (torch.round(t / step) * step).view(b, h, -1, d)[:, :, :rows]

    qv, kv = q.float(), kf - kmean
    if qk_bits is not None:
        qv, kv = rounded(qv, bq), rounded(kv, bk)
    keep = layout.to_token_mask(nq, nk)
    s = (qv @ kv.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    rowmax = s.amax(-1, keepdim=True)
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    p = torch.exp(s - rowmax)
    l = p.sum(-1, keepdim=True)
    if pv_bits is not None:
        mq, mk = cdiv(nq, bq), cdiv(nk, bk)
        t = torch.zeros(b, h, mq * bq, mk * bk, device=q.device)
        t[:, :, :nq, :nk] = p
        t = t.view(b, h, mq, bq, mk, bk)
        step = t.amax(dim=(3, 5), keepdim=True) / (2**pv_bits - 1)
        step = torch.where(step > 0, step, torch.ones_like(step))
        p = (torch.round(t / step) * step).view(b, h, mq * bq, mk * bk)[:, :, :nq, :nk]
    has = l > 0
    o = (p @ v.float()) / torch.where(has, l, torch.ones_like(l))
    lse = torch.where(has, rowmax + torch.log(l), torch.full_like(l, float("-inf")))[..., 0]
    return o.to(q.dtype), lse + (q.float() * kmean).sum(-1) * scale


def _bound_chunks(layout: BlockSparseLayout, v: torch.Tensor, b: int, h: int, nq: int, nk: int):
    """Yields ``(r0, r1, keep, vmax)`` per chunk of whole query blocks: rows ``r0:r1``, their kept-token
    mask ``[B, H, r1 - r0, Nk]`` and the largest ``|v|`` entry each of those rows attends to."""
    vabs = v.float().abs().amax(-1)[:, :, None, :]  # [B, H, 1, Nk]
    bq, mq = layout.block_q, layout.num_q_blocks
    step = _chunks(layout, b, h, nk)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        r0, r1 = m0 * bq, min(nq, m1 * bq)
        keep = _row_block_mask(layout, m0, m1).to_token_mask(r1 - r0, nk).expand(b, h, -1, -1)
        yield r0, r1, keep, torch.where(keep, vabs, torch.zeros_like(vabs)).amax(-1)


def _shifted_probs(qv: torch.Tensor, kv: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``exp(s - rowmax)`` of the dequantized scores over the kept tokens (zero elsewhere and on empty rows)."""
    s = (torch.matmul(qv, kv.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
    rowmax = s.amax(-1)
    safe = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    return torch.exp(s - safe[..., None]).masked_fill(~keep, 0.0)


def quantization_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    qk_bits: int | None = 8,
    pv_bits: int | None = 8,
    online: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worst-case bounds ``(o_bound [B, H, Nq], lse_bound [B, H, Nq])`` of the quantization error.

    ``max_d |o - o_fp32|`` and ``|lse - lse_fp32|`` stay below these per row, up to fp32 rounding, for
    :func:`quantized_block_sparse_attention` (``online=False``: P rounded per tile against the tile's
    max) or :func:`online_quantized_attention` (``online=True``: P rounded on the fixed grid against the
    running max; the P term is derived in its docstring). Derivation:

    * score error: ``q~.k~ - q.k = q.(k~ - k) + (q~ - q).k~`` and each rounding error is at most half a
      step, so ``|ds_ij| <= scale * (||q_i||_1 dk_j + dq_i ||k~_j||_1) <= eps_i``. A uniform bound on
      score errors moves the LSE by at most ``eps_i`` and multiplies every probability by a factor in
      ``[exp(-2 eps_i), exp(2 eps_i)]``, so the exact-softmax output over quantized scores differs from
      fp32 by at most ``(exp(2 eps_i) - 1) * vmax``;
    * P rounding: ``|p^ - p| <= dp`` per entry, and the output divides by the row sum ``l``, adding at
      most ``vmax * sum_j dp_ij / l_i``; per tile ``dp`` is half the tile's step, online it is
      ``1 / (2 P)`` for each of the row's ``n_i`` kept keys.

    The P term is evaluated on the quantized-score P the kernel actually rounds.
    """
    _check_bits(qk_bits, "qk_bits")
    _check_bits(pv_bits, "pv_bits")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qv, kv, _, dq, dk = _prepare(q, k, layout, qk_bits)
    eps = scale * (q.float().abs().sum(-1) * dk.amax(-1, keepdim=True) + dq * kv.abs().sum(-1).amax(-1, keepdim=True))
    o_bound = torch.zeros(b, h, nq, device=q.device)
    for r0, r1, keep, vmax in _bound_chunks(layout, v, b, h, nq, nk):
        term = torch.expm1(2 * eps[:, :, r0:r1])
        if pv_bits is not None:
            p = _shifted_probs(qv[:, :, r0:r1], kv, keep, scale)
            l = p.sum(-1)
            if online:
                dp = keep.sum(-1).float() / (2 * _pmax(pv_bits))
            else:
                dp = _tile_rounding(p, keep, layout, pv_bits)
            term = term + dp / torch.where(l > 0, l, torch.ones_like(l))
        o_bound[:, :, r0:r1] = vmax * term
    return o_bound, eps


def _tile_rounding(p: torch.Tensor, keep: torch.Tensor, layout: BlockSparseLayout, pv_bits: int) -> torch.Tensor:
    """``sum_j dp_ij`` per row when P is rounded per (query block, key block) tile to ``pv_bits``:
    half the tile's step for every kept entry. ``p``, ``keep``: ``[B, H, rows, Nk]`` of whole query blocks."""
    b, h, r, nk = p.shape
    bq, bk, mk = layout.block_q, layout.block_k, layout.num_kv_blocks
    rq = cdiv(r, bq)
    padded = p.new_zeros(b, h, rq * bq, mk * bk)
    padded[:, :, :r, :nk] = p
    tiles = padded.view(b, h, rq, bq, mk, bk)
    half = tiles.amax(dim=(3, 5), keepdim=True) / (2 * _pmax(pv_bits))
    kept = torch.zeros_like(padded, dtype=torch.bool)
    kept[:, :, :r, :nk] = keep
    return (half * kept.view(b, h, rq, bq, mk, bk)).sum(dim=(4, 5)).reshape(b, h, rq * bq)[:, :, :r]


def _tiles(x: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """``[B, H, N, C]`` zero-padded to whole blocks and viewed as ``[B, H, blocks, block, C]``."""
    return pad_rows(x, blocks * block).view(*x.shape[:2], blocks, block, x.shape[-1])


def online_quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    qk_bits: int = 8,
    pv_bits: int | None = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized block-sparse attention with P quantized *online*, as a one-pass kernel does it.

    Q·Kᵀ is quantized exactly as in :func:`quantized_block_sparse_attention` (smoothed keys, per-tile
    symmetric scales; operands from :func:`quantize_qk_for_kernel`). P differs: a one-pass kernel only
    knows the running row max, so for each query block the listed key blocks are visited in layout
    order ``t = 0, 1, ...`` and

        m_t   = max(m_{t-1}, rowmax(s_t))                     (base-2 scores s, running max m)
        p_t   = exp2(s_t - m_t)                               in [0, 1]
        l_t   = l_{t-1} * exp2(m_{t-1} - m_t) + rowsum(p_t)    (from P before rounding)
        acc_t = acc_{t-1} * exp2(m_{t-1} - m_t) + (round(p_t * P) @ v) / P,   P = 2**pv_bits - 1

    i.e. P is rounded on the fixed unsigned grid ``1/P`` of ``[0, 1]`` (a per-tile scale of ``1/255``
    for INT8, ``1/15`` for INT4, no reduction needed), and ``o = acc / l``. ``pv_bits=None`` keeps P in
    fp32. The LSE is ``ln2 * (m + log2 l) + scale * q.mean(k)``, independent of P's rounding.

    Error bound vs fp32 attention (:func:`quantization_error_bound` with ``online=True``): with ``eps_i`` the
    score bound of :func:`quantization_error_bound`, ``n_i`` the row's kept keys, ``l_i`` its final row
    sum (relative to the final max, so ``l_i >= 1``) and ``vmax`` the largest ``|v|`` it sees,

        max_d |o_id - o_id^fp32| <= vmax * ((exp(2 eps_i) - 1) + n_i / (2 P l_i)).

    Proof of the P term: entry ``j`` of tile ``t`` enters the final sum with weight
    ``exp2(m_t - m) <= 1`` times its rounding error ``<= 1/(2P)``, so the unnormalised output moves by at
    most ``vmax * n_i / (2P)`` and dividing by the exact ``l_i`` gives the term; the score term is the
    exact-softmax one of :func:`quantization_error_bound`.

    Args/returns as :func:`quantized_block_sparse_attention` (``qk_bits`` 8 or 4). Loops over the
    layout's ``Kmax`` slots, vectorised over batch, heads and query blocks.
    """
    _check_bits(pv_bits, "pv_bits")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    layout.check_inputs(b, h, nq, nk)
    if layout.kv_indices.device != q.device:
        layout = layout.to(q.device)
    scale = d**-0.5 if scale is None else float(scale)
    bq, bk = layout.block_q, layout.block_k
    mq, mk, kmax = layout.num_q_blocks, layout.num_kv_blocks, layout.max_kv
    qi, ki, row_f, sk, shift = quantize_qk_for_kernel(q, k, bq, bk, qk_bits, scale)
    dev = q.device
    # Pad to whole blocks so tiles are plain views; padded rows/keys are masked below.
    qt = _tiles(qi.float(), mq, bq)
    rf = _tiles(row_f[..., None], mq, bq)[..., 0]
    kt = _tiles(ki.float(), mk, bk)
    skt = _tiles(sk[..., None], mk, bk)[..., 0]
    vt = _tiles(v.float(), mk, bk)
    col_ok = (torch.arange(mk * bk, device=dev) < nk).view(mk, bk)

    idx = layout.kv_indices.expand(b, h, mq, kmax).long()
    cnt = layout.kv_counts.expand(b, h, mq)
    mids = None if layout.kv_mask_ids is None else layout.kv_mask_ids.expand(b, h, mq, kmax).long()
    pmax = None if pv_bits is None else _pmax(pv_bits)

    m = torch.full((b, h, mq, bq), float("-inf"), device=dev)
    l = torch.zeros(b, h, mq, bq, device=dev)
    acc = torch.zeros(b, h, mq, bq, dv, device=dev)
    bi = torch.arange(b, device=dev)[:, None, None]
    hi = torch.arange(h, device=dev)[None, :, None]
    for t in range(kmax):
        live = (t < cnt)[..., None, None]  # [B, H, Mq, 1, 1]
        kb = idx[..., t].clamp(0, mk - 1)
        kk = kt[bi, hi, kb]  # [B, H, Mq, bk, D]
        s = torch.matmul(qt, kk.transpose(-1, -2))  # exact integer products in fp32
        s = (s * rf[..., None]) * skt[bi, hi, kb][..., None, :]
        keep = live & col_ok[kb][..., None, :]
        if mids is not None:
            mid = mids[..., t]
            part = layout.block_masks[mid.clamp(min=0)]  # [B, H, Mq, bq, bk]
            keep = keep & torch.where((mid >= 0)[..., None, None], part, torch.ones_like(part))
        s = s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_shift[..., None])
        alpha = torch.exp2(m - m_shift)
        l = l * alpha + p.sum(-1)
        if pmax is not None:
            p = torch.round(p * pmax)
        pv = torch.matmul(p, vt[bi, hi, kb])
        if pmax is not None:
            pv = pv * (1.0 / pmax)
        acc = acc * alpha[..., None] + pv
        m = m_new
    has = l > 0
    l_safe = torch.where(has, l, torch.ones_like(l))
    o = (acc / l_safe[..., None]).view(b, h, mq * bq, dv)[:, :, :nq]
    lse = torch.where(has, (m + torch.log2(l_safe)) * LN2, torch.full_like(m, float("-inf")))
    lse = lse.view(b, h, mq * bq)[:, :, :nq] + shift
    return o.to(q.dtype), lse
