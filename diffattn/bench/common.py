"""Shared pieces of the benchmarks: environment facts, timing, JSON-lines output."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from diffattn.pipelines.compare import versions

__all__ = ["build_model", "environment", "write_rows", "timed", "default_output", "device_slug", "parse_bench_args"]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device name, library versions and commit, stamped on every benchmark row: the versions that
    :func:`diffattn.pipelines.compare.versions` lists (as ``versions``), with torch, triton and diffusers
    also at the top level where the report and the result files have always read them."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    found = versions()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": found.get("triton"),
        "diffusers": found.get("diffusers"),
        "versions": found,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpus": os.cpu_count(),
    }


def device_slug(env: dict[str, Any]) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-") or "cpu"


def default_output(kind: str, env: dict[str, Any]) -> Path:
    """``benchmarks/results/<date>-<device>-<kind>.jsonl``; CPU runs are named ``cpu-…`` so they can
    never pass for GPU results."""
    slug = device_slug(env)
    if env.get("device_type") != "cuda" and not slug.startswith("cpu"):
        slug = f"cpu-{slug}"
    return Path("benchmarks") / "results" / f"{env['date'][:10]}-{slug}-{kind}.jsonl"


def write_rows(rows: list[dict[str, Any]], path: Path | str) -> Path:
    """Append rows to a JSON-lines file (one flush per row, so an interrupted run keeps what it did)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
    return path


def parse_bench_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, positive: tuple[str, ...] = ()
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with what the sweep benchmarks share: ``--densities`` in (0, 1], each
    option named in ``positive`` at least 1, and ``command``, the command as typed without where it
    wrote to (``--out``), so the rows say how to reproduce them."""
    args = parser.parse_args(argv)
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    given = list(sys.argv[1:] if argv is None else argv)
    kept = [a for i, a in enumerate(given) if a != "--out" and (i == 0 or given[i - 1] != "--out")]
    args.command = " ".join([parser.prog, *kept])
    return args


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA-synchronised on GPUs)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(build: Callable[[], torch.nn.Module], device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``build()`` with its parameters created on ``device`` in ``dtype`` (a 14B model never exists in
    fp32 on the host); integer and explicitly typed buffers keep their dtype. In eval mode."""
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
        model = build()
    return model.to(device=device, dtype=dtype).eval()
