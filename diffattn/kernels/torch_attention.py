"""The plain-PyTorch backend: what the ``"torch"`` backend runs besides the C++ kernel, and the exact
LSE merge. The test oracles live apart, in :mod:`diffattn.kernels.naive`.

* :func:`gathered_block_attention` gathers only the listed key blocks, one chunk of query blocks at a
  time, so memory stays bounded for long sequences — the ``"torch"`` backend on CUDA, and on CPU where
  the C++ kernel of :mod:`diffattn.kernels.cpu` cannot be built.
* :func:`masked_cpu_attention` runs PyTorch's fused CPU attention under the layout's token mask — the
  ``"torch"`` backend's shortcut for problems small enough to hold the whole mask.
* :func:`merge_attention` combines two partial attentions exactly through their LSEs.
* :func:`block_mass_torch` sums ``exp(s - lse)`` over every (query block, key block) tile, chunked.
"""

from __future__ import annotations

import weakref

import torch

from .layout import BlockSparseLayout, cdiv

__all__ = ["gathered_block_attention", "masked_cpu_attention", "merge_attention", "block_mass_torch", "pad_rows"]

# Budget for one chunk's score tensor in the gathered path (elements, fp32).
_CHUNK_ELEMENTS = 1 << 25


def gathered_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention that gathers the listed key blocks per query block (never ``Nq x Nk``).

    Computes in fp32 and visits query blocks in chunks sized so a chunk's score tensor holds at most
    ``chunk_elements`` values; ``scale`` defaults to ``D ** -0.5``. Exported for direct use; the
    ``"torch"`` backend of :func:`diffattn.kernels.block_sparse_attention` passes the scale it resolved.
    """
    b, h, nq, d = q.shape
    nk, dv = k.shape[-2], v.shape[-1]
    bq, bk = layout.block_q, layout.block_k
    mq, mk = layout.num_q_blocks, layout.num_kv_blocks
    scale = d**-0.5 if scale is None else scale
    dev = q.device

    qp = pad_rows(q.float(), mq * bq).view(b, h, mq, bq, d)
    kp = pad_rows(k.float(), mk * bk).view(b, h, mk, bk, d)
    vp = pad_rows(v.float(), mk * bk).view(b, h, mk, bk, dv)
    key_valid = (torch.arange(mk * bk, device=dev) < nk).view(mk, bk)

    kmax = layout.max_kv
    idx_all = layout.kv_indices.expand(b, h, mq, kmax)
    cnt_all = layout.kv_counts.expand(b, h, mq)
    ids_all = None if layout.kv_mask_ids is None else layout.kv_mask_ids.expand(b, h, mq, kmax)

    out = torch.zeros(b, h, mq, bq, dv, dtype=torch.float32, device=dev)
    lse_out = torch.full((b, h, mq, bq), float("-inf"), dtype=torch.float32, device=dev)
    per_block = b * h * bq * max(kmax, 1) * bk
    step = max(1, chunk_elements // max(per_block, 1))
    bi = torch.arange(b, device=dev)[:, None, None, None]
    hi = torch.arange(h, device=dev)[None, :, None, None]
    slot = torch.arange(kmax, device=dev)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        idx = idx_all[:, :, m0:m1].long()
        used = slot < cnt_all[:, :, m0:m1, None]
        safe = torch.where(used, idx, torch.zeros_like(idx))
        kg = kp[bi, hi, safe]  # [B, H, c, Kmax, bk, D]
        vg = vp[bi, hi, safe]
        c = m1 - m0
        s = torch.einsum("bhcqd,bhckjd->bhcqkj", qp[:, :, m0:m1], kg).mul_(scale)
        # The key-side mask is the same for every query of a block: broadcast it instead of expanding.
        keep = (used[..., None] & key_valid[safe])[:, :, :, None]  # [B, H, c, 1, Kmax, bk]
        if ids_all is not None:
            ids = ids_all[:, :, m0:m1].long()
            tok = layout.block_masks[ids.clamp_min(0)]  # [B, H, c, Kmax, bq, bk]
            tok = tok | (ids < 0)[..., None, None]
            keep = keep & tok.permute(0, 1, 2, 4, 3, 5)
        s.masked_fill_(~keep, float("-inf"))
        s = s.view(b, h, c, bq, kmax * bk)
        lse = torch.logsumexp(s, dim=-1)
        shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        # Masked scores are -inf, so exp turns them into exact zeros (also in rows with nothing kept).
        p = s.sub_(shift[..., None]).exp_()
        out[:, :, m0:m1] = torch.einsum("bhcqkj,bhckjd->bhcqd", p.view(b, h, c, bq, kmax, bk), vg)
        lse_out[:, :, m0:m1] = lse
    o = out.view(b, h, mq * bq, dv)[:, :, :nq]
    return o.to(q.dtype), lse_out.view(b, h, mq * bq)[:, :, :nq].contiguous()


# Additive masks cached per layout and shape: expanding one costs about half an attention call, and a
# planned layout serves many calls.
_bias_cache: "weakref.WeakKeyDictionary[BlockSparseLayout, dict]" = weakref.WeakKeyDictionary()


def _additive_mask(layout: BlockSparseLayout, nq: int, nk: int, dtype: torch.dtype, device: torch.device):
    per_layout = _bias_cache.setdefault(layout, {})
    key = (nq, nk, dtype, device)
    if key not in per_layout:
        keep = layout.to(device).to_token_mask(nq, nk)  # [LB, LH, Nq, Nk]
        bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
        per_layout.clear()  # one shape per layout is the common case; keep memory bounded
        per_layout[key] = (bias, ~keep.any(-1))
    return per_layout[key]


def masked_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on CPU as PyTorch's fused (flash) CPU attention with an additive token mask.

    Computes every ``Nq x Nk`` score, so it only pays off while the mask is small (the ``"torch"``
    backend uses it below :data:`diffattn.kernels.api.CPU_MASKED_MAX_ELEMENTS`); there it is several
    times faster than gathering blocks. Same contract: ``o`` in q's dtype, ``lse`` float32, rows with
    nothing kept give zeros and ``-inf``.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    bias, empty = _additive_mask(layout, nq, nk, q.dtype, q.device)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    # Rows with nothing kept come out NaN: zeros and -inf, as every backend returns. Filling always is
    # cheaper than asking the device whether such rows exist.
    o = o.masked_fill(empty[..., None], 0.0)
    lse = lse.float().masked_fill(empty, float("-inf"))
    return o, lse


def merge_attention(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two attentions over disjoint key sets: ``softmax`` over the union.

    ``o*`` ``[B, H, N, D]``, ``lse*`` float32 ``[B, H, N]``. Rows empty in both stay zero with ``-inf``.
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge_attention needs matching shapes, got o1 {tuple(o1.shape)}, o2 {tuple(o2.shape)}, "
            f"lse1 {tuple(lse1.shape)}, lse2 {tuple(lse2.shape)}"
        )
    l1, l2 = lse1.float(), lse2.float()
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1 - safe), torch.zeros_like(l1))
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2 - safe), torch.zeros_like(l2))
    o = o1.float() * w1[..., None] + o2.float() * w2[..., None]
    return o.to(o1.dtype), lse


def block_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> torch.Tensor:
    """Attention mass of every tile: ``sum_{i in Qblk, j in Kblk} exp(q_i.k_j*scale - lse_i)``.

    Returns float32 ``[B, H, Mq, Mk]``. Rows whose ``lse`` is ``-inf`` contribute nothing. Tail
    positions past the sequence ends contribute nothing. Chunked over query blocks.
    """
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    mq, mk = cdiv(nq, block_q), cdiv(nk, block_k)
    out = torch.zeros(b, h, mq, mk, dtype=torch.float32, device=q.device)
    kf = pad_rows(k.float(), mk * block_k)
    rows = max(block_q, (_CHUNK_ELEMENTS // max(b * h * mk * block_k, 1)) // block_q * block_q)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        l = lse[:, :, r0:r1].float()
        p = torch.where(torch.isfinite(l)[..., None], torch.exp(s - l[..., None]), torch.zeros_like(s))
        p[..., nk:] = 0.0
        p = pad_rows(p, cdiv(r1 - r0, block_q) * block_q)
        blocks = p.view(b, h, -1, block_q, mk, block_k).sum(dim=(3, 5))
        out[:, :, r0 // block_q : r0 // block_q + blocks.shape[2]] = blocks
    return out


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    n = x.shape[-2]
    if n == rows:
        return x
    pad = x.new_zeros(*x.shape[:-2], rows - n, x.shape[-1])
    return torch.cat([x, pad], dim=-2)
