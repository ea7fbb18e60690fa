"""What every Triton kernel here shares: the interpreter switch and the autotune config lists."""

from __future__ import annotations

import os

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(warps_stages: tuple[tuple[int, int], ...]) -> list:
    """``triton.Config`` per (num_warps, num_stages); a single config under the interpreter, which
    cannot benchmark several (and one is enough for correctness)."""
    import triton

    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in warps_stages]
