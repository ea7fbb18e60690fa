"""Serving the demo: loading the model, the address and port checks, and a clean shutdown."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from .limits import limits_for
from .runner import DemoRunner
from .ui import build_app

__all__ = ["launch", "check_port", "resolve_address", "PortInUse"]


def launch(
    model: str | os.PathLike = "tiny",
    *,
    port: int = 7860,
    host: str = "127.0.0.1",
    concurrency: int = 1,
    max_queue: int = 16,
    device: str | None = None,
    max_tokens: int | None = None,
    inbrowser: bool = False,
    block: bool = True,
    pipe: Any = None,
    result_ttl: int = 1800,
):
    """Load ``model`` (``"tiny"``, a local Diffusers folder or a hub id) and serve the demo.

    Args:
        model: what to load (ignored when ``pipe`` is given).
        port: TCP port (0: a free one); a port in use raises :class:`PortInUse` before the model loads.
        host: address to listen on (default loopback only; ``0.0.0.0`` serves every interface).
        concurrency: generations running at once (they share one pipeline, so more only queues
            the preparation); max_queue: waiting requests beyond which new ones are refused.
        device: where the model runs (default: CUDA when available, else CPU).
        max_tokens: most video tokens per generation (default: 16384 for the tiny model, no cap otherwise).
        inbrowser: open a browser tab.
        result_ttl: seconds a session's result files are kept (see :func:`build_app`).
        block: serve until interrupted, then clean up; False returns ``app`` with the server running
            (``app.local_url``; stop with ``app.close()`` then ``app.diffattn_runner.close()``).
    """
    port = port or _free_port(host)
    check_port(host, port)
    if pipe is None:
        from ...pipelines.tiny import load_pipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") and os.fspath(model) != "tiny" else None
        pipe = load_pipeline(model, dtype=dtype, device=device)
    lim = limits_for(pipe, max_tokens=max_tokens)
    app = build_app(pipe, os.fspath(model), concurrency=concurrency, max_queue=max_queue, limits=lim,
                    result_ttl=result_ttl)
    runner: DemoRunner = app.diffattn_runner  # type: ignore[attr-defined]
    if block and threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) stops the server like Ctrl-C does, so the cleanup below runs
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        import gradio as gr

        theme = gr.themes.Default(
            font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        )  # system fonts: the page must not fetch web fonts (offline machines)
        app.launch(
            server_name=host, server_port=port, share=False, inbrowser=inbrowser,
            prevent_thread_lock=not block, show_error=True, quiet=not block, ssr_mode=False,
            allowed_paths=[str(runner.root)], theme=theme, footer_links=["api"],
        )
    except BaseException:
        runner.close()
        raise
    if block:
        runner.close()
    return app


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class PortInUse(OSError):
    """The demo's port is taken; the message names ``--port``."""


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Raise :class:`PortInUse` when ``host:port`` cannot be listened on (checked before the model loads,
    so a taken port costs a second, not a model load)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will; TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(f"cannot serve on {host}:{port} ({e.strerror}): choose another port with "
                            f"--port (0 picks a free one)") from None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_address(port: int | None, host: str | None) -> tuple[str, int]:
    """``--host``/``--port``, else Gradio's ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, else
    127.0.0.1:7860."""
    if host is None:
        host = os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        text = os.environ.get("GRADIO_SERVER_PORT")
        try:
            port = int(text) if text else 7860
        except ValueError:
            raise SystemExit(f"GRADIO_SERVER_PORT={text!r} is not a port number; set it to one or use --port") from None
    if not 0 <= port <= 65535:
        raise SystemExit(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    return host, port
