"""Quality of every registered video method on synthetic DiT-like attention: error and recall vs density.

Inputs come from :func:`diffattn.patterns.synthetic.synthetic_qkv` (smooth spatiotemporal content,
Wan's 3-D RoPE, local / spatial / temporal / global heads). Each method runs a 50-step schedule in
miniature: it is called at the steps where it does something (AdaSpa's searches at 10 and 30, PARO's
calibrations at 5 and 25) and then measured at step 40. The inputs at step ``t`` are the synthetic
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
from diffattn.methods import AttnContext, get_method_class, method_names
from diffattn.patterns.synthetic import HEAD_KINDS, synthetic_qkv

ENV = environment()
VIDEO_METHODS = ("dense", "radial", "gna", "adaspa", "paro")

# Steps (of 50) at which a method changes its plan; it is called there before being measured.
EVENT_STEPS = {"adaspa": (10, 30), "paro": (5, 25)}
MEASURE_STEP = 40


def sweeps(backend: str) -> dict[str, list[dict[str, Any]]]:
    """Configs per method. Warm-ups are turned off for static methods: a single step is measured."""
    return {
        "dense": [dict(backend=backend)],
        "radial": [
            dict(preset="wan", dense_steps=0, dense_layers=0, backend=backend),
            dict(preset="hunyuan", dense_steps=0, dense_layers=0, backend=backend),
        ],
        "gna": [
            dict(backend=backend),
            dict(kernel_size=(4, 16, 16), stride=(4, 8, 8), backend=backend),
        ],
        "adaspa": [dict(sparsity=s, backend=backend) for s in (0.5, 0.7, 0.8, 0.9)]
        + [dict(sparsity=0.8, head_adaptive=False, backend=backend)]
        + [dict(mode="recall", target_recall=r, backend=backend) for r in (0.9, 0.95, 0.99)],
        "paro": [dict(density=d, backend=backend) for d in (0.2, 0.3, 0.5)]
        + [dict(density=0.5, qk_bits=8, pv_bits=pv, backend=backend) for pv in (8, 4)],
    }


def _make(name: str, spec: dict[str, Any]):
    cls = get_method_class(name)
    spec = dict(spec)
    preset = spec.pop("preset", None)
    cfg = cls.config_cls.preset(preset, **spec) if preset else cls.config_cls(**spec)
    return cls(cfg), cfg




def measure(name, spec, args, drift, inputs_at) -> dict[str, Any] | None:
    try:
        method, cfg = _make(name, spec)
    except (TypeError, ValueError) as e:
        print(f"skip {name} {spec}: {e}", file=sys.stderr)
        return None
    grid = tuple(args.grid)

    def ctx(step, sink):
        return AttnContext(layer="layer0", grid=grid, step=step, num_steps=50, scale=None, record=sink)

    for step in EVENT_STEPS.get(name, ()):
        method.attend(*inputs_at(step), ctx(step, lambda **kw: None))
    q, k, v = inputs_at(MEASURE_STEP)
    stats: dict[str, Any] = {}
    c = ctx(MEASURE_STEP, lambda **kw: stats.update(kw))
    if name != "dense" and method.use_dense(c):
        print(f"skip {name} {spec}: still dense at step {MEASURE_STEP}", file=sys.stderr)
        return None
    t0 = time.perf_counter()
    if name == "dense":
        o = method.attend(q, k, v, c)
        lse = None
    else:
        o, lse = method.video_attention(q, k, v, c)
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
        "backend": spec.get("backend", "auto"),
        "call_s": round(wall, 4),
        "commit": ENV["commit"],
    }


def _label(row: dict[str, Any]) -> str:
    c = row["config"]
    m = row["method"]
    if m == "adaspa":
        if c["mode"] == "recall":
            return f"recall>={c['target_recall']}"
        return f"s={c['sparsity']}" + ("" if c["head_adaptive"] else " uniform")
    if m == "paro":
        q = "" if c["qk_bits"] is None else f" int{c['qk_bits']}/int{c['pv_bits']}"
        return f"d={c['density']}{q}"
    if m == "radial":
        return f"decay={c['decay_factor']}"
    if m == "gna":
        return f"k={tuple(c['kernel_size'])} s={tuple(c['stride'])}"
    return ""


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(8, 16, 24), metavar=("F", "H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drifts", type=float, nargs="+", default=(0.01,))
    parser.add_argument("--methods", nargs="+", default=None, help="subset of registered video methods")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)

    registered = [m for m in VIDEO_METHODS if m in method_names()]
    chosen = [m for m in (args.methods or registered) if m in registered]
    missing = [m for m in VIDEO_METHODS if m not in registered]
    if missing:
        print(f"not registered (skipped): {missing}", file=sys.stderr)
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
            for spec in sweeps(args.backend)[name]:
                row = measure(name, spec, args, drift, inputs_at)
                if row is None:
                    continue
                rows.append(row)
                print(
                    f"{name:7s} {_label(row):22s} drift={drift:<5g} density={row['density']:.3f} "
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
            f"| {r['method']} | {_label(r)} | {r['drift']:g} | {r['density']:.3f} | {r['recall']:.4f} | "
            f"{r['rel_l2']:.4f} | {r['head_kinds'][worst]} ({r['rel_l2_per_head'][worst]:.3f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
