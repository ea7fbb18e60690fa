"""Run every benchmark this machine can run, then rewrite the README's results section and the plots.

On any machine: ``quality`` (synthetic DiT-like attention) and ``tiny`` (the embedded tiny model, PSNR/SSIM
vs dense). With CUDA also: ``kernel`` (random and method layouts at the video shapes), ``e2e`` (Wan2.1-1.3B
480p, Wan-14B 720p and CogVideoX-2b shapes over 50 steps) and ``unet`` (SD 1.5 UNet, 512² and 1024²).
Every benchmark appends its rows to ``benchmarks/results/<date>-<device>-<bench>.jsonl`` (kernel, quality
and tiny row by row, e2e per model); one benchmark failing is reported and the others still run.
Finally ``diffattn bench report`` renders everything under ``benchmarks/results/``.

    diffattn bench all                      # everything this machine can run (a GPU run takes hours)
    diffattn bench all --only quality tiny  # a subset
    diffattn bench all --dry-run            # print the commands only
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import torch

from .common import default_output, environment

CPU_BENCHES = ("quality", "tiny")
GPU_BENCHES = ("kernel", "e2e", "unet")
E2E_MODELS = ("wan1.3b-480p", "wan14b-720p", "cogvideox-2b")


def plan(benches: list[str], env: dict) -> list[tuple[str, list[str]]]:
    """(benchmark module, its arguments) in run order."""
    jobs: list[tuple[str, list[str]]] = []
    for name in benches:
        if name == "e2e":
            out = str(default_output("e2e", env))
            jobs += [("e2e", ["--model", model, "--out", out]) for model in E2E_MODELS]
        elif name == "quality":
            jobs.append(("quality", ["--drifts", "0.0", "0.01", "--out", str(default_output("quality", env))]))
        else:
            jobs.append((name, ["--out", str(default_output(name, env))]))
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffattn bench all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=CPU_BENCHES + GPU_BENCHES, help="run just these benchmarks")
    ap.add_argument("--dry-run", action="store_true", help="print what would run")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite README.md and the plots")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    wanted = list(a.only or (CPU_BENCHES + GPU_BENCHES))
    skipped = [b for b in wanted if b in GPU_BENCHES and not cuda]
    if skipped:
        print(f"no CUDA device: skipping {', '.join(skipped)} (their README rows stay 'not yet measured')")
    benches = [b for b in wanted if b not in skipped]
    jobs = plan(benches, environment())
    failed = []
    for name, args in jobs:
        print(f"\n$ diffattn bench {name} {' '.join(args)}", flush=True)
        if a.dry_run:
            continue
        try:
            result = importlib.import_module(f"diffattn.bench.{name}").main(args)
        except Exception:  # one benchmark failing must not lose the others
            traceback.print_exc()
            result = 1
        if isinstance(result, int) and result != 0:
            failed.append(name)
    if not a.dry_run and not a.no_report:
        from . import report

        report.main([])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
