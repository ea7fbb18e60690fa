"""Train the embedded tiny video model (diffattn/assets/tiny) on procedurally generated shape videos.

Flow matching in pixel space: for a clean video ``x0`` in [-1, 1], noise ``e`` and a noise level
``sigma`` (uniform, or logit-normal), the transformer sees ``x = (1 - sigma) x0 + sigma e`` at timestep
``1000 sigma`` -- the convention of ``FlowMatchEulerDiscreteScheduler``, which samples it. With
``--prediction sample`` (default) it predicts ``x0`` (loss ``min(1/sigma^2, 4) |x0_hat - x0|^2``) and the
pipeline converts to the velocity; with ``velocity`` it predicts ``e - x0``. By default the transformer
also gets absolute (t, y, x) position channels (``diffattn.pipelines.tiny.position_channels``). The
word-level text encoder is trained jointly; 10% of prompts are dropped to the empty prompt so
classifier-free guidance works.

Each step draws a batch of fresh videos of one clip length at 64x64. Attention cost grows with the
square of the token count (256 tokens per frame), so most steps use short clips (1-3 frames) and the
last ``--long-from`` share of the steps longer ones (5 and 9 frames, smaller batches) so the model sees
every temporal offset of the default 9 frames. ``--jitter`` < 1 keeps each trajectory near the centre
of the frame, so the prompt fixes where the shape is; ``--lead`` instead translates the scenes and the
position channels' origin together (see below); ``--directions`` restricts the motions trained on.
The saved weights are an exponential moving average.

Why those choices: a 64-channel transformer cannot carry the 48 noise values of a 4x4x3 patch through
to a velocity output, so velocity samples stayed speckled; logit-normal noise levels rarely train the
high-noise steps where the layout and the motion are decided; RoPE (relative) with an unpadded patch
embedding leaves the model unable to tell the frame centre from an edge, so it scattered the shape over
the frame; and two things were needed for the prompt's direction word to move the shape:

- ``--lead`` with ``--jitter 1``: scenes are drawn anywhere in the frame and each video's coordinate
  origin (the position channels) moves with its scene, so only the channels -- not the frame edges --
  say where the scene is. A model that places shapes by sensing the frame edges (as earlier weights did:
  moving their x channel's origin by 6.4 px moved the drawn shape 0.5 px) cannot move them per frame;
  one placing them by the channels can (x - speed * t is linear in the channels). The origin sits
  ``--lead`` px behind the trajectory's middle, so the direction word also shifts the whole trajectory:
  a first-order signal that teaches the text path to carry the direction early.
- ``--word-skip``: the text encoder adds each word's own embedding to its output, so the direction word
  reaches cross-attention as itself. Without it, prompts differing only in the direction word encoded
  within 5 % of each other (colour words: 57 %) and left/right/up/down gave the same prediction.

Measured on fresh models, 1-frame clips, sigma >= 0.9, ``--lead 10``, 2,000 steps: with ``--jitter 0``
(the frame edges give the position away) the drawn shape sat at the frame centre for every direction
word; with ``--jitter 1`` it sat 7.5-8.8 px along the prompted direction. Continuing earlier weights that
had learned to ignore the direction word did not recover it in 300-1,300 steps.

The shipped weights were made in these stages on a 2-core CPU (``--init`` continues the previous output):

    python scripts/train_tiny.py --steps 1500 --batch 8 --short-frames 3 --long-from 1 --lr 2e-3 --warmup 20 \
        --jitter 1 --sigma-min 0.9 --lead 6 --word-skip --threads 2 --seed 12 --out /tmp/tiny-1  # 534 s, loss 0.051
    python scripts/train_tiny.py --init /tmp/tiny-1 --steps 4000 --batch 8 --short-frames 3 --long-frames 5,9 \
        --long-from 0.4 --long-batch 4 --lr 1.5e-3 --warmup 20 --jitter 1 --lead 6 --sigma-dist high \
        --threads 2 --seed 13 --out /tmp/tiny-2                                      # 3209 s, loss 0.023
    python scripts/train_tiny.py --init /tmp/tiny-2 --steps 2400 --stop-after 1800 --long-from 0 --long-frames 5,9 \
        --long-batch 4 --lr 7e-4 --warmup 20 --jitter 1 --lead 6 --sigma-dist uniform --threads 2 --seed 14 \
        --out diffattn/assets/tiny                                                   # 1712 s, loss 0.017

About 1.5 hours in all on 2 CPU cores. Stage 1 trains only the noise levels where the layout is
decided, on 3-frame clips: on 3 frames its sigma = 1 predictions already move left and right as prompted
(1.9 and 2.0 px a frame, offset 4-5 px) but not yet up or down (-0.1 and 0.2 px a frame). Stage 2 covers
all noise levels (``high``: density 2 sigma) and 5- and 9-frame clips; stage 3 (uniform noise levels,
5 and 9 frames) sharpens the outlines. ``training.json`` in the asset folder has the last
stage's loss curve and wall time. Measured on the shipped weights (20-step samples at 9x64x64, guidance 4,
4 colour/shape/background combinations x 4 directions x 2 seeds; ``diffattn.pipelines.tiny.measure_motion``):
the shape moves 2.5-3.5 px a frame along the prompted direction (mean 2.95-3.24 per direction; the
training videos move 2.9-3.5), its trajectory's middle sits 5-6 px along the direction from the frame
centre (the ``--lead``), and the background and shape colours are the prompted ones. Circle, square and
triangle are not told apart reliably yet.

Everything (data, init, sigma draws) is seeded; ``training.json`` in the output folder records the
command, wall time and loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from diffusers import WanTransformer3DModel

from diffattn.pipelines.tiny import (
    DIRECTIONS,
    POSITION_CHANNELS,
    TinyTextEncoder,
    build_tiny_pipeline,
    pixel_to_position,
    random_scenes,
    render_videos,
    scene_prompt,
    with_position_channels,
)

# variations of the prompt wording, so articles and the verb form are not load-bearing
TEMPLATES = (
    "a {color} {shape} moving {direction} on a {background} background",
    "a {color} {shape} moving {direction} on a {background} background",
    "{color} {shape} moving {direction} on {background} background",
    "a {color} {shape} moves {direction} on a {background} background",
    "the {color} {shape} going {direction} over a {background} background",
)


def make_batch(
    batch: int, choices: list[int], height: int, width: int, g: torch.Generator, drop: float,
    radius: tuple[float, float], jitter: float = 1.0, directions: list[str] | None = None,
    lead: float | None = None,
):
    """Videos in [-1, 1], their prompts, and with ``lead`` set the coordinate origin of each video
    (``[B, 2]``): ``lead`` pixels behind the middle of its trajectory, so that the position channels, not
    the frame edges, say where the scene is, and the prompt's direction alone moves its mean position."""
    frames = choices[int(torch.randint(len(choices), (), generator=g))]
    scenes = random_scenes(batch, frames, height, width, g, radius=radius, jitter=jitter, directions=directions)
    origin = None
    if lead is not None:
        mid = (frames - 1) / 2
        rows = []
        for s in scenes:
            dx, dy = DIRECTIONS[s.direction]
            ahead = s.speed * mid - lead
            rows.append([pixel_to_position(s.y + dy * ahead, height), pixel_to_position(s.x + dx * ahead, width)])
        origin = torch.tensor(rows)
    videos = render_videos(scenes, frames, height, width, supersample=2) * 2 - 1
    prompts = []
    for s in scenes:
        template = TEMPLATES[int(torch.randint(len(TEMPLATES), (), generator=g))]
        text = template.format(color=s.color, shape=s.shape, direction=s.direction, background=s.background)
        prompts.append("" if float(torch.rand((), generator=g)) < drop else text)
    return videos, prompts, origin


