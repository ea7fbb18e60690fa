"""AdaSpa planner: which key blocks to keep, from exact block masses.

AdaSpa ("Training-free and Adaptive Sparse Attention for Efficient Long Video Generation", arXiv
2502.21079; no official code) blockifies attention in 64x64 tiles and scores each tile by its exact
attention mass ``sum_{i in Qblk, j in Kblk} exp(q_i.k_j*scale - lse_i)`` (see
:func:`diffattn.kernels.block_mass`). This module turns those masses into block masks:

* :func:`topk_block_mask` — every query-block row of a head keeps its ``k`` heaviest blocks (the same
  ``k`` for all rows of that head);
* :func:`head_adaptive_sparsity` — the paper's head-adaptive allocation: with base sparsity ``s`` and
  ``n`` heads whose recall at ``s`` exceeds a threshold, the ``n`` best heads get ``(1+s)/2`` and the
  ``n`` worst ``(3s-1)/2``, so the mean stays ``s``;
* :func:`recall_block_mask` — beyond the paper: per head and row, the fewest blocks whose mass
  reaches a target recall (users set quality, not sparsity);
* :func:`plan_adaspa` — the whole planner: masses in, block mask and per-head stats out.

Everything works on the small ``[B, H, Mq, Mk]`` mass tensor; nothing here touches ``N x N``.
Text tokens are not planned here (the method keeps text rows and columns dense).

>>> mass = torch.rand(1, 2, 4, 4)
>>> mask, info = plan_adaspa(mass, sparsity=0.5, head_adaptive=False)
>>> mask.sum(-1).tolist()
[[[2, 2, 2, 2], [2, 2, 2, 2]]]
"""

from __future__ import annotations

import argparse
from typing import Callable, Literal

import torch

__all__ = [
    "block_ranks",
    "topk_block_mask",
    "blocks_for_sparsity",
    "block_recall",
    "head_adaptive_sparsity",
    "recall_block_mask",
    "plan_adaspa",
]


def block_ranks(mass: torch.Tensor) -> torch.Tensor:
    """Rank of every block within its row, 0 = heaviest (ties broken by lower block index)."""
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(mass.shape[-1], device=mass.device).expand_as(order)
    return ranks.scatter_(-1, order, ar)


def blocks_for_sparsity(sparsity: torch.Tensor | float, num_blocks: int) -> torch.Tensor:
    """Blocks kept per row at a sparsity: ``round((1 - s) * Mk)``, at least 1 (never an empty row)."""
    s = torch.as_tensor(sparsity, dtype=torch.float64)
    keep = torch.round((1.0 - s) * num_blocks).to(torch.int64)
    return keep.clamp(1, num_blocks)


