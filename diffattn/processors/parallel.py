"""diffattn under diffusers context parallelism (``model.enable_parallelism(ContextParallelConfig(...))``).

Context parallelism shards the sequence: each rank holds ``N / W`` tokens of every head. diffattn's
planners need the whole sequence (the latent grid, the video tokens' positions, a search over all
query and key blocks), so a patched layer re-shards by heads over the whole context-parallel group
(one all-to-all for ``q, k, v`` and one back for the output, the Ulysses exchange): every rank then
runs the method on the full sequence for ``ceil(H / W)`` heads (padded, see below), exactly what the
single-process method computes for those heads. This serves Ulysses, Ring and ring x Ulysses alike; for Ring it replaces
the key/value rotation, which would hand the planner one key shard at a time.

In a joint text + video sequence (Flux) every rank holds its share of the text and of the video, so
the gathered sequence interleaves them rank by rank; :func:`joint_order` restores the one-process
order (text, then video, or the reverse) around the method.

Methods only see their head slice (``AttnContext.heads``). Head-independent plans (dense, radial,
GNA, pooled agents) need nothing more; per-head state is computed by the rank that owns the head
(AdaSpa's layouts, PARO's orders), sliced from a loaded file (PARO), or agreed over the group where
the rule couples heads (AdaSpa's head-adaptive sparsity gathers every head's recall through
``AttnContext.gather_heads``). Combinations that cannot be served exactly raise when the method
meets the parallel config (``apply`` or ``enable_parallelism``, whichever comes second).

A head count the degree does not divide is padded with zero heads (zero queries, keys and values give
zero outputs, dropped after the exchange back), which is exact for every method whose heads are its
own; a method whose rule spans heads says so in ``padded_heads_refusal`` and raises on every rank
before any exchange — at the first forward, when the head count is known. Statistics leave the zero
heads out (``AttnContext.padded_heads``), and a rank that holds only zero heads computes nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..methods import get_method_class

__all__ = [
    "context_config", "check_parallel", "mode_name", "attend_sharded", "joint_order", "head_gatherer",
    "whole_sequence_mask",
]


def context_config(parallel_config: Any) -> Any:
    """The ``ContextParallelConfig`` of a diffusers ``ParallelConfig`` (None without one)."""
    return getattr(parallel_config, "context_parallel_config", None)


def mode_name(cp: Any) -> str:
    ring, ulysses = int(cp.ring_degree or 1), int(cp.ulysses_degree or 1)
    if ring > 1 and ulysses > 1:
        return f"ring{ring}xulysses{ulysses}"
    return f"ring{ring}" if ring > 1 else f"ulysses{ulysses}"


def check_parallel(config: Any, cp: Any) -> None:
    """Raise ``NotImplementedError`` naming the combination if ``config``'s method cannot run exactly
    under the context-parallel config ``cp``."""
    if cp is None:
        return
    method = getattr(config, "method", "")
    what = f"diffattn method {method!r} under context parallelism ({mode_name(cp)})"
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise NotImplementedError(
            f"{what} with ulysses_anything/ring_anything: diffattn splits heads and sequence evenly over "
            "the ranks. Use ContextParallelConfig(ulysses_degree=... or ring_degree=...) without the "
            "*_anything flags, with a token count divisible by the degree."
        )
    why = get_method_class(method).sharding_refusal(config) if method else None
    if why is not None:
        raise NotImplementedError(f"{what}: {why}")


def attend_sharded(
    handler: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    cp: Any,
) -> torch.Tensor | None:
    """The method's output ``[B, N/W, H, D]`` for this rank's shard ``query, key, value``
    ``[B, N/W, H, D]`` (diffusers' layout), or None for a call diffattn does not take."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    group = cp._flattened_mesh.get_group()
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    b, s, h, d = query.shape
    if key.shape[1] != s or key.shape[2] != h or not handler.takes(s * world, dropout_p, is_causal):
        return None
    pad = -h % world
    if pad:
        # Zero heads (zero queries, keys and values attend to nothing but zeros) make the split even;
        # their outputs are dropped after the exchange back.
        method = handler.proc.method
        why = type(method).padded_heads_refusal(method.config)
        if why is not None:
            raise ValueError(
                f"diffattn under context parallelism pads the {h} attention heads to {h + pad} to split them "
                f"over {world} ranks, and {method.name!r} cannot run on padded heads: {why}"
            )
        query, key, value = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    q, k, v = (_all_to_all_dim_exchange(x.contiguous(), 2, 1, group) for x in (query, key, value))

    if attn_mask is not None:  # every layer gets the model's same mask: gathered once per forward
        attn_mask = handler.state.per_forward(
            attn_mask, ("sharded", s), lambda m: whole_sequence_mask(m, s, world, lambda t, dim: _gather(t, dim, group))
        )
    local = (h + pad) // world
    # (start, stop, total) over the padded head axis, and how many of its heads are the model's
    heads = (rank * local, (rank + 1) * local, h + pad, h)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if heads[0] >= h:  # only zero heads on this rank (more ranks than heads): nothing to compute
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
    else:
        out = handler.attend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, heads=heads)
    out = _all_to_all_dim_exchange(out.transpose(1, 2).contiguous(), 1, 2, group)
    return out[:, :, :h] if pad else out


