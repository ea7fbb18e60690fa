"""FateZero's pure rules (:mod:`diffattn.processors.fatezero` is the method): step schedules, frame
references of spatial-temporal attention, the token maps between source and target prompts, and the
blend mask from stored cross-attention. Plain PyTorch and a tokenizer; nothing here knows diffusers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from ..kernels.api import log_once
from .tokens import prompt_words, word_token_spans

__all__ = [
    "FrameRef",
    "StoredLayer",
    "blend_layer_names",
    "blend_mask_from_maps",
    "cross_alpha",
    "cross_step_range",
    "frame_reference_indices",
    "refine_mapper",
    "spatial_temporal_kv",
    "step_range",
    "word_swap_mapper",
]

FrameRef = Union[int, str]
_NAMED_REFS = ("self", "first", "previous", "next", "middle", "last")


@dataclass
class StoredLayer:
    """Shape record of one stored layer: maps are ``[F, heads, queries, keys]``."""

    name: str
    is_cross: bool
    heads: int
    queries: int
    keys: int
    grid: tuple[int, int]


def _bounds(value: Union[float, tuple[float, float]]) -> tuple[float, float]:
    return (0.0, float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))


def step_range(value: Union[float, tuple[float, float]], num_steps: int) -> tuple[int, int]:
    """Edit steps ``[start, end)`` covered by a fraction (or a ``(start, end)`` pair of fractions)."""
    lo, hi = _bounds(value)
    return int(lo * num_steps), int(hi * num_steps)


def cross_step_range(value: Union[float, tuple[float, float]], num_steps: int) -> tuple[int, int]:
    """The cross-attention edit's steps ``[int(lo*(N+1)), int(hi*(N+1)))``: the official schedule has a
    row per step plus one (``num_steps + 1``), and the fractions are taken of that length."""
    return step_range(value, num_steps + 1)


def cross_alpha(
    num_steps: int, text_len: int, default: Union[float, tuple[float, float]],
    words: Sequence[tuple[Sequence[int], Union[float, tuple[float, float]]]] = (),
) -> torch.Tensor:
    """``[num_steps + 1, T]``: 1 where the cross-attention edit runs for (step, token).

    Every token follows ``default``; the token indices of each ``(tokens, range)`` in ``words`` follow
    their own range (later entries win)."""
    alpha = torch.zeros(num_steps + 1, text_len)
    lo, hi = cross_step_range(default, num_steps)
    alpha[lo:hi] = 1.0
    for tokens, value in words:
        idx = torch.as_tensor(list(tokens), dtype=torch.long)
        if idx.numel() == 0:
            continue
        lo, hi = cross_step_range(value, num_steps)
        alpha[:, idx] = 0.0
        alpha[lo:hi, idx] = 1.0
    return alpha


# --------------------------------------------------------------------------------- spatial-temporal
def frame_reference_indices(num_frames: int, refs: Sequence[FrameRef]) -> list[torch.Tensor]:
    """For each reference, the source frame of every frame: a list of int64 ``[F]`` index tensors."""
    out = []
    f = torch.arange(num_frames)
    for ref in refs:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise TypeError(f"frame reference {ref!r} must be an int offset or one of {list(_NAMED_REFS)}")
        if isinstance(ref, int):
            idx = (f + ref).clamp(0, num_frames - 1)
        elif ref == "self":
            idx = f
        elif ref == "first":
            idx = torch.zeros_like(f)
        elif ref == "last":
            idx = torch.full_like(f, num_frames - 1)
        elif ref == "middle":
            idx = torch.full_like(f, (num_frames - 1) // 2)
        elif ref == "previous":
            idx = (f - 1).clamp(min=0)
        elif ref == "next":
            idx = (f + 1).clamp(max=num_frames - 1)
        else:
            raise ValueError(f"frame reference {ref!r}; use one of {list(_NAMED_REFS)} or an int offset")
        out.append(idx)
    return out


def spatial_temporal_kv(
    key: torch.Tensor, value: torch.Tensor, num_frames: int, refs: Sequence[FrameRef]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of each frame taken from its reference frames.

    Args:
        key, value: ``[(B F), ..., N, D]`` with the frames of each clip adjacent in the batch.
        num_frames: ``F``; the batch must be a multiple of it.
        refs: frame references (see :func:`frame_reference_indices`).

    Returns:
        ``key, value`` of shape ``[(B F), ..., N * len(refs), D]``: reference blocks in ``refs`` order.
    """
    bf = key.shape[0]
    if bf % num_frames:
        raise ValueError(f"batch {bf} is not a multiple of num_frames={num_frames}")
    index = frame_reference_indices(num_frames, refs)

    def gather(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(bf // num_frames, num_frames, *x.shape[1:])
        x = torch.cat([x[:, i.to(x.device)] for i in index], dim=-2)
        return x.reshape(bf, *x.shape[2:])

    return gather(key), gather(value)


# ------------------------------------------------------------------------------------ token alignment
def word_swap_mapper(
    source: Optional[str], target: Optional[str], tokenizer, max_len: int = 77, realign: bool = False
) -> torch.Tensor:
    """Word-swap token mapping ``M`` ``[T, T]``: ``edited[..., j] = sum_i stored[..., i] * M[i, j]``.

    Words are paired by position (the prompts must have the same number of words); the swapped words
    are the pairs that differ. The official rule (``realign=False``): tokens before and between swapped
    words map one to one in order; a swapped word maps token to token when both words have as many
    tokens, otherwise every target token of it gets the sum of the source word's tokens divided by the
    target word's token count; after the last swapped word, target token ``j`` reads source token
    ``j``. ``realign=True``: a swapped word of another token count gives each target token the mean of
    the source word's tokens, and every later word, EOS and padding keeps reading its own source token.
    Without a tokenizer (prompt embeddings), the mapping is the identity.
    """
    if tokenizer is None or source is None or target is None:
        return torch.eye(max_len)
    ws, wt = prompt_words(source), prompt_words(target)
    if len(ws) != len(wt):
        raise ValueError(
            f"cross_mode='replace' needs prompts with the same number of words: source {source!r} has "
            f"{len(ws)}, target {target!r} has {len(wt)}; use cross_mode='refine' (or 'auto')"
        )
    ss, st = word_token_spans(source, tokenizer), word_token_spans(target, tokenizer)
    m = torch.zeros(max_len, max_len)

    def put(i: int, j: int, value: float) -> None:
        if i < max_len and j < max_len:
            m[i, j] = value

    def put_word(a: list[int], b: list[int], spread: float) -> None:
        # Source word tokens ``a`` to target word tokens ``b``: one to one when the counts match, else
        # every target token reads all of ``a`` with weight ``spread``.
        for t_pos, t in enumerate(b):
            if len(a) == len(b):
                put(a[t_pos], t, 1.0)
            else:
                for src in a:
                    put(src, t, spread)

    if realign:
        put(0, 0, 1.0)
        for a, b in zip(ss, st):
            put_word(a, b, 1.0 / len(a))
        end_s, end_t = ss[-1][-1] + 1, st[-1][-1] + 1
        # EOS and padding: the k-th token after the target prompt takes the k-th token after the source
        # prompt (the last source position once those run out), so every target column sums to 1.
        for k in range(max_len - end_t):
            put(min(end_s + k, max_len - 1), end_t + k, 1.0)
        return m
    swapped = [k for k in range(len(wt)) if ws[k] != wt[k]]
    i = j = done = 0
    while i < max_len and j < max_len:
        if done < len(swapped) and ss[swapped[done]][0] == i:
            a, b = ss[swapped[done]], st[swapped[done]]
            put_word(a, b, 1.0 / len(b))
            done += 1
            i, j = i + len(a), j + len(b)
        elif done < len(swapped):
            put(i, j, 1.0)
            i, j = i + 1, j + 1
        else:
            put(j, j, 1.0)
            i, j = i + 1, j + 1
    return m


def _global_align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman–Wunsch (match +1, mismatch -1, gap 0): for each ``y`` position, its ``x`` position or -1."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 = left (gap in x), 2 = up (gap in y), 3 = diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(source_ids: Sequence[int], target_ids: Sequence[int], max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement alignment of two token-id sequences (with BOS/EOS, unpadded).

    Returns ``(index, keep)``, int64 and float ``[T]``: target token ``j`` takes the stored map of
    source token ``index[j]`` where ``keep[j] = 1``, and keeps its own map where ``keep[j] = 0`` (a
    token without a match). Positions past the target prompt map to themselves.
    """
    align = _global_align(list(source_ids), list(target_ids))
    index = torch.arange(max_len)
    keep = torch.ones(max_len)
    for j, i in enumerate(align[:max_len]):
        index[j] = max(i, 0)
        keep[j] = float(i >= 0)
    return index, keep


# ---------------------------------------------------------------------------------------- blend mask
def blend_mask_from_maps(
    cross_maps: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    token_weights: torch.Tensor,
    out_hw: tuple[int, int],
    threshold: float,
) -> torch.Tensor:
    """FateZero's self-attention blend mask from the source prompt's cross-attention maps.

    Args:
        cross_maps: per layer ``[F, H, h*w, T]`` probabilities (all layers on the same grid).
        grids: ``(h, w)`` of each layer.
        token_weights: ``[T]``, 1 at the blend words' tokens.
        out_hw: grid ``(h', w')`` of the self-attention layer the mask is for.
        threshold: keep where the normalised map is ``> threshold``.

    Returns:
        float ``[F, 1, h'*w', 1]`` of 0/1 (1 = take the edited self-attention), to broadcast over
        ``[F, H, Nq, Nk]``. The word maps are summed over the blend tokens, averaged over heads and
        layers, max-pooled 3×3 (stride 1), resized (nearest) and divided by their per-frame max.
    """
    per_layer = []
    for m, (h, w) in zip(cross_maps, grids):
        word = (m.float() * token_weights.to(m.device, torch.float32)).sum(-1)  # [F, H, h*w]
        per_layer.append(word.reshape(word.shape[0], word.shape[1], h, w))
    maps = torch.cat(per_layer, dim=1).mean(1, keepdim=True)  # [F, 1, h, w]
    maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
    maps = F.interpolate(maps, size=out_hw)
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    mask = (maps / peak).gt(threshold).float()
    return mask.reshape(mask.shape[0], 1, -1, 1)


def blend_layer_names(layers: Sequence["StoredLayer"], rule: str, blend_tokens: int) -> list[str]:
    """The stored cross-attention layers a blend map averages (``layers`` in forward order).

    ``"reference"``: the official positions among the stored cross layers, down-block ones ``[2:4]``
    plus up-block ones ``[:3]``; where those are none or lie on different grids, the ``"resolution"``
    rule (logged once): the stored cross layers whose token count is nearest ``blend_tokens``.
    """
    cross = [l for l in layers if l.is_cross]
    if not cross:
        raise ValueError("blend_words need stored cross-attention maps; none were stored")
    if rule == "reference":
        down = [l for l in cross if l.name.startswith("down_blocks")]
        up = [l for l in cross if l.name.startswith("up_blocks")]
        chosen = down[2:4] + up[:3]
        if chosen and len({l.grid for l in chosen}) == 1:
            return [l.name for l in chosen]
        log_once(
            f"fatezero-blend-layers-{[l.name for l in chosen]}",
            f"diffattn: FateZero's blend layers (stored down-block cross layers [2:4] + up-block [:3]) are "
            f"{'none' if not chosen else 'on grids ' + str(sorted({l.grid for l in chosen}))} on this UNet; "
            "the blend map uses the stored cross layers nearest blend_resolution**2 tokens instead",
            logging.WARNING,
        )
    best = min(abs(l.queries - blend_tokens) for l in cross)
    return [l.name for l in cross if abs(l.queries - blend_tokens) == best]
