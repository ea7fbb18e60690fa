"""Quality of every registered video method on synthetic DiT-like attention: error and recall vs density.

Inputs come from :func:`diffattn.patterns.synthetic.synthetic_qkv` (smooth spatiotemporal content,
Wan's 3-D RoPE, local / spatial / temporal / global heads). Every method with a ``"quality"`` benchmark
runs each of its variants through a 50-step schedule in miniature: it is called at the event steps its
config declares (AdaSpa's searches at 10 and 30, PARO's calibrations at 5 and 25) and then measured at
its steady step (40). The inputs at step ``t`` are the synthetic
field advanced to ``time = drift * t``, so cached plans meet drifted attention as in a real run.

Per (method, config, drift) one JSON row: density (fraction of video tile pairs computed), recall
(mean over queries of the attention mass the method keeps, ``exp(lse_method - lse_dense)``), output
relative L2 error against dense fp32 attention, plus shape, device and commit. A table is printed.

    diffattn bench quality --out benchmarks/results/quality_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from diffattn.bench.common import environment
from diffattn.kernels import dense_masked_attention
from diffattn.methods import AttnContext, Variant, VideoSparseMethod, describe, get_method_class, method_names
from diffattn.patterns.synthetic import HEAD_KINDS, synthetic_qkv

ENV = environment()


def measure(name: str, variant: Variant, args, drift, inputs_at) -> dict[str, Any] | None:
    about = describe(name)
    try:
        cfg = about.config(variant, backend=args.backend)
    except (TypeError, ValueError) as e:
        print(f"skip {name} {variant.fields}: {e}", file=sys.stderr)
        return None
    method = get_method_class(name)(cfg)
    grid = tuple(args.grid)

    def ctx(step, sink):
        return AttnContext(layer="layer0", grid=grid, step=step, num_steps=50, scale=None, record=sink)

    for step in type(method).event_steps(cfg):
        method.attend(*inputs_at(step), ctx(step, lambda **kw: None))
    q, k, v = inputs_at(about.steady_step)
    stats: dict[str, Any] = {}
    c = ctx(about.steady_step, lambda **kw: stats.update(kw))
    # A video method is measured on its video attention alone, which gives the LSE the recall needs.
    video = isinstance(method, VideoSparseMethod)
    if video and method.use_dense(c):
        print(f"skip {name} {variant.fields}: still dense at step {about.steady_step}", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    if video:
        o, lse = method.video_attention(q, k, v, c)
    else:
        o = method.attend(q, k, v, c)
        lse = None
    wall = time.perf_counter() - t0
    ref_o, ref_lse = dense_masked_attention(q, k, v)
    err, ref = o.float() - ref_o.float(), ref_o.float()
    rel = float(err.norm() / ref.norm())
    rel_heads = (err.pow(2).sum(dim=(0, 2, 3)) / ref.pow(2).sum(dim=(0, 2, 3))).sqrt()
    recall = 1.0 if lse is None else float(torch.exp(lse - ref_lse).mean())
    recall_heads = torch.ones(q.shape[1]) if lse is None else torch.exp(lse - ref_lse).mean(dim=(0, 2))
    fields = {k2: v2 for k2, v2 in cfg.to_dict().items() if k2 != "backend"}
    return {
        "bench": "quality",
        "method": name,
        "config": fields,
        "label": variant.label,
        "density": float(stats.get("density", float("nan"))),
        "recall": recall,
        "rel_l2": rel,
        "rel_l2_per_head": [round(float(x), 5) for x in rel_heads],
        "recall_per_head": [round(float(x), 5) for x in recall_heads],
        "head_kinds": [HEAD_KINDS[i % len(HEAD_KINDS)] for i in range(q.shape[1])],
        "drift": drift,
        "grid": list(grid),
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "seed": args.seed,
        "dtype": "float32",
        **{k: ENV[k] for k in ("device", "device_type", "torch", "triton", "date")},
        "backend": getattr(cfg, "backend", "auto"),
        "call_s": round(wall, 4),
        "commit": ENV["commit"],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(8, 16, 24), metavar=("F", "H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drifts", type=float, nargs="+", default=(0.01,))
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods with a quality benchmark")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)

    registered = method_names(benchmark="quality")
    chosen = [m for m in (args.methods or registered) if m in registered]
    missing = [m for m in args.methods or () if m not in registered]
    if missing:
        print(f"no quality benchmark (skipped): {missing}; methods with one: {registered}", file=sys.stderr)
    rows = []
    for drift in args.drifts:
        cache: dict[int, tuple] = {}

        def inputs_at(step, drift=drift, cache=cache):
            if step not in cache:
                cache[step] = synthetic_qkv(
                    tuple(args.grid), args.batch, args.heads, args.head_dim, seed=args.seed, time=drift * step
                )
            return cache[step]

        for name in chosen:
            for variant in describe(name).benchmarks["quality"]:
                row = measure(name, variant, args, drift, inputs_at)
                if row is None:
                    continue
                rows.append(row)
                print(
                    f"{name:7s} {row['label']:22s} drift={drift:<5g} density={row['density']:.3f} "
                    f"recall={row['recall']:.4f} rel_l2={row['rel_l2']:.4f}",
                    flush=True,
                )
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print(table(rows))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per (method, config, drift), worst head kind included."""
    lines = [
        "| method | config | drift | density | recall | rel L2 | worst head (rel L2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        worst = max(range(len(r["rel_l2_per_head"])), key=lambda i: r["rel_l2_per_head"][i])
        lines.append(
            f"| {r['method']} | {r.get('label', '')} | {r['drift']:g} | {r['density']:.3f} | {r['recall']:.4f} | "
            f"{r['rel_l2']:.4f} | {r['head_kinds'][worst]} ({r['rel_l2_per_head'][worst]:.3f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
