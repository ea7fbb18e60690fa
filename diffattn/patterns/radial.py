"""Radial attention: a static O(n log n) mask from spatiotemporal energy decay.

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation"
(arXiv 2506.19852). Official code: mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``.

The rule, for query frame ``i``, key frame ``j``, ``dist = |i - j|``, ``P`` tokens per frame and the
pattern block ``b`` (128 in the official code), with ``bitlen`` Python's ``int.bit_length``:

* ``decay = 2**bitlen(P) / 2**bitlen(dist)``;
* the window is ``P`` (whole frame) when ``dist <= 1``, else ``max(decay * decay_factor, b)``;
  token ``(r, c)`` of the frame pair (in-frame indices) is kept where ``|c - r| <= window``;
* temporal striding: when ``decay < b`` the pair is kept only if ``dist % (b // decay) == 0`` (this
  applies to every distance, so with frames shorter than ``b / 2`` tokens even neighbours are dropped);
* with ``attention_sink`` (Wan) every query frame attends densely to key frame 0.

The official code floors the window at its block size and hard-codes 128 as the striding threshold;
its runs always use 128-token blocks, so both are ``pattern_block`` here. The kernel tile
(``block_size`` in the method) is separate: the layout reproduces the pattern exactly at any tile.

Each frame pair's token mask is then shrunk to blocks of ``b`` tokens on the global block grid: a
block is kept where more than 60% of its non-empty columns have more than ``b/3`` kept rows (counted
out of ``b``); the frame pairs' block masks are OR-ed. Text rows and columns are always dense — the
methods handle text tokens exactly outside this planner, so the planner only covers video tokens.

Two deliberate differences from the official code, both places where it loses coverage by accident:
a frame that straddles one more block than ``ceil(P/b)`` keeps its last block (the official shrink
truncates it; ``official_truncation=True`` reproduces that, bit for bit), and the video block that also
holds text tokens follows the rule instead of being forced dense (text is handled exactly elsewhere).

Everything is computed in closed form per (frame pair, block) — no Python loop over frame pairs —
and cached per shape.

>>> m = radial_block_mask(frames=8, tokens_per_frame=96, decay_factor=1.0, pattern_block=32)
>>> m.shape, bool(m.diagonal().all())
(torch.Size([24, 24]), True)

Draw one: ``diffattn draw radial --frames 21 --tokens-per-frame 1560 --out mask.png``.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import replace

import torch

from ..kernels.layout import BlockSparseLayout, cdiv
from . import check_block_size

__all__ = [
    "radial_frame_rule",
    "radial_mask_mod",
    "radial_token_mask",
    "radial_block_mask",
    "radial_layout",
    "block_mask_to_layout",
]

# Strict thresholds of the shrink rule, as integer ratios: a column counts when more than 1/3 of the
# block's rows are kept, a block is kept when more than 3/5 of its non-empty columns count.
_COL_NUM, _COL_DEN = 1, 3
_BLK_NUM, _BLK_DEN = 3, 5


def _check(frames: int, tokens_per_frame: int, decay_factor: float, pattern_block: int) -> None:
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be an int >= 1, got {tokens_per_frame!r}")
    if not (decay_factor > 0 and math.isfinite(decay_factor)):
        raise ValueError(f"decay_factor must be a positive number (0.2 Wan, 0.95 HunyuanVideo), got {decay_factor!r}")
    check_block_size(pattern_block, "pattern_block", "official: 128")


def radial_frame_rule(
    frames: int, tokens_per_frame: int, decay_factor: float, pattern_block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame distance ``0..frames-1``: the in-frame window (int64) and whether the pair is kept.

    Returns ``(window, kept)``, each ``[frames]``. ``window[d] >= tokens_per_frame`` means the whole
    frame pair; token ``(r, c)`` of a kept pair at distance ``d`` is kept where ``|c - r| <= window[d]``.
    The attention sink (key frame 0) is not part of this table.
    """
    _check(frames, tokens_per_frame, decay_factor, pattern_block)
    top = 2 ** tokens_per_frame.bit_length()
    window, kept = [], []
    for d in range(frames):
        decay = top / 2 ** d.bit_length()
        if d <= 1:
            w = float(tokens_per_frame)
        else:
            w = max(decay * decay_factor, float(pattern_block))
        # Both are powers of two, so the ratio is exact; the official code compares floats the same way.
        keep = decay >= pattern_block or d % int(pattern_block / decay) == 0
        window.append(int(math.floor(w)))
        kept.append(keep)
    return torch.tensor(window, dtype=torch.int64), torch.tensor(kept, dtype=torch.bool)


