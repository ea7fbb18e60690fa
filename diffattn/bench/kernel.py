"""Block-sparse attention kernel speed: our Triton kernel vs SDPA (flash), FlexAttention and xformers.

For every shape and density a random layout is drawn (each query block keeps exactly
``round(density * Mk)`` random key blocks, per head), and every backend is timed on it. One JSON row
per (shape, dtype, density, backend): device, torch/triton versions, commit, shape, density, ms and
effective TFLOP/s = ``4 * B * H * Nq * Nk * D * density / time`` (dense baselines use density 1).

Shapes are the video models' self-attention: Wan2.1-1.3B at 480p (B=1, H=12, N=32760, D=128) and
HunyuanVideo at 720p (B=1, H=24, N=118800, D=128). ``--quick`` runs toy shapes that also work on CPU
(PyTorch backend, eager FlexAttention), to smoke-test the script itself.

    diffattn bench kernel                       # GPU: full sweep, bf16
    diffattn bench kernel --quick               # CPU or GPU: toy shapes
    diffattn bench kernel --shapes wan --densities 1.0 0.2 --backends triton flex sdpa

Rows are appended to ``benchmarks/results/<date>-<device>-kernel.jsonl`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffattn.bench.common import default_output as _default_output
from diffattn.bench.common import environment
from diffattn.kernels import BlockSparseLayout, block_sparse_attention, cdiv

# name: (B, H, N, D)
SHAPES = {
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "hunyuanvideo-720p": (1, 24, 118800, 128),
}
QUICK_SHAPES = {
    "toy-1k": (1, 2, 1000, 64),
    "toy-2k": (1, 2, 2048, 128),
}
ALIASES = {"wan": "wan2.1-1.3b-480p", "hunyuan": "hunyuanvideo-720p"}
DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPARSE_BACKENDS = ("triton", "flex", "torch", "triton-int8", "triton-int8-p4")
# PARO's quantized attention: INT8 Q.K^T with P rounded to 8 (or 4) bits, on the same layouts.
QUANT_BACKENDS = {"triton-int8": 8, "triton-int8-p4": 4}
DENSE_BACKENDS = ("sdpa", "xformers")


# ---------------------------------------------------------------- inputs
def random_layout(
    heads: int, nq: int, nk: int, block_q: int, block_k: int, density: float, device: torch.device, seed: int
) -> BlockSparseLayout:
    """Every query block keeps exactly ``round(density * Mk)`` (at least 1) random key blocks."""
    mq, mk = cdiv(nq, block_q), cdiv(nk, block_k)
    keep = max(1, round(density * mk))
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.rand(1, heads, mq, mk, generator=g).argsort(-1)[..., :keep]
    mask = torch.zeros(1, heads, mq, mk, dtype=torch.bool).scatter_(-1, order, True)
    return BlockSparseLayout.from_block_mask(mask.to(device), block_q, block_k, nq, nk)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- backends
def _dense_call(backend: str, q, k, v) -> Callable[[], Any] | None:
    if backend == "sdpa":
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def run():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)

            return run
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        try:
            import xformers.ops as xops
        except ImportError:
            return None
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants [B, N, H, D]
        return lambda: xops.memory_efficient_attention(qt, kt, vt)
    raise ValueError(backend)


def _sparse_call(backend: str, q, k, v, layout: BlockSparseLayout) -> Callable[[], Any]:
    if backend == "flex":
        from diffattn.kernels.flex import flex_block_sparse_attention, layout_to_flex_block_mask

        # The BlockMask is built once per layout, like a planner's cached plan.
        bm = layout_to_flex_block_mask(layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return lambda: flex_block_sparse_attention(q, k, v, layout, block_mask=bm)
    if backend in QUANT_BACKENDS:
        from diffattn.kernels.triton_quant import triton_quantized_block_sparse_attention

        bits = QUANT_BACKENDS[backend]
        return lambda: triton_quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=bits)
    return lambda: block_sparse_attention(q, k, v, layout, backend=backend)


# ---------------------------------------------------------------- sweep
def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = [ALIASES.get(s, s) for s in args.shapes] if args.shapes else list(shapes)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    backends = args.backends or (
        ["triton", "triton-int8", "flex", "sdpa", "xformers"] if device.type == "cuda" else ["torch", "flex", "sdpa"]
    )
    out = Path(args.out) if args.out else _default_output("kernel", env)
    rows = []
    for name in names:
        b, h, n, d = {**SHAPES, **QUICK_SHAPES}[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        base = {
            **env, "shape": name, "B": b, "H": h, "Nq": n, "Nk": n, "D": d, "dtype": dtype_name,
            "block_q": args.block_q, "block_k": args.block_k,
        }
        jobs: list[tuple[str, float, float, Callable[[], Callable[[], Any] | None]]] = []
        for backend in backends:
            if backend in DENSE_BACKENDS:
                jobs.append((backend, 1.0, 1.0, lambda backend=backend: _dense_call(backend, q, k, v)))
        for density in args.densities:
            layout = random_layout(h, n, n, args.block_q, args.block_k, density, device, seed=int(density * 1000))
            for backend in backends:
                if backend in SPARSE_BACKENDS:
                    jobs.append(
                        (backend, density, layout.density,
                         lambda backend=backend, layout=layout: _sparse_call(backend, q, k, v, layout))
                    )
        for backend, target, actual, make in jobs:
            row = {**base, "backend": backend, "density_target": target, "density": actual}
            try:
                fn = make()
                if fn is None:
                    continue
                ms = time_ms(fn, device, args.warmup, args.iters)
                row.update(ms=ms, tflops=4.0 * b * h * n * n * d * actual / (ms * 1e-3) / 1e12)
            except Exception as e:  # a backend that cannot run this shape is a result, not a crash
                row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {e}"[:300])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            _print_row(row)
    print(f"wrote {len(rows)} rows to {out}")
    summarize(rows)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    ms = f"{row['ms']:9.3f} ms" if row.get("ms") is not None else f"failed: {row.get('error')}"
    tf = f"{row['tflops']:8.3g} TFLOP/s" if row.get("tflops") is not None else ""
    print(f"{row['shape']:>20} {row['backend']:>8} d={row['density']:.3f} {ms} {tf}", flush=True)


def summarize(rows: list[dict[str, Any]]) -> None:
    """Ratios behind the speed targets: dense throughput vs SDPA, sparse scaling, speed-up vs Flex."""
    ok = [r for r in rows if r.get("ms") is not None]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        by = {(r["backend"], r["density_target"]): r for r in ok if r["shape"] == shape}
        sdpa = by.get(("sdpa", 1.0))
        lines = []
        for backend in [b for b in SPARSE_BACKENDS if (b, 1.0) in by]:
            dense = by[(backend, 1.0)]
            if sdpa:
                lines.append(f"  {backend} dense / sdpa throughput: {sdpa['ms'] / dense['ms']:.2f} (target >= 0.90)")
            for (name, target), r in sorted(by.items(), key=lambda kv: -kv[0][1]):
                if name != backend or target == 1.0:
                    continue
                line = f"  {backend} d={target:.1f}: time / (d * dense) = {r['ms'] / (r['density'] * dense['ms']):.2f}"
                line += " (target <= 1.15)"
                flex = by.get(("flex", target))
                if backend == "triton" and flex:
                    line += f", flex / triton = {flex['ms'] / r['ms']:.2f} (target >= 1.2)"
                quant = by.get(("triton-int8", target))
                if backend == "triton" and quant:
                    line += f", triton / triton-int8 = {r['ms'] / quant['ms']:.2f} (target >= 1.3)"
                lines.append(line)
        if lines:
            print(f"\n{shape}\n" + "\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy shapes that also run on CPU")
    p.add_argument("--shapes", nargs="+", help=f"subset of {list(SHAPES)} (or wan / hunyuan) or {list(QUICK_SHAPES)}")
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--backends", nargs="+", choices=SPARSE_BACKENDS + DENSE_BACKENDS)
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--out", help="JSON-lines file to append to (default benchmarks/results/<date>-<device>-kernel.jsonl)")
    args = p.parse_args(argv)
    for s in args.shapes or []:
        if ALIASES.get(s, s) not in {**SHAPES, **QUICK_SHAPES}:
            p.error(f"unknown shape {s!r}; choose from {list(SHAPES) + list(QUICK_SHAPES)} or wan/hunyuan")
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        p.error(f"densities must lie in (0, 1], got {args.densities}")
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
