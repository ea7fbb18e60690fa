"""Block-sparse attention kernel speed: our Triton kernel vs SDPA (flash), FlexAttention and xformers.

Two kinds of layouts are timed (``--layouts``):

* ``random``: for every density each query block keeps exactly ``round(density * Mk)`` random key
  blocks, per head — the kernel's throughput as a function of density.
* every registered method with a ``"kernel"`` benchmark (``radial``, ``gna``, ``adaspa``, ``paro``,
  ``agent``): its real pattern at the shape. The method runs its variant on synthetic DiT-like inputs
  (:mod:`diffattn.patterns.synthetic`, Wan's 3-D RoPE) at the event steps of a 50-step schedule it
  declares (AdaSpa's searches, PARO's calibrations), then every block-sparse call it makes at its steady
  step is recorded and replayed on each kernel backend (the exact permuted inputs and layouts). A
  ``method`` row times the whole call (permutations, plan look-ups, text-free video attention); a method
  with a search of its own (AdaSpa) adds a ``search`` row (one LSE-cached search: block mass + plan), and
  a method's plan facts join its rows (GNA: the block-count speed-up bound of
  :func:`~diffattn.patterns.neighborhood.gna_simulate`). Agent attention is not block-sparse: it has a
  ``method`` row only (its DiT layout, at an agent step).

One JSON row per (shape, dtype, layout, density, backend): device, torch/triton versions, commit, shape,
grid, density, ms and effective TFLOP/s = ``4 * B * H * N**2 * D * density / time`` (dense baselines use
density 1; a method's density is the computed share of the ``N x N`` tile pairs).

Shapes are the video models' self-attention: Wan2.1-1.3B at 480p (B=1, H=12, N=32760, D=128), Wan 14B
layers at 720p (H=40, N=75600) and HunyuanVideo at 720p (H=24, N=118800). ``--quick`` runs toy shapes
that also work on CPU (PyTorch backend, eager FlexAttention), to smoke-test the script itself.

    diffattn bench kernel                       # GPU: full sweep, bf16
    diffattn bench kernel --quick               # CPU or GPU: toy shapes
    diffattn bench kernel --shapes wan --densities 1.0 0.2 --backends triton flex sdpa
    diffattn bench kernel --shapes wan wan720 --layouts radial gna adaspa paro agent --backends triton flex sdpa

Rows are appended to ``benchmarks/results/<date>-<device>-kernel.jsonl`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from diffattn.bench.common import default_output as _default_output
from diffattn.bench.common import environment, parse_bench_args, write_rows
from diffattn.kernels import BlockSparseLayout, block_sparse_attention, cdiv
from diffattn.methods import describe, method_names

# name: (B, H, N, D, latent grid (F, H, W) with F * H * W = N)
SHAPES = {
    "wan2.1-1.3b-480p": (1, 12, 32760, 128, (21, 30, 52)),
    "wan2.1-14b-720p": (1, 40, 75600, 128, (21, 45, 80)),
    "hunyuanvideo-720p": (1, 24, 118800, 128, (33, 45, 80)),
}
QUICK_SHAPES = {
    "toy-1k": (1, 2, 1000, 64, (10, 10, 10)),
    "toy-2k": (1, 2, 2048, 128, (8, 16, 16)),
}
ALIASES = {"wan": "wan2.1-1.3b-480p", "wan720": "wan2.1-14b-720p", "hunyuan": "hunyuanvideo-720p"}
METHOD_LAYOUTS = tuple(method_names(benchmark="kernel"))
LAYOUTS = ("random",) + METHOD_LAYOUTS
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


def _sparse_call(backend: str, q, k, v, layout: BlockSparseLayout, scale: float | None = None) -> Callable[[], Any]:
    if backend == "flex":
        from diffattn.kernels.flex import flex_block_sparse_attention, layout_to_flex_block_mask

        # The BlockMask is built once per layout, like a planner's cached plan.
        bm = layout_to_flex_block_mask(layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return lambda: flex_block_sparse_attention(q, k, v, layout, scale, block_mask=bm)
    if backend in QUANT_BACKENDS:
        from diffattn.kernels.triton_quant import triton_quantized_block_sparse_attention

        bits = QUANT_BACKENDS[backend]
        return lambda: triton_quantized_block_sparse_attention(q, k, v, layout, scale, qk_bits=8, pv_bits=bits)
    return lambda: block_sparse_attention(q, k, v, layout, scale=scale, backend=backend)


# ---------------------------------------------------------------- method layouts
class MethodRun(NamedTuple):
    """A method's kernel-benchmark variant run on synthetic inputs (see :func:`run_method`)."""

    method: Any
    step: int
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    calls: list  # the KernelCalls it made at ``step``
    stats: dict[str, Any]  # what it recorded at ``step``


