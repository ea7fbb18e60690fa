"""PAROAttention planner: per-head token reordering that makes attention block-concentrated.

PAROAttention ("Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models", 2025; code not public) observes that video attention looks diverse — spatial
blocks, temporal stripes, diagonals — only because tokens are flattened F→H→W. Reading the same
tokens in another axis order turns a head's pattern into (nearly) block-diagonal tiles, which a
static block mask (and per-tile quantization) handles well. Per head this module:

1. scores each of the 6 axis orders of (F, H, W) by how concentrated the head's attention mass is in
   ``block x block`` tiles after permuting (exact masses from :func:`diffattn.kernels.block_mass`):
   the number of tiles needed to hold ``order_recall`` of the mass, ties broken by the entropy of the
   tile masses (see :func:`order_scores`);
2. keeps the tiles above a mass threshold chosen so the head's density is the target
   (:func:`threshold_block_mask`), plus every row's heaviest tile so no query block is left empty.

The permutations are plain index gathers, so applying one and then its inverse is exact.

>>> perm = order_permutation((2, 3, 4), "HWF")
>>> x = torch.arange(24)
>>> torch.equal(x[perm][inverse_permutation(perm)], x)
True
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch

from ..kernels import block_mass

__all__ = [
    "AXIS_ORDERS",
    "order_permutation",
    "inverse_permutation",
    "head_permutations",
    "permute_heads",
    "order_scores",
    "threshold_block_mask",
    "calibrate_paro",
]

AXIS_ORDERS = ("FHW", "FWH", "HFW", "HWF", "WFH", "WHF")
_AXIS = {"F": 0, "H": 1, "W": 2}


def _check_order(order: str) -> None:
    if order not in AXIS_ORDERS:
        raise ValueError(f"axis order must be one of {AXIS_ORDERS}, got {order!r}")


def order_permutation(grid: Sequence[int], order: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Token permutation ``[N]`` for reading a frame-major (F→H→W) grid in axis ``order``.

    ``x[..., perm, :]`` lists tokens with ``order[0]`` slowest and ``order[2]`` fastest;
    ``perm[i]`` is the frame-major index of the token at new position ``i``.
    """
    _check_order(order)
    f, h, w = (int(g) for g in grid)
    idx = torch.arange(f * h * w, device=device).view(f, h, w)
    return idx.permute(*(_AXIS[a] for a in order)).reshape(-1)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm] = arange`` along the last dim (works batched, e.g. ``[H, N]``)."""
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


def head_permutations(grid: Sequence[int], orders: Sequence[str], device=None) -> torch.Tensor:
    """Stack of per-head permutations ``[H, N]`` for a list of axis orders (one per head)."""
    return torch.stack([order_permutation(grid, o, device) for o in orders])


def permute_heads(x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Gather tokens per head: ``out[b, h, i] = x[b, h, perms[h, i]]`` for ``x`` ``[B, H, N(, D)]``."""
    if x.ndim == 3:
        return x.gather(2, perms[None].expand(x.shape[0], -1, -1))
    idx = perms[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
    return x.gather(2, idx)


def order_scores(mass: torch.Tensor, order_recall: float = 0.9) -> torch.Tensor:
    """Concentration score per head (lower = more concentrated) of tile masses ``[H, Mq, Mk]``.

    ``count + entropy / 2`` where ``count`` is the number of tiles (heaviest first) that hold
    ``order_recall`` of the head's mass and ``entropy`` the normalised entropy (in ``[0, 1]``) of the
    tile-mass distribution. The integer count dominates; entropy only breaks ties between orders
    needing the same number of tiles.
    """
    h = mass.shape[0]
    flat = mass.reshape(h, -1).double()
    total = flat.sum(-1, keepdim=True).clamp_min(1e-300)
    p = flat / total
    sorted_p = torch.sort(p, dim=-1, descending=True).values
    before = torch.cumsum(sorted_p, -1) - sorted_p
    count = (before < order_recall).sum(-1).clamp_min(1).double()
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1) / math.log(max(flat.shape[-1], 2))
    return count + 0.5 * ent


