"""Gradio demo: one prompt rendered with dense and with sparse attention, side by side.

``diffattn demo`` (or ``python demo/app.py``) starts it on ``127.0.0.1`` (``--host``/``--port``, or
Gradio's ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, choose another address). A generation runs the model
twice with the same seed — once with its own attention, once with the chosen method installed through
:func:`diffattn.apply` — and shows both videos, the wall time of each and the speedup, PSNR/SSIM of
the sparse video against the dense one, per-layer density and recall, and heatmaps of the block masks
the method actually computed (any layer, head and step).

The parts are usable without a browser (the tests call them directly), one module each:

* ``controls``: :func:`method_fields` turns a method's config dataclass into control descriptions
  (type, default, the "Attributes:" text of its docstring); :func:`parse_controls` parses control
  values back and builds the config with :func:`diffattn.make_config`, so the config's own validation
  produces the error messages.
* ``limits``: :class:`Limits` says which frame counts, sizes and step counts the loaded model accepts.
* ``runner``: :class:`DemoRunner` owns the pipeline, the temporary folder and the run lock; its
  :meth:`DemoRunner.generate` runs both videos through :class:`diffattn.pipelines.compare.Comparer`
  (same seed, synchronised timing, metrics) and returns a :class:`RunResult`; :func:`render_mask`
  draws one block mask with :func:`diffattn.patterns.plot.save_masks`.
* ``ui``: :func:`build_app` wires them into a ``gr.Blocks``; ``serve``: :func:`launch` loads a model
  and serves it. The command line (:func:`add_arguments`, :func:`run_from_args`) is here.

Nothing typed in the browser names a file: the model is chosen at launch, and free-text config fields
(such as PARO's calibration file) are not offered. Every file the demo writes lives in one temporary
folder that is removed on shutdown; a failed or cancelled run removes its own files at once.

>>> from diffattn.apps.demo import launch  # doctest: +SKIP
>>> launch("tiny", port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

from .controls import FieldSpec, demo_methods, field_docs, method_fields, parse_controls
from .limits import Limits, limits_for
from .runner import DEFAULT_PROMPT, Cancelled, DemoRunner, GenerationRequest, RunResult, render_mask
from .serve import PortInUse, _is_loopback, check_port, launch, resolve_address
from .ui import TINY_PRESETS, build_app

__all__ = [
    "FieldSpec",
    "field_docs",
    "method_fields",
    "parse_controls",
    "demo_methods",
    "Limits",
    "limits_for",
    "GenerationRequest",
    "RunResult",
    "Cancelled",
    "DemoRunner",
    "render_mask",
    "build_app",
    "launch",
    "check_port",
    "resolve_address",
    "PortInUse",
    "DEFAULT_PROMPT",
    "TINY_PRESETS",
    "add_arguments",
    "run_from_args",
    "main",
]


# ---------------------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """The demo's command-line options (shared by ``diffattn demo`` and ``python demo/app.py``)."""
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (embedded, default), a local Diffusers folder or a hub id")
    parser.add_argument("--port", type=int,
                        help="port (0: any free port; default $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--host",
                        help="address to listen on (default $GRADIO_SERVER_NAME, else 127.0.0.1: this machine only; "
                        "0.0.0.0 opens the demo to the network)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available, else CPU)")
    parser.add_argument("--concurrency", type=int, default=1, help="generations running at once (default 1)")
    parser.add_argument("--max-queue", type=int, default=16, help="waiting requests before new ones are refused")
    parser.add_argument("--max-tokens", type=int,
                        help="most video tokens per generation (default: 16384 for tiny, no cap otherwise)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in a browser")


def run_from_args(args) -> int:
    """Serve the demo with parsed :func:`add_arguments` options until interrupted."""
    import sys

    from ..._extras import need

    need("gradio", "demo")  # before the model loads
    host, port = resolve_address(args.port, args.host)
    if not _is_loopback(host):
        print(f"warning: serving on {host}: anyone who can reach this machine can use the demo and its "
              "compute; use --host 127.0.0.1 to keep it local", file=sys.stderr)
    for name in ("concurrency", "max_queue"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit(f"--max-tokens must be positive, got {args.max_tokens}")
    try:
        launch(args.model, port=port, host=host, concurrency=args.concurrency, max_queue=args.max_queue,
               device=args.device, max_tokens=args.max_tokens, inbrowser=args.inbrowser)
    except PortInUse as e:
        raise SystemExit(f"diffattn demo: {e}") from None
    except KeyboardInterrupt:  # stopped while starting; launch has already cleaned up
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="diffattn demo", description="Gradio demo: dense vs sparse attention side by side (on 127.0.0.1 by default)."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