def topk_block_mask(mass: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
    """Boolean ``[B, H, Mq, Mk]``: each row keeps its ``keep`` heaviest blocks.

    ``keep`` is an int or an integer tensor broadcastable to ``[B, H]`` (per-head counts).
    """
    keep = torch.as_tensor(keep, device=mass.device).to(torch.int64)
    while keep.ndim < 2:
        keep = keep[None]
    return block_ranks(mass) < keep[..., None, None]


def block_recall(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recall per (batch, head): selected mass / total mass, float32 ``[B, H]`` (1 where no mass)."""
    total = mass.sum(dim=(-1, -2))
    kept = (mass * mask).sum(dim=(-1, -2))
    return torch.where(total > 0, kept / total.clamp_min(1e-30), torch.ones_like(total))


def head_adaptive_sparsity(recall: torch.Tensor, sparsity: float, threshold: float = 0.8) -> torch.Tensor:
    """Per-head sparsity ``[B, H]`` from each head's recall ``[B, H]`` at the base ``sparsity``.

    With ``n`` = number of heads (per batch entry) whose recall exceeds ``threshold``, the ``n`` heads
    of highest recall get ``(1+s)/2`` and the ``n`` of lowest recall get ``(3s-1)/2``; the others keep
    ``s``. Both groups must be disjoint for the mean to stay at ``s``, so ``n`` is capped at ``H // 2``.
    ``(3s-1)/2`` is negative below ``s = 1/3``; there the step shrinks symmetrically so both stay in
    ``[0, 1]`` and the mean is still ``s``.
    """
    b, h = recall.shape
    delta = min((1.0 - sparsity) / 2.0, sparsity)
    n = (recall > threshold).sum(-1).clamp(max=h // 2)  # [B]
    order = torch.argsort(recall, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(h, device=recall.device).expand(b, h))
    best = rank < n[:, None]
    worst = rank >= (h - n)[:, None]
    out = torch.full((b, h), float(sparsity), dtype=torch.float64, device=recall.device)
    out = torch.where(best, out + delta, out)
    out = torch.where(worst, out - delta, out)
    return out


def recall_block_mask(mass: torch.Tensor, target: float) -> torch.Tensor:
    """Per row, the fewest heaviest blocks whose mass reaches ``target`` of the row's mass.

    Rows with no mass keep their first block (never an empty row).
    """
    # float64: the running sums decide membership, and rows hold thousands of small masses.
    sorted_mass, order = torch.sort(mass.double(), dim=-1, descending=True, stable=True)
    total = sorted_mass.sum(-1, keepdim=True)
    before = torch.cumsum(sorted_mass, -1) - sorted_mass  # mass of the heavier blocks
    # A block is needed while the heavier ones alone fall short of the target.
    needed = before < target * total
    needed[..., 0] = True
    return torch.zeros_like(needed).scatter_(-1, order, needed)


def plan_adaspa(
    mass: torch.Tensor,
    sparsity: float = 0.8,
    mode: Literal["topk", "recall"] = "topk",
    head_adaptive: bool = True,
    recall_threshold: float = 0.8,
    target_recall: float = 0.95,
    heads: tuple[int, int, int] | None = None,
    gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Block mask ``[B, H, Mq, Mk]`` from block masses ``[B, H, Mq, Mk]``.

    Args:
        mass: exact block masses (``block_mass`` with each query's LSE).
        sparsity: base fraction of blocks dropped per row (``mode="topk"``).
        mode: ``"topk"`` (the paper: same ``k`` for every row of a head) or ``"recall"``.
        head_adaptive: redistribute sparsity across heads by recall (``mode="topk"`` only).
        recall_threshold: recall above which a head counts as easy in the head-adaptive rule.
        target_recall: mass each row must keep in ``mode="recall"``.
        heads, gather_heads: when ``mass`` holds heads ``start:stop`` of ``total`` (context
            parallelism), the head-adaptive rule ranks the recalls of all heads, gathered by
            ``gather_heads``, and keeps its own heads' share.

    Returns:
        ``mask`` and ``info`` with ``"sparsity"`` ``[B, H]`` (per-head planned sparsity),
        ``"recall"`` ``[B, H]`` (achieved, relative to ``mass``) and ``"density"`` ``[B, H]``.
    """
    if mass.ndim != 4:
        raise ValueError(f"mass must be [B, H, Mq, Mk], got shape {tuple(mass.shape)}")
    mk = mass.shape[-1]
    mass = mass.float()
    if mode == "recall":
        mask = recall_block_mask(mass, target_recall)
        density = mask.float().mean(dim=(-1, -2))
        return mask, {"sparsity": 1.0 - density.double(), "recall": block_recall(mass, mask), "density": density}
    if mode != "topk":
        raise ValueError(f"mode must be 'topk' or 'recall', got {mode!r}")
    b, h = mass.shape[:2]
    base = torch.full((b, h), float(sparsity), dtype=torch.float64, device=mass.device)
    if head_adaptive:
        base_mask = topk_block_mask(mass, blocks_for_sparsity(base, mk))
        recall = block_recall(mass, base_mask)
        if heads is not None:
            recall = gather_heads(recall)
        per_head = head_adaptive_sparsity(recall, sparsity, recall_threshold)
        if heads is not None:
            per_head = per_head[:, heads[0] : heads[1]]
    else:
        per_head = base
    mask = topk_block_mask(mass, blocks_for_sparsity(per_head, mk))
    density = mask.float().mean(dim=(-1, -2))
    return mask, {"sparsity": per_head, "recall": block_recall(mass, mask), "density": density}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Draw AdaSpa's block masks for synthetic DiT-like attention (one panel per head)."""
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("F", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--mode", choices=("topk", "recall"), default="topk")
    parser.add_argument("--target-recall", type=float, default=0.95)
    args = parser.parse_args(argv)

    from ..kernels import BlockSparseLayout, block_mass, block_sparse_attention
    from .plot import save_masks
    from .synthetic import synthetic_qkv

    q, k, v = synthetic_qkv(tuple(args.grid), heads=args.heads)
    n = q.shape[2]
    _, lse = block_sparse_attention(q, k, v, BlockSparseLayout.dense(1, 1, n, n), backend="torch")
    mass = block_mass(q, k, lse, 64, 64)
    mask, info = plan_adaspa(mass, args.sparsity, args.mode, target_recall=args.target_recall)
    panels = [(f"head {i}: recall {float(info['recall'][0, i]):.3f}", mask[0, i]) for i in range(args.heads)]
    frame_blocks = args.grid[1] * args.grid[2] / 64
    save_masks(panels, args.out, lines=[round(f * frame_blocks) for f in range(1, args.grid[0])])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