def whole_sequence_mask(
    mask: torch.Tensor, s: int, world: int, gather: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """A rank's attention mask made the whole sequence's (``world * s`` tokens in rank order), the one
    the re-sharded attention runs with. The dimension that holds only this rank's ``s`` tokens is
    gathered over the ranks (``gather(t, dim)``: every rank's tensor, concatenated): the keys of a key
    mask ``[B, s]`` / ``[..., 1|N, s]``, the queries of ``[..., s, N]``. A mask over this rank's queries
    *and* keys ``[..., s, s]`` holds only the diagonal blocks of the whole mask and raises. A
    ``[B, N]`` key mask comes back as ``[B, 1, 1, N]``, as diffusers' native backend reads it."""
    n = s * world
    rows = mask.shape[-2] if mask.ndim >= 3 else 1
    cols = mask.shape[-1] if mask.ndim >= 2 else -1
    if mask.ndim == 4 and mask.shape[1] != 1:
        raise NotImplementedError(
            f"diffattn under context parallelism got a per-head attention mask {tuple(mask.shape)}; the heads "
            "are re-sharded over the ranks, so pass a mask shared by the heads ([B, 1, 1|Nq, Nk]) or a key "
            "mask ([B, Nk])"
        )
    if world > 1 and rows == s and cols == s:
        raise NotImplementedError(
            f"diffattn under context parallelism got an attention mask {tuple(mask.shape)} over this rank's "
            f"{s} queries and {s} keys only: the other ranks' keys are missing for these queries. Pass the "
            f"mask over all {n} keys ([..., {s}, {n}]) or a key mask ([B, {s}])"
        )
    if mask.ndim < 2 or cols not in (s, n) or rows not in (1, s, n):
        raise ValueError(
            f"diffattn under context parallelism takes attention masks [B, Nk] or [..., 1|Nq, Nk] over this "
            f"rank's {s} tokens or all {n}, got {tuple(mask.shape)}"
        )
    if world > 1 and cols == s:  # this rank's keys for every query: every rank's keys, in rank order
        mask = gather(mask.contiguous(), mask.ndim - 1)
    elif world > 1 and rows == s:  # this rank's queries over every key
        mask = gather(mask.contiguous(), mask.ndim - 2)
    return mask[:, None, None] if mask.ndim == 2 else mask


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_gather_tensor(x, gather_dim=dim, group=group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def head_gatherer(cp: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``gather(t)``: a per-head tensor ``[B, H_rank, ...]`` of this rank's heads → ``[B, H_padded, ...]``
    of all ranks' (the padded head axis: the model's heads, then any zero heads)."""
    group = cp._flattened_mesh.get_group()
    return lambda t: _gather(t.contiguous(), 1, group)


_ORDERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def joint_order(
    n: int, text_len: int, cp: Any, text_first: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)``: ``x[..., order, :]`` puts a gathered joint sequence (rank 0's text and
    video, rank 1's, ...) into the one-process order; ``inverse`` undoes it. Built once per shape."""
    world = cp._flattened_mesh.size()
    key = (n, text_len, world, text_first, str(device))
    hit = _ORDERS.get(key)
    if hit is not None:
        return hit
    if text_len % world or (n - text_len) % world:
        raise ValueError(
            f"diffattn under context parallelism needs the {text_len} text and {n - text_len} video tokens "
            f"each split evenly over {world} ranks; choose a prompt length and resolution divisible by {world}"
        )
    lead = text_len // world if text_first else (n - text_len) // world
    idx = torch.arange(n, device=device).view(world, n // world)
    order = torch.cat([idx[:, :lead].flatten(), idx[:, lead:].flatten()])
    hit = _ORDERS[key] = (order, torch.argsort(order))
    return hit