def radial_mask_mod(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    pattern_block: int = 128,
    attention_sink: bool = False,
    device=None,
):
    """The token rule (before the block shrink) as a pointwise ``mask_mod(b, h, q_idx, kv_idx)`` over
    video token indices (the FlexAttention / attention-gym form). Tensor arguments broadcast; only
    table lookups, so it traces under ``vmap`` and ``torch.compile``."""
    window, kept = radial_frame_rule(frames, tokens_per_frame, decay_factor, pattern_block)
    window, kept = window.to(device), kept.to(device)
    p = tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        dist = (q_idx // p - kv_idx // p).abs()
        keep = ((kv_idx % p - q_idx % p).abs() <= window[dist]) & kept[dist]
        if attention_sink:
            keep = keep | (kv_idx < p)
        return keep

    return mask_mod


def radial_token_mask(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    pattern_block: int = 128,
    attention_sink: bool = False,
) -> torch.Tensor:
    """Token-level radial mask among video tokens, bool ``[N, N]`` with ``N = frames * tokens_per_frame``,
    from :func:`radial_mask_mod` (for tests and plots: it is ``N x N``)."""
    mod = radial_mask_mod(frames, tokens_per_frame, decay_factor, pattern_block, attention_sink)
    idx = torch.arange(frames * tokens_per_frame)
    return mod(0, 0, idx[:, None], idx[None, :])


def _frame_blocks(frames: int, p: int, b: int, nb: int, num_blocks: int, official_truncation: bool):
    """For every frame and each of the ``nb`` global blocks it may touch: block index and the frame-local
    token range ``[lo, hi)`` of the frame inside that block (``lo >= hi`` when it touches no token)."""
    start = torch.arange(frames, dtype=torch.int64) * p
    slot = torch.arange(nb, dtype=torch.int64)[None, :]
    blk = (start // b)[:, None] + slot
    lo = (blk * b - start[:, None]).clamp(0, p)
    hi = ((blk + 1) * b - start[:, None]).clamp(0, p)
    valid = (lo < hi) & (blk < num_blocks)
    if official_truncation:
        # The official shrink sees only the first ceil(P/b) blocks of a frame.
        valid &= slot < cdiv(p, b)
    return blk, lo, hi, valid


def _columns_reaching(t: int, r0, r1, c0, c1, w):
    """Number of columns ``c`` in ``[c0, c1)`` with at least ``t`` kept rows ``r`` in ``[r0, r1)`` of the
    band ``|c - r| <= w``. The count of rows is ``min(r1-1, c+w) - max(r0, c-w) + 1``, which reaches
    ``t`` exactly on the column interval ``[r0 - w + t - 1, r1 + w - t]`` when ``r1 - r0 >= t`` and
    ``2w + 1 >= t``."""
    lo = torch.maximum(c0, r0 - w + t - 1)
    hi = torch.minimum(c1, r1 + w - t + 1)
    n = (hi - lo).clamp_min(0)
    ok = ((r1 - r0) >= t) & ((2 * w + 1) >= t)
    return torch.where(ok, n, torch.zeros_like(n))


@functools.lru_cache(maxsize=32)
def radial_block_mask(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    pattern_block: int = 128,
    attention_sink: bool = False,
    official_truncation: bool = False,
) -> torch.Tensor:
    """Radial block mask among video tokens at the pattern-block granularity.

    Returns bool ``[M, M]`` on CPU, ``M = ceil(frames * tokens_per_frame / pattern_block)``. Cached per
    argument tuple: treat the result as read-only. ``official_truncation`` drops a frame's last block
    when the frame straddles ``ceil(P/b) + 1`` blocks, as the official shrink does.
    """
    window, kept = radial_frame_rule(frames, tokens_per_frame, decay_factor, pattern_block)
    p, b = tokens_per_frame, pattern_block
    m = cdiv(frames * p, b)
    nb = cdiv(p, b) + 1
    blk, lo, hi, valid = _frame_blocks(frames, p, b, nb, m, official_truncation)
    heavy_rows = b * _COL_NUM // _COL_DEN + 1

    fi = torch.arange(frames)
    dist = (fi[:, None] - fi[None, :]).abs()
    pair_kept = kept[dist]
    w = window[dist]
    dense = pair_kept & (w >= p)
    if attention_sink:
        dense[:, 0] = True
    band = pair_kept & ~dense

    # A whole-frame pair: every column of a block has the same count (the frame's rows in the block),
    # so the block is kept exactly when that count is heavy — separable in rows and columns.
    heavy = valid & ((hi - lo) >= heavy_rows)
    cells = dense[:, :, None, None] & heavy[:, None, :, None] & valid[None, :, None, :]

    qi, kj = band.nonzero(as_tuple=True)
    if qi.numel():
        # The cells of a band pair depend only on both frames' offsets on the block grid and the window:
        # evaluate each distinct (offset, offset, window) once.
        off = (torch.arange(frames) * p) % b
        key = (off[qi] * b + off[kj]) * (p + 1) + w[qi, kj].clamp_max(p)
        _, first, inverse = _unique_first(key)
        ri, cj = qi[first], kj[first]
        i32 = torch.int32
        r0, r1 = lo[ri].to(i32)[:, :, None], hi[ri].to(i32)[:, :, None]
        c0, c1 = lo[cj].to(i32)[:, None, :], hi[cj].to(i32)[:, None, :]
        ww = w[ri, cj].to(i32)[:, None, None]
        nonzero = _columns_reaching(1, r0, r1, c0, c1, ww)
        heavy_cols = _columns_reaching(heavy_rows, r0, r1, c0, c1, ww)
        cls_keep = torch.cat([(_BLK_DEN * heavy_cols > _BLK_NUM * nonzero), torch.zeros(1, nb, nb, dtype=torch.bool)])
        cls_id = torch.full((frames, frames), cls_keep.shape[0] - 1, dtype=torch.int64)
        cls_id[qi, kj] = inverse
        cells |= cls_keep[cls_id] & valid[:, None, :, None] & valid[None, :, None, :]

    # OR the frame pairs' cells onto the global block grid: a block row (column) may receive cells from
    # two adjacent frames (or many, when frames are shorter than a block).
    slot = torch.where(valid, blk, torch.full_like(blk, m)).reshape(-1)
    grid = cells.permute(0, 2, 1, 3).reshape(frames * nb, frames * nb).to(torch.int32)
    rows = torch.zeros(m + 1, frames * nb, dtype=torch.int32).index_add_(0, slot, grid)
    out = torch.zeros(m + 1, m + 1, dtype=torch.int32).index_add_(1, slot, rows)
    return out[:m, :m] > 0


def _unique_first(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct values of ``key``, the index of one occurrence of each, and the inverse map."""
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.empty(uniq.numel(), dtype=torch.int64)
    first.scatter_(0, inverse, torch.arange(key.numel()))
    return uniq, first, inverse


def block_mask_to_layout(
    mask: torch.Tensor, pattern_block: int, block_size: int, seq_len: int
) -> BlockSparseLayout:
    """Kernel layout with tiles of ``block_size`` computing exactly the tokens of a ``pattern_block``
    block mask ``[M, M]`` over ``seq_len`` tokens.

    A smaller kernel tile splits each pattern block; a larger one holds several pattern blocks and
    becomes a partial block (with its token mask) where they disagree.
    """
    mp = cdiv(seq_len, pattern_block)
    if mask.shape != (mp, mp):
        raise ValueError(
            f"mask must be [{mp}, {mp}] for seq_len={seq_len} at pattern_block={pattern_block}, got {tuple(mask.shape)}"
        )
    mk = cdiv(seq_len, block_size)
    if block_size <= pattern_block:
        return _split_layout(mask, pattern_block // block_size, block_size, seq_len)
    r = block_size // pattern_block
    padded = mask.new_zeros(mk * r, mk * r)
    padded[:mp, :mp] = mask
    sub = padded.view(mk, r, mk, r).permute(0, 2, 1, 3)
    exists = torch.zeros(mk * r, dtype=torch.bool, device=mask.device)
    exists[:mp] = True
    ex = exists.view(mk, r)
    sub_valid = ex[:, None, :, None] & ex[None, :, None, :]
    any_ = sub.any(-1).any(-1)
    full = (sub | ~sub_valid).all(-1).all(-1) & any_
    layout = BlockSparseLayout.from_block_mask(any_[None, None].contiguous(), block_size, block_size, seq_len, seq_len)
    partial = any_ & ~full
    if not bool(partial.any()):
        return layout
    # Few distinct sub-block patterns exist (one per arrangement of r x r pattern blocks): store each once.
    patterns, inverse = torch.unique(sub[partial].reshape(-1, r * r), dim=0, return_inverse=True)
    pid = torch.full(partial.shape, -1, dtype=torch.int32, device=mask.device)
    pid[partial] = inverse.to(torch.int32)
    tok = patterns.view(-1, r, r).repeat_interleave(pattern_block, 1).repeat_interleave(pattern_block, 2)
    ids = torch.gather(pid[None, None], -1, layout.kv_indices.clamp_min(0).long())
    ids = torch.where(layout.kv_indices >= 0, ids, torch.full_like(ids, -1))
    return replace(layout, kv_mask_ids=ids.contiguous(), block_masks=tok.contiguous())


def _split_layout(mask: torch.Tensor, r: int, block_size: int, seq_len: int) -> BlockSparseLayout:
    """Layout at ``block_size`` from a mask of blocks ``r`` times larger: list the coarse blocks once,
    then split every listed block into ``r x r`` tiles (cheaper than sorting the ``r**2`` larger mask)."""
    coarse = BlockSparseLayout.from_block_mask(mask[None, None].contiguous(), block_size * r, block_size * r)
    mq = mk = cdiv(seq_len, block_size)
    idx, cnt = coarse.kv_indices[0, 0].long(), coarse.kv_counts[0, 0].long()  # [Mp, K], [Mp]
    mp, kmax = idx.shape
    sub = torch.arange(r)
    # Row p of the coarse layout becomes rows p*r .. p*r+r-1, each listing r*c + t for its blocks c.
    fine = (idx[:, :, None] * r + sub).reshape(mp, kmax * r)
    used = (torch.arange(kmax)[None, :] < cnt[:, None]).repeat_interleave(r, 1)
    # Tiles past the sequence end (the last coarse block may be partly outside) are dropped; they are
    # the largest indices of a row, so the listed entries stay a sorted prefix.
    used &= fine < mk
    count = used.sum(-1)
    fine = torch.where(used, fine, torch.full_like(fine, -1))
    rows = fine.repeat_interleave(r, 0)[:mq]
    counts = count.repeat_interleave(r, 0)[:mq]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    return BlockSparseLayout(
        rows[:, :width].to(torch.int32)[None, None].contiguous(),
        counts.to(torch.int32)[None, None].contiguous(),
        block_size,
        block_size,
        mk,
        seq_len,
        seq_len,
    )


@functools.lru_cache(maxsize=32)
def _radial_layout_cached(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    pattern_block: int,
    attention_sink: bool,
    official_truncation: bool,
    block_size: int,
    device: str,
) -> BlockSparseLayout:
    mask = radial_block_mask(frames, tokens_per_frame, decay_factor, pattern_block, attention_sink, official_truncation)
    layout = block_mask_to_layout(mask, pattern_block, block_size, frames * tokens_per_frame)
    return layout.to(device) if device != "cpu" else layout


def radial_layout(
    frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    pattern_block: int = 128,
    attention_sink: bool = False,
    block_size: int = 64,
    device: torch.device | str = "cpu",
    official_truncation: bool = False,
) -> BlockSparseLayout:
    """Kernel layout ``[1, 1, Mq, Kmax]`` of the radial mask among ``frames * tokens_per_frame`` video
    tokens, with tiles of ``block_size``. Cached per argument tuple (and device)."""
    return _radial_layout_cached(
        int(frames),
        int(tokens_per_frame),
        float(decay_factor),
        int(pattern_block),
        bool(attention_sink),
        bool(official_truncation),
        int(block_size),
        str(torch.device(device)),
    )


def layout_cache_hits() -> int:
    """How many :func:`radial_layout` calls were served from the cache so far (for stats)."""
    return _radial_layout_cached.cache_info().hits


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=21, help="latent frames (Wan 81 video frames -> 21)")
    ap.add_argument("--tokens-per-frame", type=int, default=1560, help="latent tokens per frame (Wan 480p: 1560)")
    ap.add_argument("--decay-factor", type=float, default=0.2)
    ap.add_argument("--pattern-block", type=int, default=128)
    ap.add_argument("--sink", action=argparse.BooleanOptionalAction, default=True, help="frame-0 attention sink (Wan)")
    ap.add_argument("--official-truncation", action="store_true", help="reproduce the official shrink exactly")
    ap.add_argument("--token-panel", action="store_true", help="also draw the token mask (small shapes only)")
    ap.add_argument("--out", required=True, help="image file to write, e.g. mask.png")
    a = ap.parse_args(argv)
    from .plot import save_masks

    mask = radial_block_mask(
        a.frames, a.tokens_per_frame, a.decay_factor, a.pattern_block, a.sink, a.official_truncation
    )
    panels = [(f"radial block mask (block {a.pattern_block})", mask)]
    if a.token_panel:
        panels.append(
            ("token rule", radial_token_mask(a.frames, a.tokens_per_frame, a.decay_factor, a.pattern_block, a.sink))
        )
    frame_lines = [f * a.tokens_per_frame / a.pattern_block for f in range(1, a.frames)]
    save_masks(panels, a.out, lines=frame_lines)
    print(f"{a.out}: {mask.shape[0]}x{mask.shape[1]} blocks, density {float(mask.float().mean()):.4f}")


if __name__ == "__main__":
    main()
