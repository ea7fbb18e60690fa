"""Token merging on a 2-D token grid: bipartite soft matching with a strided destination set.

Papers: "Token Merging: Your ViT But Faster" (arXiv 2210.09461) and "Token Merging for Fast Stable
Diffusion" (arXiv 2303.17604); official code dbolya/tomesd (``tomesd/merge.py``). AgentSD
(arXiv 2312.08874, LeapLabTHU/Agent-Attention ``agentsd/merge.py``) merges twice from one matching: a
mild merge for the attention tokens and a strong one whose result are the agent tokens.

The matching, for ``N = h*w`` tokens and a metric ``[B, N, C]``:

1. Destinations: the grid is cut into ``sy x sx`` windows from the top-left corner; each whole window
   holds one destination (a random cell of the window, or its top-left cell). Rows and columns past the
   last whole window hold sources only. Every other token is a source.
2. Each source finds its most similar destination (cosine similarity of the metric) — anywhere on the
   grid, not only in its window.
3. Sources are ranked by that best similarity; merging ``r`` tokens averages the ``r`` best-ranked
   sources into their destinations, the other sources stay as they are.

A merge is described by one index per token, ``slot [B, N]``: the merged token that token belongs to.
The merged sequence is ``[kept sources (ascending token index), destinations (raster order)]``, so
``merge`` is a scatter-mean into slots and ``unmerge`` a gather from them; a token that was not merged
comes back bit-exactly. Several merges of different strength can share one :class:`Matching`.

>>> metric = torch.randn(2, 8 * 8, 16)
>>> m = bipartite_matching(metric, (8, 8), (2, 2))
>>> tm = m.merge_plan(24)
>>> x = torch.randn(2, 3, 64, 5)                       # [B, heads, N, D]: any middle dims
>>> tm.merge(x).shape, tm.unmerge(tm.merge(x)).shape
(torch.Size([2, 3, 40, 5]), torch.Size([2, 3, 64, 5]))

Draw one: ``diffattn draw tome --grid 32 32 --stride 4 4 --ratio 0.4 --out tome.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Matching",
    "TokenMerge",
    "bipartite_matching",
    "token_merge",
    "merge_count",
    "fit_stride",
    "destination_indices",
]


def _check_grid(grid: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must be (h, w) with positive ints, got {grid!r}")
    if len(stride) != 2 or any(not isinstance(s, int) or s < 1 for s in stride):
        raise ValueError(f"stride must be (sy, sx) with positive ints (AgentSD: (4, 4), ToMe: (2, 2)), got {stride!r}")
    (h, w), (sy, sx) = grid, stride
    if sy > h or sx > w:
        raise ValueError(
            f"stride {stride} does not fit the grid {grid}: every axis needs at least one whole window; "
            "use a smaller stride (fit_stride picks one)"
        )
    return h, w, sy, sx


def fit_stride(grid: tuple[int, int], stride: tuple[int, int], min_windows: int = 4) -> tuple[int, int]:
    """``stride`` with each axis halved until that axis holds ``min_windows`` whole windows (or is 1).

    Small grids get a finer destination set: at 8 x 8 a 4 x 4 stride would leave 4 destinations in
    all; halving gives 2 x 2 windows (16 destinations).

    >>> fit_stride((64, 64), (4, 4)), fit_stride((8, 8), (4, 4)), fit_stride((3, 40), (2, 2))
    ((4, 4), (2, 2), (1, 2))
    """
    out = []
    for size, s in zip(grid, stride):
        while s > 1 and size // s < min_windows:
            s //= 2
        out.append(max(1, min(s, size)))
    return out[0], out[1]


def destination_indices(
    grid: tuple[int, int],
    stride: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Token indices (int64 ``[num_windows]``, raster order of windows) of the destination tokens.

    With a ``generator`` each window's destination is a uniformly random cell of the window (drawn on
    the CPU from the generator, so the draw does not depend on the device); without one it is the
    window's top-left cell.
    """
    h, w, sy, sx = _check_grid(grid, stride)
    hs, ws = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(hs, ws, dtype=torch.int64)
    else:
        offset = torch.randint(sy * sx, (hs, ws), generator=generator, dtype=torch.int64)
    rows = torch.arange(hs)[:, None] * sy + offset // sx
    cols = torch.arange(ws)[None, :] * sx + offset % sx
    return (rows * w + cols).flatten().to(device)


