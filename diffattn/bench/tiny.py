"""Tiny-model fidelity: PSNR/SSIM of every video method against dense generation on the embedded tiny model.

The embedded model (:mod:`diffattn.pipelines.tiny`, a trained 4-layer ``WanTransformer3DModel``) generates
each prompt once densely and once per method with the same seed; every method runs at its defaults
(agent attention with its DiT layout). At the default 9x64x64 the latent grid is 9x16x16, which GNA's
default window (12, 24, 24) covers whole: there GNA equals dense, so a smaller window is measured too.
Each row also has the shape's speed along the prompted direction in the method's and the dense video
(px per frame, :func:`diffattn.pipelines.tiny.measure_motion`): whether the method kept the motion.
One JSON row per (method, prompt), written as soon as it is measured.

    diffattn bench tiny                              # 4 prompts, 9x64x64, the pipeline's 20 steps
    diffattn bench tiny --prompts 1 --frames 5 --size 32 --steps 4 --out /tmp/tiny.jsonl   # smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..methods import benchmark_variants
from ..pipelines.tiny.data import DEFAULT_PROMPTS
from .common import default_output, environment, write_rows

# The prompts `diffattn generate` uses on the tiny model: one per direction, in its vocabulary.
PROMPTS = DEFAULT_PROMPTS
# label -> (method, config fields besides its defaults), as each method declares for this benchmark
METHODS: dict[str, tuple[str, dict[str, Any]]] = benchmark_variants("tiny")


def run(prompts: int = 4, frames: int = 9, size: int = 64, steps: int | None = None,
        methods: list[str] | None = None, seed: int = 0, env: dict | None = None,
        out: Path | None = None) -> list[dict[str, Any]]:
    """One row per (method, prompt) with PSNR/SSIM against the dense video of the same prompt and seed
    (appended to ``out`` as it is measured, when given). Identical videos get ``psnr = None`` and
    ``identical = True`` (JSON has no infinity)."""
    from diffattn.pipelines.compare import Comparer, quality
    from diffattn.pipelines.tiny import load_pipeline, measure_motion

    env = env or environment("cpu")
    pipe = load_pipeline("tiny", dtype=torch.float32, device="cpu")
    comparer = Comparer(pipe, "cpu")
    call: dict[str, Any] = {"num_frames": frames, "height": size, "width": size}
    if steps is not None:
        call["num_inference_steps"] = steps
    rows: list[dict[str, Any]] = []
    try:
        for index, prompt in enumerate(PROMPTS[:prompts]):
            comparer.restore()
            reference = comparer.sample(prompt, seed + index, **call)
            dense_s = reference.seconds["total"]
            dense_motion = measure_motion(reference.frames, prompt)
            for label in methods or list(METHODS):
                method, fields = METHODS[label]
                config = comparer.use(method, fields, min_tokens=0)
                video = comparer.sample(prompt, seed + index, **call)
                q = quality(video.frames, reference.frames, lpips=False)
                seconds = video.seconds["total"]
                motion = measure_motion(video.frames, prompt)
                rows.append({
                    "bench": "tiny", **{k: v for k, v in env.items() if k != "device"}, "device": "cpu",
                    "label": label, "method": method, "config": json.loads(config.to_json()),
                    "prompt": prompt, "seed": seed + index, "frames": frames, "height": size, "width": size,
                    "steps": steps or pipe_default_steps(pipe), "density": video.summary.get("density"),
                    "psnr": None if q["identical"] else q["psnr"], "identical": q["identical"],
                    "ssim": q["ssim"], "seconds": seconds, "dense_seconds": dense_s,
                    "speed": motion["speed"], "drift": motion["drift"],
                    "dense_speed": dense_motion["speed"], "dense_drift": dense_motion["drift"],
                })
                if out is not None:
                    write_rows(rows[-1:], out)
                shown = "identical" if q["identical"] else f"{q['psnr']:.2f} dB"
                ssim_s = "-" if q["ssim"] is None else f"{q['ssim']:.4f}"
                print(f"{label:10s} prompt {index}: PSNR {shown}  SSIM {ssim_s}  "
                      f"density {rows[-1]['density']}  speed {motion['speed']:+.2f} px/frame (dense "
                      f"{dense_motion['speed']:+.2f})  {seconds:.1f}s (dense {dense_s:.1f}s)", flush=True)
    finally:
        comparer.restore()
    return rows


def pipe_default_steps(pipe) -> int | None:
    import inspect

    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return None if default is None else default.default


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many built-in prompts (1-{len(PROMPTS)})")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=64, help="height = width in pixels")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="method labels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON-lines file to append to (default benchmarks/results/...)")
    a = ap.parse_args(argv)
    if not 1 <= a.prompts <= len(PROMPTS):
        ap.error(f"--prompts {a.prompts}: choose 1 to {len(PROMPTS)} (the built-in prompts)")
    env = environment("cpu")
    out = Path(a.out) if a.out else default_output("tiny", env)
    rows = run(a.prompts, a.frames, a.size, a.steps, a.methods, a.seed, env, out)
    print(f"\n{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
