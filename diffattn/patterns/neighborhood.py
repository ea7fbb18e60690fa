"""Generalized neighborhood attention (GNA) over a 1-D, 2-D or 3-D token grid, as a tiled block layout.

Papers: "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
(arXiv 2504.16922) and "Faster Neighborhood Attention" (arXiv 2403.04690). Official code:
SHI-Labs/NATTEN (``natten.na1d/na2d/na3d``); the window rule below follows its semantics.

Per axis of length ``L`` with ``kernel_size k``, ``stride s``, ``dilation d`` and ``is_causal``:

* dilation splits the axis into ``d`` groups (``x % d``); a query only sees keys of its own group, and
  the rule runs on in-group indices ``x // d`` over the group's length ``ceil((L - g) / d)``;
* queries are grouped in runs of ``s``; a run shares the window of its leader: the centre query
  (right of centre for even ``s``) or, when causal, the run's last query (both capped at the axis end);
* non-causal: the window holds ``k`` keys centred on the leader (``k // 2`` left of it) and shifts
  inward at the borders, so it always holds ``k`` keys;
* causal: keys from ``leader - k + 1`` up to the query itself (fewer near the start).

A token attends to a key when every axis allows it. ``stride = 1`` is sliding-window NA,
``stride = kernel_size`` is blocked attention, anything between is a strided sliding window.

Tiling: tokens are permuted so each tile (``tile_shape``, e.g. ``(4, 8, 8)``) is contiguous; the grid is
padded up to whole tiles with padding keys that are never attended. A kernel block (``block_size``
tokens) is then a box of the grid, which lets the layout be built per (query block, key block) from
per-axis rules — never from an ``N x N`` token mask — with partial blocks (exact token masks) where a
block is only partly inside the neighbourhoods, so the result is exact.

>>> plan = gna_plan((21, 30, 52), (12, 24, 24), (4, 8, 8), tile_shape=(4, 8, 8), block_size=64)
>>> round(plan.stats["speedup_upper_bound"], 2) > 1
True

Draw one: ``diffattn draw gna --out gna.png`` (the strided preset on Wan's 480p latent grid), or
``diffattn draw gna --shape 8 12 12 --kernel 3 5 5 --query 4 6 6 --out na.png``.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..kernels.layout import BlockSparseLayout, cdiv

__all__ = [
    "PRESETS",
    "GNAPlan",
    "axis_neighborhood",
    "neighborhood_mask_mod",
    "neighborhood_token_mask",
    "check_na_args",
    "fit_to_grid",
    "tile_permutation",
    "permute_tokens",
    "unpermute_tokens",
    "gna_plan",
    "gna_simulate",
]

# Window families for a Wan 480p latent grid (21 x 30 x 52), all on (4, 8, 8) tiles.
PRESETS: dict[str, dict[str, tuple]] = {
    # token-by-token sliding window (NA): every query has its own neighbourhood
    "sliding": dict(kernel_size=(9, 17, 17), stride=(1, 1, 1)),
    # strided sliding window: a tile of queries shares a window of 3 x 3 x 3 tiles that moves tile by
    # tile; (kernel - stride) / 2 is a whole number of tiles, so away from the borders windows are tiles
    "strided": dict(kernel_size=(12, 24, 24), stride=(4, 8, 8)),
    # blocked attention: non-overlapping windows (stride = kernel)
    "blocked": dict(kernel_size=(8, 16, 16), stride=(8, 16, 16)),
}


def _tuple(value: int | bool | Sequence, ndim: int, name: str, kind: type = int) -> tuple:
    if isinstance(value, (int, bool)):
        value = (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} must have one entry per grid axis ({ndim}), got {value}")
    for v in value:
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise TypeError(f"{name} entries must be ints, got {value}")
        if kind is bool and not isinstance(v, bool):
            raise TypeError(f"{name} entries must be bools, got {value}")
    return value


def check_na_args(shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """Normalise per-axis arguments to tuples and check them against the grid (NATTEN's rules)."""
    shape = tuple(int(x) for x in shape)
    nd = len(shape)
    if nd not in (1, 2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be a 1-D, 2-D or 3-D grid of positive sizes, got {shape}")
    k = _tuple(kernel_size, nd, "kernel_size")
    s = _tuple(stride, nd, "stride")
    d = _tuple(dilation, nd, "dilation")
    c = _tuple(is_causal, nd, "is_causal", bool)
    for a in range(nd):
        if k[a] < 1 or s[a] < 1 or d[a] < 1:
            raise ValueError(f"kernel_size, stride and dilation must be >= 1, got {k}, {s}, {d}")
        if s[a] > k[a]:
            raise ValueError(f"stride must be <= kernel_size on every axis, got stride={s} kernel_size={k}")
        if k[a] * d[a] > shape[a]:
            raise ValueError(
                f"kernel_size * dilation must not exceed the grid on axis {a}: {k[a]} * {d[a]} > {shape[a]} "
                f"(grid {shape}); use a smaller kernel/dilation or fit_to_grid()"
            )
    return shape, k, s, d, c


def fit_to_grid(shape, kernel_size, stride=1, dilation=1, is_causal=False):
    """Clip per-axis arguments so they are valid on ``shape``: a kernel at least as large as an axis
    makes that axis dense (non-causal) or fully causal. Returns ``(kernel, stride, dilation, causal)``."""
    shape = tuple(int(x) for x in shape)
    nd = len(shape)
    k = _tuple(kernel_size, nd, "kernel_size")
    s = _tuple(stride, nd, "stride")
    d = _tuple(dilation, nd, "dilation")
    c = _tuple(is_causal, nd, "is_causal", bool)
    dd = tuple(max(1, min(di, L)) for di, L in zip(d, shape))
    kk = tuple(max(1, min(ki, L // di)) for ki, di, L in zip(k, dd, shape))
    ss = tuple(max(1, min(si, ki)) for si, ki in zip(s, kk))
    return kk, ss, dd, c


def _axis_window(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, device=None):
    """Per position ``x`` of one axis: its dilation group, its in-group index and the in-group key
    range ``[start, end)`` its window covers (the rule of the module docstring), each int64 ``[length]``."""
    L, k, s, d = length, kernel_size, stride, dilation
    x = torch.arange(L, device=device)
    g, xi = x % d, x // d
    group_len = (L - g + d - 1) // d
    if is_causal:
        leader = torch.minimum((xi // s) * s + s - 1, group_len - 1)
        start = (leader - k + 1).clamp_min(0)
        end = xi + 1
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum((xi // s) * s + s // 2, group_len - 1)
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        start = centre - left
        end = start + k
    return g, xi, start, end


def axis_neighborhood(length: int, kernel_size: int, stride: int = 1, dilation: int = 1, is_causal: bool = False):
    """Bool ``[length, length]``: entry ``[x, y]`` says whether query ``x`` sees key ``y`` on one axis."""
    g, xi, start, end = _axis_window(length, kernel_size, stride, dilation, is_causal)
    yi = xi[None, :]
    return (g[:, None] == g[None, :]) & (yi >= start[:, None]) & (yi < end[:, None])


def neighborhood_mask_mod(shape, kernel_size, stride=1, dilation=1, is_causal=False, device=None):
    """The NA rule as a pointwise ``mask_mod(b, h, q_idx, kv_idx)`` over row-major grid indices (the
    FlexAttention / attention-gym form): True where query ``q_idx`` sees key ``kv_idx``. Tensor
    arguments broadcast; only table lookups, so it traces under ``vmap`` and ``torch.compile``."""
    shape, k, s, d, c = check_na_args(shape, kernel_size, stride, dilation, is_causal)
    tables = [_axis_window(L, k[a], s[a], d[a], c[a], device) for a, L in enumerate(shape)]
    pitch = [math.prod(shape[a + 1 :]) for a in range(len(shape))]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for (g, xi, start, end), L, step in zip(tables, shape, pitch):
            x, y = (q_idx // step) % L, (kv_idx // step) % L
            axis = (g[x] == g[y]) & (xi[y] >= start[x]) & (xi[y] < end[x])
            keep = axis if keep is None else keep & axis
        return keep

    return mask_mod


def neighborhood_token_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> torch.Tensor:
    """Token-level NA mask ``[N, N]`` in row-major grid order, from :func:`neighborhood_mask_mod`
    (small shapes: tests and plots)."""
    mod = neighborhood_mask_mod(shape, kernel_size, stride, dilation, is_causal)
    n = math.prod(check_na_args(shape, kernel_size, stride, dilation, is_causal)[0])
    idx = torch.arange(n)
    return mod(0, 0, idx[:, None], idx[None, :])


# ---------------------------------------------------------------------------------------------- tiling
def _check_tile(shape, tile_shape, block_size):
    nd = len(shape)
    tile = _tuple(tile_shape, nd, "tile_shape")
    if min(tile) < 1:
        raise ValueError(f"tile_shape entries must be >= 1, got {tile}")
    vol = math.prod(tile)
    # A block must be a box of the grid: `m` consecutive slabs along one axis of the tile, whole along the
    # axes after it. That needs block_size = m * prod(tile[a+1:]) with m dividing tile[a].
    suffix = 1
    for a in reversed(range(nd)):
        if block_size % suffix == 0 and suffix <= block_size <= suffix * tile[a]:
            if tile[a] % (block_size // suffix) == 0:
                return tile
        suffix *= tile[a]
    raise ValueError(
        f"tile_shape={tile} (volume {vol}) cannot be cut into boxes of block_size={block_size} tokens; "
        f"use a tile whose trailing axes multiply to a divisor of {block_size}, e.g. (4, 8, 8) for 64 or 128"
    )


def tile_permutation(shape, tile_shape) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Where each token (row-major grid order) goes in the tiled order, and the padded grid shape.

    Returns ``(perm, padded_shape)``: ``perm`` int64 ``[N]``, token ``i`` moves to position ``perm[i]`` of
    the tiled sequence of ``prod(padded_shape)`` positions (tiles in row-major order, row-major inside).
    """
    shape, tile = tuple(shape), tuple(tile_shape)
    padded = tuple(cdiv(L, t) * t for L, t in zip(shape, tile))
    tiles = tuple(p // t for p, t in zip(padded, tile))
    coords = torch.stack(torch.meshgrid(*[torch.arange(L) for L in shape], indexing="ij"), -1).reshape(-1, len(shape))
    tile_idx = torch.zeros(coords.shape[0], dtype=torch.int64)
    in_tile = torch.zeros(coords.shape[0], dtype=torch.int64)
    for a in range(len(shape)):
        tile_idx = tile_idx * tiles[a] + coords[:, a] // tile[a]
        in_tile = in_tile * tile[a] + coords[:, a] % tile[a]
    return tile_idx * math.prod(tile) + in_tile, padded


def _position_coords(padded, tile) -> torch.Tensor:
    """Grid coordinates ``[Np, ndim]`` of every position of the tiled (padded) sequence."""
    nd = len(padded)
    tiles = [p // t for p, t in zip(padded, tile)]
    pos = torch.arange(math.prod(padded))
    t_flat, u_flat = pos // math.prod(tile), pos % math.prod(tile)
    out = torch.empty(pos.numel(), nd, dtype=torch.int64)
    for a in reversed(range(nd)):
        out[:, a] = (t_flat % tiles[a]) * tile[a] + u_flat % tile[a]
        t_flat, u_flat = t_flat // tiles[a], u_flat // tile[a]
    return out


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, padded_len: int) -> torch.Tensor:
    """``[..., N, D]`` (or ``[..., N]``) in grid order → ``[..., padded_len, ...]`` in tiled order, zeros
    at padding positions."""
    seq_dim = x.ndim - 2 if x.ndim >= 4 else x.ndim - 1
    shape = list(x.shape)
    shape[seq_dim] = padded_len
    out = x.new_zeros(shape)
    out.index_copy_(seq_dim, perm.to(x.device), x)
    return out


def unpermute_tokens(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_tokens`: gather the real tokens back into grid order."""
    seq_dim = y.ndim - 2 if y.ndim >= 4 else y.ndim - 1
    return y.index_select(seq_dim, perm.to(y.device))


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True, eq=False)
class GNAPlan:
    """Everything needed to run GNA on one grid: permutation, padded length, layout and its stats.

    Attributes:
        shape: the grid. kernel_size, stride, dilation, is_causal: per-axis arguments (validated).
        tile_shape: tile of the permutation. perm: int64 ``[N]`` (see :func:`tile_permutation`).
        padded_len: length of the tiled sequence. layout: block layout over it (partial blocks exact).
        stats: see :func:`gna_simulate`.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    tile_shape: tuple[int, ...]
    perm: torch.Tensor
    padded_len: int
    layout: BlockSparseLayout
    stats: dict[str, Any]


def _build_plan(shape, k, s, d, c, tile, block_size, device) -> GNAPlan:
    nd = len(shape)
    perm, padded = tile_permutation(shape, tile)
    np_ = math.prod(padded)
    nblk = np_ // block_size
    pos = _position_coords(padded, tile).view(nblk, block_size, nd)
    box_lo = pos.amin(1)  # [nblk, nd]: each block is a box of the grid (checked by _check_tile)
    dims = (pos.amax(1) - box_lo + 1)[0].tolist()  # every block's box has the same extent

    # Along one axis a block is fully described by its box origin, and only a few origins exist: decide
    # "any kept token pair" and "all pairs kept" per pair of origins, then look the answers up per block.
    any_ = torch.ones(nblk, nblk, dtype=torch.bool)
    full = torch.ones(nblk, nblk, dtype=torch.bool)
    axis_masks, origin_ids, axis_subs = [], [], []
    for a in range(nd):
        m = axis_neighborhood(shape[a], k[a], s[a], d[a], c[a])
        ext = torch.zeros(padded[a], padded[a], dtype=torch.bool)
        ext[: shape[a], : shape[a]] = m
        axis_masks.append(ext)
        origins, where = torch.unique(box_lo[:, a], return_inverse=True)
        span = origins[:, None] + torch.arange(dims[a])[None, :]
        sub = ext[span[:, None, :, None], span[None, :, None, :]]  # [O, O, m, m]: query box x key box
        real_q = (span < shape[a])[:, None, :, None]
        # Padding queries are don't-care (their outputs are dropped); padding keys are never attended.
        tab_any = (sub & real_q).flatten(2).any(-1)
        tab_full = (sub | ~real_q).flatten(2).all(-1) & real_q.flatten(1).any(-1)[:, None]
        any_ &= tab_any[where][:, where]
        full &= tab_full[where][:, where]
        origin_ids.append(where)
        axis_subs.append(sub)
    full &= any_
    layout = BlockSparseLayout.from_block_mask(any_[None, None].contiguous(), block_size, block_size, np_, np_)
    partial = any_ & ~full
    n_partial = int(partial.sum())
    if n_partial:
        qb, kb = partial.nonzero(as_tuple=True)
        # A partial block's token mask is the outer AND of one small per-axis sub-matrix per axis. Number
        # the distinct sub-matrices of each axis, then build each distinct combination once.
        code = torch.zeros(qb.numel(), dtype=torch.int64)
        subs = []
        for a in range(nd):
            sub = axis_subs[a]
            n_o = sub.shape[0]
            content, cid = torch.unique(sub.reshape(n_o * n_o, -1), dim=0, return_inverse=True)
            subs.append(content.view(-1, dims[a], dims[a]))
            where = origin_ids[a]
            code = code * content.shape[0] + cid.view(n_o, n_o)[where[qb], where[kb]]
        uniq_code, inverse = torch.unique(code, return_inverse=True)
        per_axis = []
        for a in reversed(range(nd)):
            per_axis.append(uniq_code % subs[a].shape[0])
            uniq_code = uniq_code // subs[a].shape[0]
        per_axis.reverse()
        u = per_axis[0].numel()
        tok = torch.ones(u, *dims, *dims, dtype=torch.bool)
        for a in range(nd):
            # Broadcast axis a's rule over the other axes of the query box and of the key box.
            shape_q = [dims[a] if i == a else 1 for i in range(nd)]
            tok &= subs[a][per_axis[a]].reshape(u, *shape_q, *shape_q)
        block_masks = tok.reshape(u, block_size, block_size)
        pid = torch.full(partial.shape, -1, dtype=torch.int32)
        pid[qb, kb] = inverse.to(torch.int32)
        ids = torch.gather(pid[None, None], -1, layout.kv_indices.clamp_min(0).long())
        ids = torch.where(layout.kv_indices >= 0, ids, torch.full_like(ids, -1))
        layout = replace(layout, kv_mask_ids=ids.contiguous(), block_masks=block_masks.contiguous())

    n = math.prod(shape)
    dense_pairs = cdiv(n, block_size) ** 2
    visited = int(any_.sum())
    kept_pairs = math.prod(int(axis_masks[a].sum()) for a in range(nd))
    stats = {
        "tokens": n,
        "padded_tokens": np_,
        "block_size": block_size,
        "dense_block_pairs": dense_pairs,
        "visited_block_pairs": visited,
        "partial_block_pairs": n_partial,
        "partial_fraction": n_partial / max(visited, 1),
        "block_density": visited / dense_pairs,
        "token_density": kept_pairs / n**2,
        "speedup_upper_bound": dense_pairs / max(visited, 1),
    }
    if str(device) != "cpu":
        layout = layout.to(device)
        perm = perm.to(device)
    return GNAPlan(tuple(shape), k, s, d, c, tile, perm, np_, layout, stats)


@functools.lru_cache(maxsize=32)
def _plan_cached(shape, k, s, d, c, tile, block_size, device) -> GNAPlan:
    return _build_plan(shape, k, s, d, c, tile, block_size, device)


def gna_plan(
    shape: Sequence[int],
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    tile_shape=None,
    block_size: int = 64,
    device: torch.device | str = "cpu",
) -> GNAPlan:
    """Plan GNA on a grid: validated arguments, tiling permutation and exact block layout (cached).

    ``tile_shape`` defaults to 64-token tiles shaped for the grid's rank: ``(64,)``, ``(8, 8)``,
    ``(1, 8, 8)``. ``block_size`` must cut a tile into boxes (see :func:`_check_tile`).
    """
    shape, k, s, d, c = check_na_args(shape, kernel_size, stride, dilation, is_causal)
    if tile_shape is None:
        tile_shape = {1: (64,), 2: (8, 8), 3: (1, 8, 8)}[len(shape)]
    tile = _check_tile(shape, tile_shape, block_size)
    return _plan_cached(shape, k, s, d, c, tile, int(block_size), str(torch.device(device)))


def gna_simulate(shape, kernel_size, stride=1, dilation=1, is_causal=False, tile_shape=None, block_size=64):
    """Block-count "simulator": how much a GNA layout could speed attention up at best.

    Returns a dict: ``tokens``, ``padded_tokens``, ``dense_block_pairs`` (``ceil(N/block)**2``, what
    dense attention computes), ``visited_block_pairs``, ``partial_block_pairs`` and ``partial_fraction``
    (share of visited blocks that need a token mask), ``block_density``, ``token_density`` (exact share of
    attended token pairs) and ``speedup_upper_bound = dense_block_pairs / visited_block_pairs``.
    """
    return dict(gna_plan(shape, kernel_size, stride, dilation, is_causal, tile_shape, block_size).stats)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[21, 30, 52],
                    help="grid, 1 to 3 axes (default 21 30 52: Wan 2.1's latent grid at 480p, 81 frames)")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="window family (kernel and stride); default strided unless --kernel is given")
    ap.add_argument("--kernel", type=int, nargs="+", help="kernel_size per axis")
    ap.add_argument("--stride", type=int, nargs="+", default=[1])
    ap.add_argument("--dilation", type=int, nargs="+", default=[1])
    ap.add_argument("--causal", type=int, nargs="+", default=[0], help="1 = causal along that axis")
    ap.add_argument("--tile", type=int, nargs="+", help="tile shape (default: 64-token tiles)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--query", type=int, nargs="+", help="also draw this query's neighbourhood (grid coords)")
    ap.add_argument("--out", required=True, help="image file to write, e.g. na.png")
    a = ap.parse_args(argv)
    nd = len(a.shape)

    def per_axis(v):
        return tuple(v) * nd if len(v) == 1 else tuple(v)

    kernel, stride = a.kernel, a.stride
    preset = a.preset or (None if kernel else "strided")
    if preset:
        kernel = kernel or PRESETS[preset]["kernel_size"][-nd:]
        stride = PRESETS[preset]["stride"][-nd:] if a.stride == [1] else stride
    k, s, d, c = fit_to_grid(
        a.shape, per_axis(kernel), per_axis(stride), per_axis(a.dilation), tuple(bool(x) for x in per_axis(a.causal))
    )
    plan = gna_plan(a.shape, k, s, d, c, tuple(a.tile) if a.tile else None, a.block_size)
    from .plot import save_masks

    panels = [(f"block layout ({a.block_size}) in tiled order", plan.layout.to_block_mask()[0, 0])]
    n = math.prod(a.shape)
    if n <= 4096:
        panels.append((f"token mask, grid order, k={k} s={s} d={d}", neighborhood_token_mask(a.shape, k, s, d, c)))
    if a.query:
        q = tuple(a.query)
        flat = sum(x * math.prod(a.shape[ax + 1 :]) for ax, x in enumerate(q))
        keep = neighborhood_mask_mod(a.shape, k, s, d, c)(0, 0, torch.tensor(flat), torch.arange(n)).view(a.shape)
        # Frames side by side: rows are H, columns run over W within each frame, frame after frame.
        grid2d = keep[None] if nd == 1 else keep if nd == 2 else keep.permute(1, 0, 2).reshape(a.shape[1], -1)
        panels.append((f"keys of query {q} (frames side by side)", grid2d))
    save_masks(panels, a.out)
    st = plan.stats
    print(
        f"{a.out}: visited {st['visited_block_pairs']}/{st['dense_block_pairs']} block pairs, "
        f"partial {st['partial_fraction']:.2f}, speedup bound {st['speedup_upper_bound']:.2f}x"
    )


if __name__ == "__main__":
    main()