def merge_count(num_tokens: int, ratio: float, num_sources: int) -> int:
    """Tokens removed by merging ``ratio`` of ``num_tokens``: ``int(N * ratio)``, at most the sources."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    return min(int(num_tokens * ratio), num_sources)


@dataclass(frozen=True)
class TokenMerge:
    """One merge: which merged token (``slot``) each of the ``N`` tokens belongs to.

    Attributes:
        slot: int64 ``[B, N]``, the merged-sequence position of every token. Kept sources occupy slots
            ``0 .. num_kept-1`` (ascending token index), destinations the last ``num_dst`` slots.
        sizes: float32 ``[B, num_merged]``, how many tokens each merged token stands for.
        num_kept: sources left unmerged.
        num_dst: destinations (one per window).
    """

    slot: torch.Tensor
    sizes: torch.Tensor
    num_kept: int
    num_dst: int

    @property
    def num_tokens(self) -> int:
        return self.slot.shape[1]

    @property
    def num_merged(self) -> int:
        return self.num_kept + self.num_dst

    def _flat(self, x: torch.Tensor, n: int, what: str) -> torch.Tensor:
        b = self.slot.shape[0]
        if x.ndim < 3 or x.shape[-2] != n or x.shape[0] not in (1, b):
            raise ValueError(
                f"{what} must be [B, ..., {n}, C] with B = {b}, got shape {tuple(x.shape)}"
            )
        return x.expand(b, *x.shape[1:]).reshape(b, -1, n, x.shape[-1])

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Average tokens into their slots: ``[B, ..., N, C]`` -> ``[B, ..., num_merged, C]``.

        Sums accumulate in float32; a slot holding one token returns that token exactly.
        """
        flat = self._flat(x, self.num_tokens, "x")
        b, m, n, c = flat.shape
        index = self.slot[:, None, :, None].expand(b, m, n, c)
        acc = flat.new_zeros((b, m, self.num_merged, c), dtype=torch.float32)
        acc.scatter_add_(2, index, flat.float())
        out = acc / self.sizes[:, None, :, None]
        return out.to(x.dtype).reshape(b, *x.shape[1:-2], self.num_merged, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Copy every merged token back to the tokens it stands for: ``[B, ..., num_merged, C]`` -> ``[B, ..., N, C]``."""
        flat = self._flat(y, self.num_merged, "y")
        b, m, _, c = flat.shape
        index = self.slot[:, None, :, None].expand(b, m, self.num_tokens, c)
        out = torch.gather(flat, 2, index)
        return out.reshape(b, *y.shape[1:-2], self.num_tokens, c)

    def log_sizes(self) -> torch.Tensor:
        """``log(sizes)`` ``[B, 1, 1, num_merged]``: the additive key bias of proportional attention."""
        return self.sizes.log()[:, None, None, :]


@dataclass(frozen=True)
class Matching:
    """The bipartite matching of one metric; :meth:`merge_plan` turns it into merges of any strength.

    Attributes:
        grid: ``(h, w)`` token grid.
        dst: int64 ``[num_dst]`` token indices of the destinations (raster order of windows).
        src: int64 ``[num_src]`` token indices of the sources (ascending).
        order: int64 ``[B, num_src]`` source positions (into ``src``) ranked by their best similarity,
            most similar first.
        target: int64 ``[B, num_src]`` the best destination (position into ``dst``) of every source.
        score: float32 ``[B, num_src]`` that best cosine similarity.
    """

    grid: tuple[int, int]
    dst: torch.Tensor
    src: torch.Tensor
    order: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def merge_plan(self, r: int) -> TokenMerge:
        """Merge the ``r`` best-ranked sources into their destinations (``0 <= r <= num_src``)."""
        num_src, num_dst = self.src.numel(), self.dst.numel()
        if not isinstance(r, int) or not 0 <= r <= num_src:
            raise ValueError(f"r must be an int in [0, {num_src}] (the number of sources), got {r!r}")
        b, n, device = self.order.shape[0], self.num_tokens, self.order.device
        merged_pos = self.order[:, :r]
        kept_pos = self.order[:, r:].sort(dim=1).values  # ascending position = ascending token index
        num_kept = num_src - r
        slot = torch.empty(b, n, dtype=torch.int64, device=device)
        src = self.src.to(device)
        slot[:, self.dst.to(device)] = num_kept + torch.arange(num_dst, device=device)
        slot.scatter_(1, src[kept_pos], torch.arange(num_kept, device=device).expand(b, num_kept))
        into = torch.gather(self.target, 1, merged_pos)
        slot.scatter_(1, src[merged_pos], num_kept + into)
        sizes = torch.ones(b, num_kept + num_dst, dtype=torch.float32, device=device)
        sizes[:, num_kept:].scatter_add_(1, into, torch.ones_like(into, dtype=torch.float32))
        return TokenMerge(slot=slot, sizes=sizes, num_kept=num_kept, num_dst=num_dst)


def bipartite_matching(
    metric: torch.Tensor,
    grid: tuple[int, int],
    stride: tuple[int, int],
    generator: torch.Generator | None = None,
) -> Matching:
    """Match every source token to its most similar destination.

    Args:
        metric: ``[B, N, C]`` features compared by cosine similarity, ``N = h * w`` in raster order.
        grid: ``(h, w)``.
        stride: ``(sy, sx)`` destination windows (must fit the grid; see :func:`fit_stride`).
        generator: draws a random destination per window (shared by the batch, so the two halves of a
            CFG batch merge alike); ``None`` takes each window's top-left cell.
    """
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    h, w, _, _ = _check_grid(tuple(grid), tuple(stride))
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"metric has {n} tokens but grid {tuple(grid)} holds {h * w}")
    # The split depends only on the grid and the draw, so it is built on the CPU, where ``nonzero`` needs
    # no device round trip; copying the two index tensors to the device after it is a synchronous
    # host-to-device transfer.
    dst = destination_indices((h, w), tuple(stride), generator)
    is_dst = torch.zeros(n, dtype=torch.bool)
    is_dst[dst] = True
    src = (~is_dst).nonzero().flatten().to(metric.device)
    dst = dst.to(metric.device)
    unit = F.normalize(metric, dim=-1, eps=1e-6)
    scores = unit[:, src] @ unit[:, dst].transpose(-1, -2)
    best, target = scores.max(dim=-1)
    # A stable sort keeps equal-similarity sources in token order, so plans are deterministic.
    order = torch.sort(best.float(), dim=-1, descending=True, stable=True).indices
    return Matching(grid=(h, w), dst=dst, src=src, order=order, target=target, score=best.float())


def token_merge(
    metric: torch.Tensor,
    grid: tuple[int, int],
    stride: tuple[int, int] = (2, 2),
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> TokenMerge:
    """ToMe for SD in one call: remove ``int(N * ratio)`` tokens (at most the sources) by merging.

    >>> tm = token_merge(torch.randn(1, 16 * 16, 8), (16, 16), (2, 2), 0.5)
    >>> tm.num_merged
    128
    """
    m = bipartite_matching(metric, grid, stride, generator)
    return m.merge_plan(merge_count(m.num_tokens, ratio, m.src.numel()))


def smooth_features(grid: tuple[int, int], channels: int = 16, detail: int = 4, seed: int = 0) -> torch.Tensor:
    """A smooth random feature field ``[1, h*w, channels]`` (low-resolution noise, upsampled): image-like
    tokens for drawing merges without a model."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    low = torch.randn(1, channels, max(1, h // detail), max(1, w // detail), generator=gen)
    field = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return field.flatten(2).transpose(1, 2)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    ap.add_argument("--stride", type=int, nargs=2, default=(4, 4), metavar=("SY", "SX"))
    ap.add_argument("--ratio", type=float, default=0.4, help="fraction of tokens merged away (AgentSD: 0.4)")
    ap.add_argument("--agent-ratio", type=float, default=0.95, help="second, stronger merge giving agents")
    ap.add_argument("--random", action="store_true", help="random destination per window (ToMe's use_rand)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="image file to write, e.g. tome.png")
    a = ap.parse_args(argv)
    from .plot import _pyplot, save_figure

    grid, stride = tuple(a.grid), tuple(a.stride)
    metric = smooth_features(grid, seed=a.seed)
    gen = torch.Generator().manual_seed(a.seed) if a.random else None
    m = bipartite_matching(metric, grid, stride, gen)
    num_src = m.src.numel()
    panels = []
    for name, ratio in (("merge", a.ratio), ("agents", a.agent_ratio)):
        tm = m.merge_plan(merge_count(m.num_tokens, ratio, num_src))
        # Random colours per merged token, so neighbouring groups are told apart.
        colour = torch.randperm(tm.num_merged, generator=torch.Generator().manual_seed(1))
        image = colour[tm.slot[0]].float().reshape(grid)
        image[tm.slot[0].reshape(grid) < tm.num_kept] = float("nan")
        panels.append((f"{name} ratio {ratio}: {tm.num_tokens} -> {tm.num_merged} tokens", image))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    axes[0].imshow(metric[0, :, :3].reshape(*grid, 3).sub(metric.min()).div(metric.max() - metric.min()).numpy())
    ys, xs = (m.dst // grid[1]).numpy(), (m.dst % grid[1]).numpy()
    axes[0].scatter(xs, ys, s=4, c="white", marker="x")
    axes[0].set_title(f"metric (3 channels), destinations x (stride {stride})", fontsize=9)
    cmap = plt.get_cmap("tab20").with_extremes(bad="black")
    for ax, (title, image) in zip(axes[1:], panels):
        ax.imshow(image.numpy(), cmap=cmap, interpolation="nearest")
        ax.set_title(f"{title}\n(colour = merged group, black = kept as is)", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, a.out)
    print(f"{a.out}: grid {grid}, stride {stride}, {m.dst.numel()} destinations")


if __name__ == "__main__":
    main()