def run_method(
    name: str, grid: tuple[int, int, int], b: int, h: int, d: int, dtype: torch.dtype, device: torch.device,
    backend: str,
) -> MethodRun:
    """Method ``name`` (its ``"kernel"`` variant, on kernel ``backend``) on synthetic DiT-like inputs: called at
    its event steps of a 50-step schedule, then recorded at its steady step."""
    from diffattn.methods import AttnContext, get_method_class
    from diffattn.methods.sparse import capture_kernel_calls
    from diffattn.patterns.synthetic import synthetic_qkv

    about = describe(name)
    cfg = about.config(about.benchmarks["kernel"][0], backend=backend)
    method = get_method_class(name)(cfg)

    def inputs(step: int):
        return synthetic_qkv(grid, b, h, d, seed=0, time=0.01 * step, dtype=dtype, device=device)

    def ctx(step: int, sink=lambda **kw: None) -> AttnContext:
        return AttnContext(layer="bench", layer_index=15, num_layers=30, grid=grid, step=step, num_steps=50, record=sink)

    with torch.no_grad():
        for step in type(method).event_steps(cfg):
            method.attend(*inputs(step), ctx(step))
        step = about.steady_step
        q, k, v = inputs(step)
        stats: dict[str, Any] = {}
        with capture_kernel_calls() as calls:
            method.attend(q, k, v, ctx(step, lambda **kw: stats.update(kw)))
    return MethodRun(method, step, (q, k, v), list(calls), stats)


