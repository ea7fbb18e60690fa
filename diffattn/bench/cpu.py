"""Block-sparse attention on a CPU: dense SDPA vs compiled FlexAttention vs diffattn, same layouts.

For every sequence length and layout three providers run the same attention:

* ``sdpa``: ``F.scaled_dot_product_attention`` on the whole problem (PyTorch's fused CPU kernel);
* ``flex-compiled``: ``torch.compile(flex_attention)`` with the layout as a ``BlockMask`` (on CPU the
  compiled kernel returns no LSE, which only makes its job lighter);
* ``diffattn``: :func:`diffattn.kernels.block_sparse_attention` (the ``auto`` backend, which on CPU is
  ``torch``; each row records the path it took, see :func:`diffattn.kernels.api.cpu_path`).

Layouts: ``random`` (each query block keeps ``round(density * Mk)`` random key blocks, the diagonal
always among them) at ``--densities``, and each video method's real layout at its defaults
(``radial``, ``gna``, ``adaspa``, ``paro``: the block-sparse calls the method makes at a late step of a
50-step schedule on synthetic DiT-like inputs, replayed). Calls are timed interleaved across providers,
``--reps`` rounds, and the minimum is kept (the machine may be shared). One-off costs — Flex's compile,
the C++ kernel's build — are timed separately (``one_off_s``) and never inside the timed calls. Every
diffattn row also carries its largest output difference to FlexAttention's (``max_abs_diff_vs_flex``).

    diffattn bench cpu --out benchmarks/results/
    diffattn bench cpu --lengths 8192 --densities 0.2 --heads 12 --head-dim 128 --batch 2 --out /tmp/cpu

Rows are appended to ``<out>/<date>-<device>-cpu.jsonl`` (the device named ``cpu-…``; ``<out>`` defaults to
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffattn.bench.common import default_output, environment, parse_bench_args, write_rows
from diffattn.kernels import BlockSparseLayout, block_sparse_attention, cdiv
from diffattn.methods import method_names

LENGTHS = (8192, 32760)
DENSITIES = (1.0, 0.5, 0.2, 0.1)
METHOD_LAYOUTS = tuple(method_names(family="video", benchmark="kernel"))
# Latent grids (F, H, W) for the method layouts: F * H * W tokens.
GRIDS = {8192: (8, 32, 32), 32760: (21, 30, 52)}


def random_layout(heads: int, n: int, block: int, density: float, seed: int = 0) -> BlockSparseLayout:
    """Each query block keeps ``round(density * M)`` (at least 1) key blocks, its diagonal block included."""
    m = cdiv(n, block)
    keep = max(1, round(density * m))
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(1, heads, m, m, generator=g)
    score[..., torch.arange(m), torch.arange(m)] = 2.0
    mask = torch.zeros(1, heads, m, m, dtype=torch.bool).scatter_(-1, score.topk(keep, -1).indices, True)
    return BlockSparseLayout.from_block_mask(mask, block, block, n, n)


class _Flex:
    """Compiled FlexAttention; the compile is paid (and timed) on the first call of each shape."""

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False)
        self.compiled: set = set()

    def call(self, q, k, v, layout: BlockSparseLayout, scale: float | None) -> tuple[Callable[[], Any], float]:
        from diffattn.kernels.flex import layout_to_flex_block_mask

        bm = layout_to_flex_block_mask(layout, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        run = lambda: self.fn(q, k, v, block_mask=bm, scale=scale)  # noqa: E731
        t0 = time.perf_counter()
        run()
        return run, time.perf_counter() - t0


def _method_calls(name: str, grid: tuple[int, int, int], b: int, h: int, d: int):
    """The method's kernel-benchmark variant on synthetic inputs: (q, k, v) at the measured step, its
    recorded block-sparse calls and its config."""
    from diffattn.bench.kernel import run_method

    r = run_method(name, grid, b, h, d, torch.float32, torch.device("cpu"), "torch")
    return r.qkv, r.calls, {key: val for key, val in r.method.config.to_dict().items() if key != "backend"}


def _interleaved_min(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def _measure(
    label: str, qkv, calls: list[tuple], flex: _Flex | None, reps: int, base: dict[str, Any]
) -> list[dict[str, Any]]:
    """Time dense SDPA on ``qkv`` against flex and diffattn replaying ``calls`` = [(q, k, v, layout, scale)]."""
    from diffattn.kernels import api

    q, k, v = qkv
    n = q.shape[2]
    work = sum(lay.density * cq.shape[0] * cq.shape[1] * cq.shape[2] * ck.shape[2] for cq, ck, _, lay, _ in calls)
    density = work / (q.shape[0] * q.shape[1] * n * n)
    fns: dict[str, Callable[[], Any]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    one_off: dict[str, float] = {}
    t0 = time.perf_counter()
    ours = [block_sparse_attention(cq, ck, cv, lay, scale=s) for cq, ck, cv, lay, s in calls]  # builds the kernel
    one_off["diffattn"] = time.perf_counter() - t0
    paths = sorted({api.cpu_path(cq, ck, cv, lay) for cq, ck, cv, lay, _ in calls})
    fns["diffattn"] = lambda: [block_sparse_attention(cq, ck, cv, lay, scale=s) for cq, ck, cv, lay, s in calls]
    diff = None
    if flex is not None:
        runs, one_off["flex-compiled"] = [], 0.0
        for cq, ck, cv, lay, s in calls:
            run, first = flex.call(cq, ck, cv, lay, s)
            runs.append(run)
            one_off["flex-compiled"] += first
        fns["flex-compiled"] = lambda: [run() for run in runs]
        diff = max(float((o.float() - run().float()).abs().max()) for (o, _), run in zip(ours, runs))
    load_before = os.getloadavg()[0]
    best = _interleaved_min(fns, reps)
    rows = []
    for provider, ms in best.items():
        row = {
            **base, "layout": label, "provider": provider, "ms": round(ms, 3),
            "density": 1.0 if provider == "sdpa" else round(density, 4), "kernel_calls": len(calls),
            "speedup_vs_sdpa": round(best["sdpa"] / ms, 3), "reps": reps,
            "one_off_s": round(one_off[provider], 2) if provider in one_off else None,
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        if provider == "diffattn":
            row.update(paths=paths, max_abs_diff_vs_flex=diff)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_grad_enabled(False)
    env = environment("cpu")
    out = Path(args.out) / default_output("cpu", env).name if args.out else default_output("cpu", env)
    flex = None if args.no_flex else _Flex()
    b, h, d = args.batch, args.heads, args.head_dim
    rows: list[dict[str, Any]] = []
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        base = {"bench": "cpu", **env, "command": args.command, "B": b, "H": h, "N": n, "D": d, "dtype": "fp32", "block": args.block}
        for density in args.densities:
            layout = random_layout(h, n, args.block, density)
            new = _measure("random", (q, k, v), [(q, k, v, layout, None)], flex, args.reps,
                           {**base, "density_target": density})
            _report(out, new, rows)
        for name in args.layouts:
            grid = GRIDS.get(n)
            if grid is None:
                continue
            qkv, calls, cfg = _method_calls(name, grid, b, h, d)
            calls = [(c.q, c.k, c.v, c.layout, c.scale) for c in calls]
            if not calls:
                continue
            new = _measure(name, qkv, calls, flex, args.reps, {**base, "grid": list(grid), "config": cfg})
            _report(out, new, rows)
    print(f"wrote {len(rows)} rows to {out}")
    return rows


def _report(out: Path, new: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    write_rows(new, out)
    rows.extend(new)
    for r in new:
        extra = f" paths={','.join(r['paths'])}" if "paths" in r else ""
        print(
            f"B{r['B']} H{r['H']} N{r['N']} D{r['D']} {r['layout']:>7} d={r['density']:.3f} {r['provider']:>13} "
            f"{r['ms']:10.1f} ms  {r['speedup_vs_sdpa']:5.2f}x sdpa{extra}",
            flush=True,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffattn bench cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="sequence lengths N")
    p.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES), help="random-layout densities (none: skip)")
    p.add_argument("--layouts", nargs="*", choices=METHOD_LAYOUTS, default=list(METHOD_LAYOUTS),
                   help="method layouts to replay (at lengths with a grid: %s)" % sorted(GRIDS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64, help="block size of the random layouts")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds; the minimum is kept")
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (its compile takes ~1 min)")
    p.add_argument("--out", help="folder for the JSON rows (default benchmarks/results/)")
    return parse_bench_args(p, argv, positive=("batch", "heads", "head_dim", "reps"))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