def threshold_block_mask(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Per head, the tiles above the mass threshold that keeps ``density`` of them, plus row maxima.

    ``mass`` ``[H, Mq, Mk]``; returns bool ``[H, Mq, Mk]``. The threshold is the head's
    ``ceil(density * Mq * Mk)``-th largest tile mass (ties resolved by position), so the density is
    the target unless rows needed their heaviest tile added (slightly denser then).
    """
    h, mq, mk = mass.shape
    keep = min(mq * mk, max(1, math.ceil(density * mq * mk)))
    flat = mass.reshape(h, -1)
    top = torch.topk(flat, keep, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True).view(h, mq, mk)
    row_max = mass.argmax(-1, keepdim=True)
    return mask.scatter(-1, row_max, True)


def calibrate_paro(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    grid: Sequence[int],
    density: float = 0.5,
    block: int = 64,
    orders: Sequence[str] = AXIS_ORDERS,
    order_recall: float = 0.9,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """Choose each head's axis order and its block mask from one dense step's ``q, k`` and LSE.

    Args:
        q, k: video tokens ``[B, H, N, D]`` in frame-major order; lse: ``[B, H, N]`` (exact, from a
            dense pass). Masses are averaged over the batch: the plan is static and batch-free.
        grid: latent grid (F, H, W) with ``F*H*W = N``.
        density: target fraction of tiles kept per head.
        block: tile size along the permuted sequence.
        orders: candidate axis orders (default all 6).
        order_recall: mass level at which orders are compared (:func:`order_scores`).

    Returns:
        ``(orders per head, mask bool [H, Mq, Mk] in each head's permuted order, info)`` with info
        ``"scores"`` ``[len(orders), H]`` and ``"recall"`` ``[H]`` (mass the mask keeps).
    """
    n = q.shape[2]
    if math.prod(grid) != n:
        raise ValueError(f"grid {tuple(grid)} has {math.prod(grid)} tokens but q has {n}")
    for o in orders:
        _check_order(o)
    best_score = best_idx = best_mass = None
    scores = []
    for i, order in enumerate(orders):
        perm = order_permutation(grid, order, q.device)
        mass = block_mass(q[:, :, perm], k[:, :, perm], lse[:, :, perm], block, block, scale, backend).mean(0)
        s = order_scores(mass, order_recall)
        scores.append(s)
        if best_score is None:
            best_score, best_idx, best_mass = s, torch.zeros_like(s, dtype=torch.long), mass
        else:
            better = s < best_score
            best_score = torch.where(better, s, best_score)
            best_idx = torch.where(better, torch.full_like(best_idx, i), best_idx)
            best_mass = torch.where(better[:, None, None], mass, best_mass)
    mask = threshold_block_mask(best_mass, density)
    recall = (best_mass * mask).sum(dim=(-1, -2)) / best_mass.sum(dim=(-1, -2)).clamp_min(1e-30)
    chosen = [orders[int(i)] for i in best_idx]
    return chosen, mask, {"scores": torch.stack(scores), "recall": recall}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Draw PARO's block masks for synthetic DiT-like attention: per head, frame-major vs its order."""
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("F", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.3)
    args = parser.parse_args(argv)

    from ..kernels import BlockSparseLayout, block_sparse_attention
    from .plot import save_masks
    from .synthetic import synthetic_qkv

    grid = tuple(args.grid)
    q, k, v = synthetic_qkv(grid, heads=args.heads)
    n = q.shape[2]
    _, lse = block_sparse_attention(q, k, v, BlockSparseLayout.dense(1, 1, n, n), backend="torch")
    chosen, mask, info = calibrate_paro(q, k, lse, grid, args.density)
    fhw = threshold_block_mask(block_mass(q, k, lse, 64, 64).mean(0), args.density)
    panels = []
    for i in range(args.heads):
        panels.append((f"head {i}: FHW", fhw[i]))
        panels.append((f"head {i}: {chosen[i]}, recall {float(info['recall'][i]):.3f}", mask[i]))
    save_masks(panels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