def _add_position_inputs(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """The same transformer taking position channels too; their patch-embedding weights start at zero."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["in_channels"] = model.config.out_channels + POSITION_CHANNELS
    grown = WanTransformer3DModel(**config)
    state = model.state_dict()
    w = state["patch_embedding.weight"]
    state["patch_embedding.weight"] = torch.cat(
        [w, torch.zeros(w.shape[0], POSITION_CHANNELS, *w.shape[2:], dtype=w.dtype)], dim=1
    )
    grown.load_state_dict(state)
    return grown


def _add_word_skip(text: TinyTextEncoder) -> TinyTextEncoder:
    """The same encoder with a per-word skip embedding, starting at zero (so its outputs are unchanged)."""
    config = {k: v for k, v in dict(text.config).items() if not k.startswith("_")}
    grown = TinyTextEncoder(**{**config, "word_skip": True})
    missing, unexpected = grown.load_state_dict(text.state_dict(), strict=False)
    assert missing == ["word.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        grown.word.weight.zero_()
    return grown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8, help="batch of the short clips")
    p.add_argument("--short-frames", default="1,2,3", help="clip lengths of the first steps")
    p.add_argument("--long-frames", default="5,9", help="clip lengths of the last steps")
    p.add_argument("--long-from", type=float, default=0.85, help="share of steps before long clips start")
    p.add_argument("--long-batch", type=int, default=2, help="batch of the long clips")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--drop", type=float, default=0.1, help="probability of the empty prompt")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=200, help="also save the EMA weights every N steps")
    p.add_argument("--out", default="diffattn/assets/tiny")
    p.add_argument("--init", help="continue from the weights in this folder (a previous --out)")
    p.add_argument("--radius", default="0.15,0.19", help="shape half-extent range, fraction of the frame")
    p.add_argument(
        "--jitter", type=float, default=1.0,
        help="share of the free room the start position is drawn from (0: trajectories centred in the frame)",
    )
    p.add_argument(
        "--no-position-channels", dest="position_channels", action="store_false",
        help="do not give the transformer absolute (t, y, x) position channels (RoPE alone is relative)",
    )
    p.add_argument(
        "--prediction", choices=("sample", "velocity"), default="sample",
        help="what the transformer predicts: the clean video (x0) or the flow velocity (noise - x0)",
    )
    p.add_argument(
        "--sigma-dist", choices=("logit-normal", "uniform", "high"), default="uniform",
        help="noise-level distribution; logit-normal rarely draws sigma > 0.9, where sampling lays out the "
        "shapes; 'high' draws sqrt(uniform) (density 2 sigma), where the prompt alone decides the motion",
    )
    p.add_argument(
        "--directions", default="left,right,up,down",
        help="motion directions to train on (a curriculum can start with 'right,down': motion that does not "
        "cancel out on average teaches the model to use the frame channel at all)",
    )
    p.add_argument(
        "--lead", type=float,
        help="translation augmentation: draw scenes anywhere (use with --jitter 1) and move each video's "
        "coordinate origin to this many pixels behind its trajectory's middle; at sampling time the origin "
        "is the frame centre, so trajectories come out centred, shifted this far along the prompted direction",
    )
    p.add_argument(
        "--word-skip", action="store_true",
        help="give the text encoder a per-word embedding added to every output position (word_skip=True); "
        "with --init from an encoder without one, the new table starts at zero",
    )
    p.add_argument(
        "--sigma-min", type=float, default=0.0,
        help="draw noise levels from [sigma-min, 1] only (with --sigma-dist uniform or high)",
    )
    p.add_argument("--stop-after", type=int, help="stop (and save) after this many steps of the --steps schedule")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.init:
        from diffattn.pipelines.tiny import load_pipeline

        torch.manual_seed(args.seed)
        pipe = load_pipeline(args.init)
        pipe.register_to_config(prediction_type=args.prediction)
        if args.position_channels and pipe.transformer.config.in_channels == pipe.transformer.config.out_channels:
            pipe.transformer = _add_position_inputs(pipe.transformer)
    else:
        overrides = {} if args.position_channels else {"in_channels": 3}
        pipe = build_tiny_pipeline(seed=args.seed, prediction_type=args.prediction, **overrides)
    if args.word_skip and not pipe.text_encoder.config.word_skip:
        pipe.text_encoder = _add_word_skip(pipe.text_encoder)
    model, text = pipe.transformer, pipe.text_encoder
    directions = args.directions.split(",")
    if args.lead is not None and model.config.in_channels == model.config.out_channels:
        raise SystemExit("--lead moves the position channels' origin: drop --no-position-channels")
    model.train()
    text.train()
    params = list(model.parameters()) + list(text.parameters())
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    g = torch.Generator().manual_seed(args.seed)
    history = []
    running = None
    start = time.time()
    radius = tuple(float(v) for v in args.radius.split(","))
    short = [int(v) for v in args.short_frames.split(",")]
    long = [int(v) for v in args.long_frames.split(",")]
    long_start = int(args.long_from * args.steps)
    out = Path(args.out)

    def save(final: bool) -> None:
        with torch.no_grad():
            current = [q.detach().clone() for q in params]
            for e, q in zip(ema, params):
                q.copy_(e)
            pipe.save_pretrained(out)
            if not final:
                for c, q in zip(current, params):
                    q.copy_(c)

    for step in range(min(args.stop_after or args.steps, args.steps)):
        phase_long = step >= long_start
        x0, prompts, origin = make_batch(
            args.long_batch if phase_long else args.batch, long if phase_long else short,
            args.height, args.width, g, args.drop, radius, args.jitter, directions, args.lead,
        )
        noise = torch.randn(x0.shape, generator=g)
        if args.sigma_dist in ("uniform", "high"):
            u = torch.rand(x0.shape[0], generator=g)
            u = u if args.sigma_dist == "uniform" else u.sqrt()
            sigma = (args.sigma_min + (1 - args.sigma_min) * u).view(-1, 1, 1, 1, 1)
        else:
            sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=g)).view(-1, 1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        ids, lengths = text.tokenize(prompts)
        emb = text(ids, lengths)
        inputs = with_position_channels(xt, model.config.in_channels, origin=origin)
        pred = model(inputs, sigma.flatten() * 1000, emb, return_dict=False)[0]
        if args.prediction == "velocity":
            loss = (pred - (noise - x0)).pow(2).mean()
        else:
            # x0 error weighted by 1/sigma^2 (the velocity error it implies), capped at 4 so that
            # nearly clean inputs do not dominate
            weight = sigma.pow(-2).clamp(max=4.0)
            loss = (weight * (pred - x0).pow(2)).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (step + 1) / (step + 10))
            for e, q in zip(ema, params):
                e.lerp_(q.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        last = step + 1 == min(args.stop_after or args.steps, args.steps)
        if (step + 1) % args.log_every == 0 or last:
            elapsed = time.time() - start
            history.append({"step": step + 1, "loss": round(running, 5), "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{args.steps} loss {running:.4f} lr {lr_at(step):.2e} {elapsed:.0f}s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and not last:
            save(final=False)

    model.eval()
    text.eval()
    save(final=True)
    info = {
        "command": "python scripts/train_tiny.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "args": vars(args),
        "seconds": round(time.time() - start, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "torch": torch.__version__,
        "cpu_threads": args.threads,
        "example_prompt": scene_prompt(random_scenes(1, 9, 64, 64, torch.Generator().manual_seed(0))[0]),
        "history": history,
    }
    with open(out / "training.json", "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"saved to {out} in {info['seconds']}s, final loss {info['final_loss']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
