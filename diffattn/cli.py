"""The ``diffattn`` command (also ``python -m diffattn``).

Subcommands: ``methods`` (list the attention methods), ``generate`` (batch video generation with a
method, timed and compared to dense), ``demo`` (the Gradio app), ``bench`` (benchmarks) and ``draw``
(a method's attention pattern as an image). Each subcommand is one ``_add_<name>`` function that builds its
parser and sets ``handler``; heavy imports happen inside the handler, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


# -------------------------------------------------------------------------------------------- methods
def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the attention methods")
    p.set_defaults(handler=_run_methods)


def _run_methods(args, parser) -> int:
    import diffattn

    print("\n".join(diffattn.methods()))
    return 0


# ------------------------------------------------------------------------------------------- generate
_GENERATE_EPILOG = """\
examples:
  diffattn generate --out out/                                  # tiny model, built-in prompts, dense
  diffattn generate --method radial --compare dense --prompts prompts.txt --out out/
  diffattn generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --method adaspa --config sparsity=0.8 \\
      --prompts prompts.jsonl --frames 33 --height 480 --width 832 --steps 50 --compare dense --out out/
  accelerate launch --num_processes 4 -m diffattn generate ...  # prompts split across 4 GPUs

prompts: .txt (one prompt a line, '#' comments) or .jsonl ({"prompt": ..., "seed": ...,
"negative_prompt": ..., "frames": ..., "height": ..., "width": ..., "steps": ..., "guidance": ...}).
Outputs: <out>/<index>-<slug>.mp4, <out>/report.jsonl (one JSON line a video), <out>/summary.json.
"""


def _add_generate(sub) -> None:
    from .pipelines.generate import DTYPE_CHOICES

    p = sub.add_parser(
        "generate",
        help="generate videos in batch with an attention method and compare with dense",
        description="Generate one video per prompt with --method, time it, and (with --compare dense) "
        "measure speedup and PSNR/SSIM against the dense video from the same seed.",
        epilog=_GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, default), a local Diffusers folder or a hub id")
    p.add_argument("--method", default="dense", help="attention method (see `diffattn methods`); default dense")
    p.add_argument(
        "--config", nargs="+", action="extend", metavar="FILE.json|KEY=VALUE",
        help="the method's config: a JSON file and/or key=value fields (values read as JSON)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="a .txt (one prompt a line) or .jsonl file (per-item prompt/seed/size)")
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: examples for tiny")
    p.add_argument("--negative-prompt", help="negative prompt for every item (a .jsonl item may override)")
    p.add_argument("--frames", type=_positive_int, help="frames per video (default: the pipeline's; tiny 9)")
    p.add_argument("--height", type=_positive_int, help="height in pixels (default: the pipeline's; tiny 64)")
    p.add_argument("--width", type=_positive_int, help="width in pixels (default: the pipeline's; tiny 64)")
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the pipeline's; tiny 20)")
    p.add_argument("--guidance", type=_non_negative_float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of item i is seed+i unless the item sets one")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype; auto: float32 for tiny and on CPU, bfloat16 on GPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: this process's GPU, else CPU)")
    p.add_argument("--out", default="diffattn-out", help="output folder (default: ./diffattn-out)")
    p.add_argument("--compare", choices=["dense"], help="also generate dense from the same seed: speedup, PSNR, SSIM")
    p.add_argument("--save-dense", action="store_true", help="with --compare dense, also write <index>-<slug>.dense.mp4")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out (same method, config and sizes): skip items already "
                       "in report.jsonl whose video exists")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its videos, report and summary are deleted first)")
    p.add_argument("--fps", type=_positive_int, default=8, help="frame rate of the mp4 files (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_generate)


def _run_generate(args, parser) -> int:
    from .pipelines.generate import GenerateOptions, OutputFolderError, parse_config, run

    try:
        opts = GenerateOptions(
            model=args.model, method=args.method, config=parse_config(args.config),
            prompts=args.prompts if args.prompts is not None else args.prompt,
            frames=args.frames, height=args.height, width=args.width, steps=args.steps,
            guidance=args.guidance, negative_prompt=args.negative_prompt, seed=args.seed,
            dtype=args.dtype, device=args.device, out=args.out, compare=args.compare,
            resume=args.resume, overwrite=args.overwrite, fps=args.fps, save_dense=args.save_dense, progress=not args.no_progress,
        )
        opts.validate()
        if args.prompts is not None:
            opts.items()  # a missing or unreadable prompt file is an argument error
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.save_dense and args.compare != "dense":
        parser.error("--save-dense needs --compare dense")
    try:
        return run(opts)
    except OutputFolderError as e:  # a refused folder is a plain message, not a traceback
        print(f"diffattn generate: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    from .apps.demo import add_arguments

    p = sub.add_parser("demo", help="Gradio demo: dense vs sparse side by side (on 127.0.0.1)",
                       description='Serve the Gradio demo, on 127.0.0.1 unless --host says otherwise '
                       '(needs: pip install "diffattn[demo]").')
    add_arguments(p)
    p.set_defaults(handler=_run_demo)


def _run_demo(args, parser) -> int:
    from .apps.demo import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------------------------------------- bench
_BENCHES = {
    "kernel": "block-sparse kernel vs SDPA flash / FlexAttention / xformers (JSON rows)",
    "cpu": "CPU: dense SDPA vs compiled FlexAttention vs diffattn, random and method layouts (JSON rows)",
    "e2e": "real-size denoisers (random weights) over full schedules, every method",
    "quality": "error and recall vs density on synthetic DiT-like attention",
    "unet": "SD 1.5-shaped UNet: dense vs agent attention vs ToMe",
    "gpu": "the GPU check in ~6 min: kernel correctness per config, timings, one model step (--smoke: CPU)",
    "tiny": "embedded tiny video model: PSNR/SSIM of every video method vs dense",
    "report": "plots and the README results section from benchmarks/results/*.jsonl",
    "all": "every benchmark this machine can run, then the report",
}


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(_BENCHES),
        description="Run a benchmark; arguments after its name go to it (e.g. `diffattn bench e2e --help`).\n"
        + "\n".join(f"  {k:8s} {v}" for k, v in _BENCHES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=sorted(_BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_bench)


def _run_bench(args, parser) -> int:
    import importlib

    result = importlib.import_module(f"diffattn.bench.{args.which}").main(args.args)
    return result if isinstance(result, int) else 0


# ----------------------------------------------------------------------------------------------- draw
def _drawings() -> dict:
    """Every registered method that declares a drawing: name -> :class:`~diffattn.methods.Drawing`."""
    from .methods import describe, method_names

    return {n: describe(n).drawing for n in method_names() if describe(n).drawing is not None}


def _add_draw(sub) -> None:
    drawings = _drawings()
    p = sub.add_parser(
        "draw",
        help="draw a method's attention pattern to an image: " + ", ".join(drawings),
        description="Draw an attention pattern; arguments after its name go to it "
        "(e.g. `diffattn draw radial --help`).\n"
        + "\n".join(f"  {k:8s} {d.what}" for k, d in drawings.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=sorted(drawings))
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_draw)


def _draw_out_problem(out: str) -> str | None:
    """Why ``--out`` cannot take the image (folder missing, type unknown to matplotlib), or None."""
    import os

    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(out)[1].lower().lstrip(".")
    if suffix not in kinds:
        shown = ", ".join("." + k for k in ("png", "pdf", "svg", "jpg") if k in kinds)
        return f"--out {out!r}: {'.' + suffix if suffix else 'no file extension'} is not an image type; use {shown}"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        return f"--out {out!r}: the folder {folder!r} does not exist"
    return None


def _run_draw(args, parser) -> int:
    import importlib

    prog = f"diffattn draw {args.which}"
    if not {"-h", "--help"} & set(args.args):
        from ._extras import need

        need("matplotlib", "plot", "drawing a pattern")  # before any pattern is computed
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--out")
        out = pre.parse_known_args(args.args)[0].out
        problem = out and _draw_out_problem(out)
        if problem:
            print(f"{prog}: {problem}", file=sys.stderr)
            return 2
    module = importlib.import_module(f"diffattn.patterns.{_drawings()[args.which].module}")
    try:
        module.main(args.args, prog=prog)
    except OSError as e:  # e.g. no permission to write there: one line, not matplotlib's traceback
        print(f"{prog}: cannot write the image: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="diffattn", description="Sparse and editable attention for Diffusers video/image models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_methods(sub)
    _add_generate(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_draw(sub)
    return parser, sub.choices


def main(argv: list[str] | None = None) -> int:
    from ._extras import MissingExtra

    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, subparsers[args.command])
    except MissingExtra as e:  # one line naming the extra, not a traceback
        print(f"diffattn {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