def _method_jobs(
    name: str, grid: tuple[int, int, int], b: int, h: int, d: int, dtype: torch.dtype, device: torch.device,
    backends: list[str],
) -> tuple[dict[str, Any], list[tuple[str, float, dict[str, Any], Callable[[], Callable[[], Any] | None]]]]:
    """Run method ``name`` at its defaults on synthetic inputs; return its description and timing jobs.

    Jobs: each sparse kernel backend replaying the method's recorded kernel calls, the whole method call
    (``method``) and, for a method with a search of its own, one search (``search``).
    """
    from diffattn.methods import AttnContext

    kernel_backend = "triton" if device.type == "cuda" else "torch"
    method, step, (q, k, v), calls, stats = run_method(name, grid, b, h, d, dtype, device, kernel_backend)
    cfg = method.config
    n = q.shape[2]
    dense_work = b * h * n * n
    work = sum(
        call.layout.density * call.q.shape[0] * call.q.shape[1] * call.q.shape[2] * call.k.shape[2]
        for call in calls
    )
    density = work / dense_work if calls else float(stats.get("density", float("nan")))
    info: dict[str, Any] = {
        "layout": name,
        "config": {k2: v2 for k2, v2 in cfg.to_dict().items() if k2 != "backend"},
        "step": step,
        "kernel_calls": len(calls),
        "method_density": stats.get("density"),
        **method.plan_facts(grid, device),
    }

    jobs: list[tuple[str, float, dict[str, Any], Callable[[], Callable[[], Any] | None]]] = []

    def replay(backend: str) -> Callable[[], Any]:
        runs = [_sparse_call(backend, c.q, c.k, c.v, c.layout, c.scale) for c in calls]
        return lambda: [fn() for fn in runs]

    if calls:
        for backend in backends:
            if backend in SPARSE_BACKENDS:
                jobs.append((backend, density, {}, lambda backend=backend: replay(backend)))
    ctx = AttnContext(layer="bench", layer_index=15, num_layers=30, grid=grid, step=step, num_steps=50)
    jobs.append(("method", density, {"kernel_backend": kernel_backend}, lambda: (lambda: method.attend(q, k, v, ctx))))
    # a method without a search of its own gives None: no row
    jobs.append(("search", density, {"kernel_backend": kernel_backend}, lambda: method.search_call(q, k, v)))
    return info, jobs


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
    layouts = args.layouts or list(LAYOUTS)
    out = Path(args.out) if args.out else _default_output("kernel", env)
    rows = []
    for name in names:
        b, h, n, d, grid = {**SHAPES, **QUICK_SHAPES}[name]
        base = {
            "bench": "kernel", **env, "shape": name, "B": b, "H": h, "Nq": n, "Nk": n, "D": d, "grid": list(grid), "dtype": dtype_name,
            "block_q": args.block_q, "block_k": args.block_k, "command": args.command,
        }
        jobs: list[tuple[str, str, float, float, dict[str, Any], Callable[[], Callable[[], Any] | None]]] = []
        if "random" in layouts:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
            for backend in backends:
                if backend in DENSE_BACKENDS:
                    jobs.append((backend, "dense", 1.0, 1.0, {},
                                 lambda backend=backend, q=q, k=k, v=v: _dense_call(backend, q, k, v)))
            for density in args.densities:
                layout = random_layout(h, n, n, args.block_q, args.block_k, density, device, seed=int(density * 1000))
                for backend in backends:
                    if backend in SPARSE_BACKENDS:
                        jobs.append(
                            (backend, "random", density, layout.density, {},
                             lambda backend=backend, layout=layout, q=q, k=k, v=v: _sparse_call(backend, q, k, v, layout))
                        )
        for name_m in [m for m in layouts if m in METHOD_LAYOUTS]:
            try:
                info, mjobs = _method_jobs(name_m, grid, b, h, d, dtype, device, backends)
            except Exception as e:  # a method that cannot plan this shape is a result, not a crash
                row = {**base, "layout": name_m, "backend": "method", "ms": None, "tflops": None,
                       "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                write_rows([row], out)
                _print_row(row)
                continue
            for backend, density, extra, make in mjobs:
                jobs.append((backend, name_m, None, density, {**info, **extra}, make))
        for backend, layout_name, target, actual, extra, make in jobs:
            row = {**base, "layout": layout_name, "backend": backend, "density_target": target, "density": actual, **extra}
            try:
                fn = make()
                if fn is None:
                    continue
                ms = time_ms(fn, device, args.warmup, args.iters)
                work = 1.0 if backend == "search" else actual
                row.update(ms=ms, tflops=4.0 * b * h * n * n * d * work / (ms * 1e-3) / 1e12)
                if backend == "search":
                    row["tflops"] = None
            except Exception as e:  # a backend that cannot run this shape is a result, not a crash
                row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {e}"[:300])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            write_rows([row], out)
            _print_row(row)
    print(f"wrote {len(rows)} rows to {out}")
    summarize(rows)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    ms = f"{row['ms']:9.3f} ms" if row.get("ms") is not None else f"failed: {row.get('error')}"
    tf = f"{row['tflops']:8.3g} TFLOP/s" if row.get("tflops") is not None else ""
    density = f"d={row['density']:.3f}" if row.get("density") is not None else ""
    print(f"{row['shape']:>20} {row.get('layout', 'random'):>7} {row['backend']:>14} {density} {ms} {tf}", flush=True)


def summarize(rows: list[dict[str, Any]]) -> None:
    """Ratios behind the speed targets: dense throughput vs SDPA, sparse scaling, speed-up vs Flex, and
    each method's real layout against dense SDPA."""
    ok = [r for r in rows if r.get("ms") is not None]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        mine = [r for r in ok if r["shape"] == shape]
        by = {(r["backend"], r["density_target"]): r for r in mine if r.get("layout", "random") in ("random", "dense")}
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
        for layout in METHOD_LAYOUTS:
            m = {r["backend"]: r for r in mine if r.get("layout") == layout}
            if not m:
                continue
            parts = [f"density {next(iter(m.values()))['density']:.3f}"]
            for backend in ("triton", "torch", "flex", "triton-int8", "method", "search"):
                if backend in m:
                    parts.append(f"{backend} {m[backend]['ms']:.3f} ms")
                    if sdpa and backend in ("triton", "torch", "method"):
                        parts[-1] += f" ({sdpa['ms'] / m[backend]['ms']:.2f}x sdpa)"
            kernel = m.get("triton") or m.get("torch")
            dense_kernel = by.get((kernel["backend"], 1.0)) if kernel else None
            if kernel and dense_kernel and "simulated_speedup" in kernel:
                parts.append(
                    f"speed-up vs own dense {dense_kernel['ms'] / kernel['ms']:.2f}x "
                    f"(block-count bound {kernel.get('simulated_speedup', float('nan')):.2f}x)"
                )
            lines.append(f"  {layout}: " + ", ".join(parts))
        if lines:
            print(f"\n{shape}\n" + "\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffattn bench kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy shapes that also run on CPU")
    p.add_argument(
        "--shapes", nargs="+", help=f"subset of {list(SHAPES)} (or wan / wan720 / hunyuan) or {list(QUICK_SHAPES)}"
    )
    p.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS,
        help="random layouts at --densities and/or each method's real layout (default: all)",
    )
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--backends", nargs="+", choices=SPARSE_BACKENDS + DENSE_BACKENDS)
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--out", help="JSON-lines file to append to (default benchmarks/results/<date>-<device>-kernel.jsonl)")
    args = parse_bench_args(p, argv, positive=("iters",))
    for s in args.shapes or []:
        if ALIASES.get(s, s) not in {**SHAPES, **QUICK_SHAPES}:
            p.error(f"unknown shape {s!r}; choose from {list(SHAPES) + list(QUICK_SHAPES)} or wan/wan720/hunyuan")
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
