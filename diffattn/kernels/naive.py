"""Plain-PyTorch oracles: the definitions every kernel and backend is tested against.

Each computes its answer the obvious way, densely in fp32 over the whole ``Nq x Nk`` score matrix,
and shares no code with the backends it checks (small shapes only; nothing here runs in production).

* :func:`dense_masked_attention`: softmax attention under a layout's exact token mask (and/or a
  given token mask), with its natural-log LSE.
* :func:`block_mass_reference`: ``sum exp(s - lse)`` over every (query block, key block) tile.
* :func:`softmax_with_lse`: the row softmax both are built on; empty rows give 0 and ``-inf``.
"""

from __future__ import annotations

import torch

from .layout import BlockSparseLayout, cdiv

__all__ = ["block_mass_reference", "dense_masked_attention", "softmax_with_lse"]


def softmax_with_lse(scores: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of fp32 ``scores`` with an optional boolean keep-mask.

    Rows with nothing kept give probabilities 0 and ``lse = -inf`` (never NaN).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe[..., None])
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return probs, lse


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout | None = None,
    scale: float | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention with the layout's exact token mask, computed densely in fp32.

    Returns ``o`` in q's dtype ``[B, H, Nq, Dv]`` and ``lse`` float32 ``[B, H, Nq]``.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = token_mask
    if layout is not None:
        lm = layout.to_token_mask(nq, nk)
        mask = lm if mask is None else (mask & lm)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    p, lse = softmax_with_lse(s, mask)
    o = torch.matmul(p, v.float())
    return o.to(q.dtype), lse


def block_mass_reference(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_q: int = 64, block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention mass of every tile, float32 ``[B, H, Mq, Mk]``: the probabilities ``exp(s - lse)`` of
    the full score matrix summed per tile. Queries with ``lse = -inf`` and positions past the
    sequence ends contribute nothing."""
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    l = lse.float()[..., None]
    p = torch.where(torch.isfinite(l), torch.exp(s - l), torch.zeros_like(s))
    mq, mk = cdiv(nq, block_q), cdiv(nk, block_k)
    tiles = torch.zeros(b, h, mq * block_q, mk * block_k, dtype=torch.float32, device=q.device)
    tiles[:, :, :nq, :nk] = p
    return tiles.view(b, h, mq, block_q, mk, block_k).sum(dim=(3, 5))
