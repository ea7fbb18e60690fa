"""Draw a filmstrip of the embedded tiny model's videos: one row per (prompt, method), every other frame.

Each prompt is generated densely and then with each method from the same seed, so the rows of a prompt
differ only by the attention. The row label gives the PSNR against the dense video and the shape's
speed along the prompted direction.

    python scripts/tiny_filmstrip.py --out docs/tiny_samples.png
    python scripts/tiny_filmstrip.py --methods dense radial adaspa --prompts "a red circle moving right on a blue background"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import diffattn
from diffattn.bench.tiny import PROMPTS  # one per direction, the same as the fidelity benchmark
from diffattn.pipelines.metrics import psnr
from diffattn.pipelines.tiny import load_pipeline, measure_motion

FIELDS = {"agent": {"layout": "dit"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    ap.add_argument("--methods", nargs="+", default=["dense", "radial", "adaspa", "paro"])
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoom", type=int, default=2, help="pixel repeat of the saved picture")
    ap.add_argument("--out", default="tiny_samples.png")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pipe = load_pipeline("tiny")
    rows, labels = [], []
    for i, prompt in enumerate(a.prompts):
        reference = None
        for method in a.methods:
            if method != "dense":
                diffattn.apply(pipe, method, min_tokens=0, **FIELDS.get(method, {}))
            try:
                out = pipe(prompt, num_frames=a.frames, height=a.size, width=a.size, num_inference_steps=a.steps,
                           generator=torch.Generator().manual_seed(a.seed + i), output_type="np")
            finally:
                if method != "dense":
                    diffattn.remove(pipe)
            video = np.asarray(out.frames[0])
            if reference is None:
                reference = video
            speed = measure_motion(video, prompt)["speed"]
            moved = "" if speed is None else f", {speed:+.1f} px/frame along the prompted direction"
            label = (prompt if method == "dense" else f"{method}: {psnr(video, reference):.1f} dB vs dense") + moved
            rows.append(np.concatenate(list(video[::2]), axis=1))
            labels.append(label)
            print(label, flush=True)
    strip_h, strip_w = rows[0].shape[:2]
    fig, axes = plt.subplots(len(rows), 1, figsize=(strip_w * a.zoom / 100, len(rows) * (strip_h * a.zoom + 22) / 100))
    for ax, img, label in zip(np.atleast_1d(axes), rows, labels):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
