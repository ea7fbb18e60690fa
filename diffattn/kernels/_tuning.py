"""What every Triton kernel here shares: the interpreter switch, the autotune config lists and the
per-shape pruning that keeps the autotuner to configs that neither spill registers nor overflow
shared memory (checked for sm_90a and sm_80 by ``python -m diffattn.kernels.aot``, a CI test)."""

from __future__ import annotations

import os

# The largest tile (rows or keys) the Triton kernels take; their tiles are the layout's blocks.
MAX_TILE = 128

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Opt-in shared memory per block: H100/H200 (sm_90) and A100 (sm_80).
SHARED_MEMORY = {90: 232448, 80: 166912}

_target_shared_memory: int | None = None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_target_shared_memory(nbytes: int | None) -> None:
    """Prune for a device that is not this process's current one (ahead-of-time compilation)."""
    global _target_shared_memory
    _target_shared_memory = nbytes


def shared_memory_limit(device) -> int:
    """Shared memory one program may use on ``device`` (the AOT target when one is set)."""
    if _target_shared_memory is not None:
        return _target_shared_memory
    import torch

    if getattr(device, "type", None) == "cuda":
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
        return SHARED_MEMORY.get(props.major * 10, SHARED_MEMORY[80])
    return SHARED_MEMORY[90]


def autotune_configs(warps_stages: tuple[tuple[int, int], ...]) -> list:
    """``triton.Config`` per (num_warps, num_stages); a single config under the interpreter, which
    cannot benchmark several (and one is enough for correctness)."""
    import triton

    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in warps_stages]


def shared_memory_estimate(cfg, block_m: int, block_n: int, q_bytes: int, kv_bytes_per_row: int, extra: int = 0) -> int:
    """Upper estimate of a config's shared memory: the Q tile (``q_bytes`` a row), one K/V tile set per
    pipeline stage, ``extra`` bytes per stage (a partial-block mask tile) and the layout-conversion
    scratch of one fp32 score tile."""
    stages = max(1, cfg.num_stages)
    return block_m * q_bytes + stages * (block_n * kv_bytes_per_row + extra) + block_m * block_n * 4


def prune(configs, *, block_m: int, block_d: int, elem: int, shared: dict, limit: int) -> list:
    """The configs worth timing for one shape.

    - 128-row tiles, head-dim tiles above 128 and fp32 tiles of 64 rows keep 8 warps: with 4, the
      accumulator and score tile need more than 255 registers per thread and spill (measured with
      ptxas for sm_90a: 0.2-5 KB per thread at 128 rows and head dim 64-128, 32-40 B at head dim
      160/256, over 1 KB for 64 fp32 rows); 32 fp32 rows keep 4 warps (8 spill there).
    - configs whose shared memory (``shared[cfg]``, estimated) exceeds the device's are dropped.
    At least one config survives: the one using the least shared memory.
    """
    if block_m >= 128 or block_d > 128 or (elem >= 4 and block_m >= 64):
        kept = [c for c in configs if c.num_warps >= 8]
    elif elem >= 4:
        kept = [c for c in configs if c.num_warps <= 4]
    else:
        kept = list(configs)
    kept = [c for c in kept if shared[c] <= limit]
    if kept:
        return kept
    return [min(configs, key=lambda c: (shared[c], -c.num_warps))]
