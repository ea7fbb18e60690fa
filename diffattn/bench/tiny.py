"""Tiny-model fidelity: PSNR/SSIM of every video method against dense generation on the embedded tiny model.

The tiny Wan-style model has random weights, so the numbers check that each method runs end to end in a
real Diffusers pipeline and how far its output drifts from dense with identical seeds; they are not a
statement about output quality on trained weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .common import default_output, environment, write_rows

PROMPTS = (
    "a red fox running through fresh snow",
    "waves breaking on a rocky shore at sunset",
    "a city street at night with neon lights",
)
# method -> extra config fields (defaults otherwise); agent needs the DiT token layout
METHODS: dict[str, dict[str, Any]] = {
    "radial": {},
    "gna": {},
    "adaspa": {},
    "paro": {},
    "agent": {"layout": "dit"},
}


def _generate(pipe, prompt: str, seed: int, frames: int, size: int, steps: int | None) -> tuple[Any, float]:
    from diffattn.pipelines.generate import _frames_of

    kwargs: dict[str, Any] = {"num_frames": frames, "height": size, "width": size}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    # a CPU generator gives the same noise for dense and every method
    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    out = pipe(prompt=prompt, generator=generator, output_type="np", **kwargs)
    return _frames_of(out), time.perf_counter() - start


def run(prompts: int = 3, frames: int = 9, size: int = 64, steps: int | None = None,
        methods: list[str] | None = None, seed: int = 0, env: dict | None = None) -> list[dict[str, Any]]:
    """One row per (method, prompt) with PSNR/SSIM against the dense video of the same prompt and seed."""
    import diffattn
    from diffattn.pipelines.metrics import psnr, ssim
    from diffattn.pipelines.tiny import load_pipeline

    env = env or environment("cpu")
    pipe = load_pipeline("tiny", dtype=torch.float32, device="cpu")
    rows: list[dict[str, Any]] = []
    for index, prompt in enumerate(PROMPTS[:prompts]):
        reference, dense_s = _generate(pipe, prompt, seed + index, frames, size, steps)
        for method in methods or list(METHODS):
            fields = METHODS.get(method, {})
            config = diffattn.apply(pipe, method, min_tokens=0, **fields)
            try:
                video, seconds = _generate(pipe, prompt, seed + index, frames, size, steps)
                summary = diffattn.stats(pipe).summary()
            finally:
                diffattn.remove(pipe)
            rows.append({
                "bench": "tiny", **{k: v for k, v in env.items() if k != "device"}, "device": "cpu",
                "method": method, "config": json.loads(config.to_json()),
                "prompt": prompt, "seed": seed + index, "frames": frames, "height": size, "width": size,
                "steps": steps, "density": summary.get("density"),
                "psnr": float(psnr(video, reference)), "ssim": float(ssim(video, reference)),
                "seconds": seconds, "dense_seconds": dense_s,
            })
            print(f"{method:8s} prompt {index}: PSNR {rows[-1]['psnr']:.2f} dB  SSIM {rows[-1]['ssim']:.4f}  "
                  f"density {rows[-1]['density']}  {seconds:.1f}s")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=3, help="how many built-in prompts (1-3)")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=64, help="height = width in pixels")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON-lines file to append to (default benchmarks/results/...)")
    a = ap.parse_args(argv)
    env = environment("cpu")
    rows = run(a.prompts, a.frames, a.size, a.steps, a.methods, a.seed, env)
    out = Path(a.out) if a.out else default_output("tiny", env)
    write_rows(rows, out)
    print(f"\n{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
