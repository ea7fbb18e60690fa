"""Gradio demo: one prompt rendered with dense and with sparse attention, side by side.

``diffattn demo`` (or ``python demo/app.py``) starts it on ``127.0.0.1`` (``--host``/``--port``, or
Gradio's ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, choose another address). A generation runs the model
twice with the same seed — once with its own attention, once with the chosen method installed through
:func:`diffattn.apply` — and shows both videos, the wall time of each and the speedup, PSNR/SSIM of
the sparse video against the dense one, per-layer density and recall, and heatmaps of the block masks
the method actually computed (any layer, head and step).

The parts are usable without a browser (the tests call them directly):

* :func:`method_fields` turns a method's config dataclass into control descriptions (type, default,
  the "Attributes:" text of its docstring); :func:`make_config` parses control values back through the
  config class, so its own validation produces the error messages.
* :class:`Limits` says which frame counts, sizes and step counts the loaded model accepts.
* :class:`DemoRunner` owns the pipeline, the temporary folder and the run lock; :meth:`DemoRunner.generate`
  returns a :class:`RunResult`; :func:`render_mask` draws one block mask with
  :func:`diffattn.patterns.plot.save_masks`.
* :func:`build_app` wires them into a ``gr.Blocks``; :func:`launch` loads a model and serves it.

Nothing typed in the browser names a file: the model is chosen at launch, and free-text config fields
(such as PARO's calibration file) are not offered. Every file the demo writes lives in one temporary
folder that is removed on shutdown; a failed or cancelled run removes its own files at once.

>>> from diffattn.apps.demo import launch  # doctest: +SKIP
>>> launch("tiny", port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import dataclasses
import inspect
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import types
import typing
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

import numpy as np
import torch

from ..methods import MethodConfig, VideoSparseMethod, get_method_class, method_names
from ..patterns.plot import save_masks
from ..processors import apply, remove, stats
from ..processors.sparse import DEFAULT_MIN_TOKENS

__all__ = [
    "FieldSpec",
    "method_fields",
    "make_config",
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
]

DEFAULT_PROMPT = "a red circle moving left on a blue background"

# Settings offered for the embedded tiny model. "CPU speed-up" is the measured setting where attention
# dominates the run on a CPU (16,384 video tokens), so the sparse video comes out faster than dense
# there too (README, "Demo").
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "quick look": {"method": "radial", "frames": 9, "height": 64, "width": 64, "steps": 10},
    "CPU speed-up": {"method": "gna", "frames": 32, "height": 64, "width": 128, "steps": 10},
}


# ------------------------------------------------------------------------------------ config controls
@dataclass(frozen=True)
class FieldSpec:
    """One config field as the demo offers it.

    Attributes:
        name: the dataclass field name.
        kind: ``"bool"`` (checkbox), ``"choice"`` (dropdown over ``choices``), ``"int"``, ``"float"``
            (number boxes), ``"tuple"`` (comma-separated text) or ``"optional_int"`` (text; empty = None).
        default: the config class's default, as the control shows it.
        info: the field's description from the config docstring's "Attributes:" section.
        choices: allowed values of a ``"choice"`` field.
    """

    name: str
    kind: str
    default: Any
    info: str
    choices: tuple[Any, ...] = ()


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the "Attributes:" section of ``cls``'s docstring."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    inside, current, indent0 = False, [], None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        head = re.match(r"([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(.*)", stripped)
        if indent0 is None:
            indent0 = indent
        if indent == indent0 and head:
            current = [n.strip() for n in head.group(1).split(",")]
            for n in current:
                docs[n] = head.group(2)
        elif current and indent > indent0:
            for n in current:
                docs[n] = f"{docs[n]} {stripped}"
    return {k: v.replace("``", "").strip() for k, v in docs.items()}


def _field_kind(tp: Any) -> tuple[str | None, tuple[Any, ...]]:
    origin = get_origin(tp)
    if tp is bool:
        return "bool", ()
    if tp is int:
        return "int", ()
    if tp is float:
        return "float", ()
    if origin is Literal:
        return "choice", tuple(get_args(tp))
    if origin is tuple:
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if args and all(a in (int, float, bool, str) for a in args):
            return "tuple", ()
        return None, ()
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1 and arms[0] is int and len(get_args(tp)) == 2:
            return "optional_int", ()
    # Free-form strings are left out on purpose: they can name files (e.g. PARO's calibration).
    return None, ()


def _display_default(kind: str, value: Any) -> Any:
    if kind == "tuple":
        return ", ".join(str(v) for v in value)
    if kind == "optional_int":
        return "" if value is None else str(value)
    return value


def method_fields(method: str) -> tuple[list[FieldSpec], list[str]]:
    """The controls of ``method``'s config: ``(fields shown, names of fields left out)``.

    Fields whose type the demo cannot offer safely (free-form strings, which may be file paths) are
    left out and keep their defaults.
    """
    cls = get_method_class(method).config_cls
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    shown, hidden = [], []
    for f in dataclasses.fields(cls):
        kind, choices = _field_kind(hints[f.name])
        if kind is None:
            hidden.append(f.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown.append(FieldSpec(f.name, kind, _display_default(kind, default), docs.get(f.name, ""), choices))
    return shown, hidden


def _parse_scalar(text: str, tp: Any, name: str) -> Any:
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}: {text!r} is not true/false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a number") from None
    return text


def _parse_value(spec: FieldSpec, tp: Any, value: Any) -> Any:
    name = spec.name
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        return _parse_scalar(str(value).strip(), bool, name)
    if spec.kind == "choice":
        return value
    if spec.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{name} is empty; enter a number (default {spec.default})")
        if isinstance(value, str):
            value = _parse_scalar(value.strip(), float, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not a finite number (default {spec.default})")
        if spec.kind == "int":
            if float(value) != int(value):
                raise ValueError(f"{name}={value!r} must be a whole number (default {spec.default})")
            return int(value)
        return float(value)
    if spec.kind == "optional_int":
        text = "" if value is None else str(value).strip()
        if text.lower() in ("", "none"):
            return None
        return _parse_scalar(text, int, name)
    if spec.kind == "tuple":
        if isinstance(value, (list, tuple)):
            items = [str(v).strip() for v in value]
        else:
            items = [t.strip() for t in str(value or "").replace("(", "").replace(")", "").split(",")]
            items = [t for t in items if t]
        args = [a for a in get_args(tp) if a is not Ellipsis]
        fixed = Ellipsis not in get_args(tp)
        if fixed and len(items) != len(args):
            raise ValueError(
                f"{name}={value!r} needs {len(args)} comma-separated values, e.g. {spec.default!r}"
            )
        types_ = args if fixed else [args[0]] * len(items)
        return tuple(_parse_scalar(t, a, name) for t, a in zip(items, types_))
    raise ValueError(f"{name}: unsupported control kind {spec.kind!r}")


def make_config(method: str, values: dict[str, Any]) -> MethodConfig:
    """Parse control ``values`` (``{field: value}``; missing fields keep defaults) into the config.

    Raises:
        ValueError: an unknown method or field, or a value the control or the config class rejects;
            the message names the method, the field and the fix.
    """
    if method not in method_names():
        raise ValueError(f"method={method!r} is unknown; choose one of {method_names()}")
    cls = get_method_class(method).config_cls
    hints = typing.get_type_hints(cls)
    specs = {s.name: s for s in method_fields(method)[0]}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(f"{method}: no settable field(s) {unknown}; fields: {sorted(specs)}")
    parsed = {name: _parse_value(specs[name], hints[name], v) for name, v in values.items()}
    try:
        return cls(**parsed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{method}: {e}") from None


def demo_methods() -> list[str]:
    """Methods a video generation can compare against dense: the sparse video methods."""
    return [n for n in method_names() if issubclass(get_method_class(n), VideoSparseMethod)]


# ---------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """Frame counts, sizes and step counts a loaded model accepts in the demo.

    Attributes:
        size_multiple: height and width must be multiples of this (VAE downsampling x patch size).
        min_size, max_size: height/width range in pixels.
        frame_step: ``num_frames - 1`` must be a multiple of this (the VAE's temporal factor).
        max_frames: most frames per video.
        max_steps: most denoising steps.
        token_stride: pixels (frames, rows, columns) per video token, to count tokens.
        max_tokens: most video tokens per generation (None: no cap).
    """

    size_multiple: int = 4
    min_size: int = 16
    max_size: int = 128
    frame_step: int = 1
    max_frames: int = 33
    max_steps: int = 50
    token_stride: tuple[int, int, int] = (1, 4, 4)
    max_tokens: int | None = 16384

    def tokens(self, frames: int, height: int, width: int) -> int:
        tf, th, tw = self.token_stride
        return ((frames - 1) // tf + 1) * (height // th) * (width // tw)

    def check(self, frames: Any, height: Any, width: Any, steps: Any) -> tuple[int, int, int, int]:
        """Validated ``(frames, height, width, steps)`` as ints; ``ValueError`` says what is allowed."""
        frames = _whole("frames", frames)
        height, width = _whole("height", height), _whole("width", width)
        steps = _whole("steps", steps)
        for name, v in (("height", height), ("width", width)):
            if v % self.size_multiple or not self.min_size <= v <= self.max_size:
                raise ValueError(
                    f"{name}={v} is not possible for this model: use a multiple of {self.size_multiple} "
                    f"between {self.min_size} and {self.max_size}"
                )
        if not 1 <= frames <= self.max_frames or (frames - 1) % self.frame_step:
            rule = "" if self.frame_step == 1 else f" with frames - 1 a multiple of {self.frame_step}"
            raise ValueError(f"frames={frames} is not possible: use 1 to {self.max_frames} frames{rule}")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps={steps} is not possible: use 1 to {self.max_steps} steps")
        n = self.tokens(frames, height, width)
        if self.max_tokens is not None and n > self.max_tokens:
            raise ValueError(
                f"{frames} frames of {height}x{width} px are {n} video tokens, more than this demo's limit "
                f"of {self.max_tokens}; use fewer frames or a smaller size"
            )
        return frames, height, width, steps


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a whole number")
    if float(value) != int(value):
        raise ValueError(f"{name}={value!r} must be a whole number")
    return int(value)


def limits_for(pipe: Any, max_tokens: int | None = None) -> Limits:
    """Limits of ``pipe``: the embedded tiny model's, or those implied by a Diffusers video pipeline."""
    from ..pipelines.tiny import TinyVideoPipeline

    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None) or (1, 2, 2)
    if isinstance(patch, int):
        patch = (1, patch, patch)
    pt, ph, pw = (tuple(patch) + (1, 1, 1))[:3] if len(patch) == 3 else (1, patch[0], patch[-1])
    if isinstance(pipe, TinyVideoPipeline):
        # 16,384 tokens: room for the CPU speed-up preset, a couple of minutes a run on two cores.
        return Limits(
            size_multiple=max(ph, pw), token_stride=(pt, ph, pw),
            max_tokens=16384 if max_tokens is None else max_tokens,
        )
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", 8)) or 8)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
    mult = spatial * max(ph, pw)
    return Limits(
        size_multiple=mult, min_size=max(mult, 64), max_size=1280, frame_step=temporal,
        max_frames=1 + temporal * 32, max_steps=100, token_stride=(temporal * pt, spatial * ph, spatial * pw),
        max_tokens=max_tokens,
    )


# ---------------------------------------------------------------------------------------- runs
class Cancelled(Exception):
    """A generation was cancelled; everything it had written is gone."""


@dataclass(frozen=True)
class GenerationRequest:
    """One demo generation (validated)."""

    prompt: str
    config: MethodConfig
    seed: int
    frames: int
    height: int
    width: int
    steps: int


@dataclass
class RunResult:
    """What one generation produced.

    Attributes:
        dir: folder holding the two videos (removed by :meth:`cleanup`).
        dense_video, sparse_video: mp4 paths.
        dense_frames, sparse_frames: float ``[F, H, W, 3]`` in [0, 1] (the app drops them once shown).
        dense_s, sparse_s: wall time of each generation in seconds.
        psnr, ssim: sparse against dense.
        summary: :meth:`diffattn.Stats.summary` of the sparse run.
        masks: ``{(layer, step): bool [B|1, H|1, Mq, Mk]}`` of the conditional branch; identical masks
            are stored once.
        layers: every patched layer, in call order; steps: every step of the run.
        num_heads: attention heads of the model.
    """

    dir: Path
    dense_video: Path
    sparse_video: Path
    dense_frames: np.ndarray | None
    sparse_frames: np.ndarray | None
    dense_s: float
    sparse_s: float
    psnr: float
    ssim: float
    method: str
    summary: dict[str, Any]
    masks: dict[tuple[str, int], torch.Tensor]
    layers: list[str]
    steps: list[int]
    num_heads: int

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else math.inf

    def metrics(self) -> dict[str, Any]:
        """JSON-safe numbers (``inf`` as the string ``"inf"``)."""

        def num(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        return {
            "method": self.method,
            "dense_s": num(self.dense_s),
            "sparse_s": num(self.sparse_s),
            "speedup": num(self.speedup),
            "psnr": num(self.psnr),
            "ssim": num(self.ssim),
            "density": self.summary.get("density"),
        }

    def table(self) -> list[list[str]]:
        """Per-layer rows: layer, calls, mean density, mean recall, searches, cache hits, attention ms."""

        def fmt(x: Any, nd: int = 3) -> str:
            return "n/a" if x is None else f"{x:.{nd}f}"

        rows = []
        for name in self.layers:
            d = self.summary["layers"].get(name)
            if d is None:
                continue
            rows.append([name, str(d["calls"]), fmt(d["density"]), fmt(d["recall"]), str(d["searches"]),
                         str(d["cache_hits"]), fmt(d["time_ms"], 1)])
        return rows

    def markdown(self) -> str:
        psnr = "∞ (identical)" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"
        dens = self.summary.get("density")
        dens_s = "n/a" if dens is None else f"{dens:.3f}"
        return (
            f"| | dense | {self.method} |\n|---|---|---|\n"
            f"| wall time | {self.dense_s:.2f} s | {self.sparse_s:.2f} s |\n\n"
            f"**speedup {self.speedup:.2f}×** · PSNR {psnr} · SSIM {self.ssim:.4f} · "
            f"mean attention density {dens_s}"
        )

    def mask(self, layer: str, step: int, head: int) -> torch.Tensor | None:
        """Block mask ``[Mq, Mk]`` of ``layer`` at ``step`` for ``head`` (None: that call ran dense)."""
        m = self.masks.get((layer, step))
        if m is None:
            return None
        m = m[0] if m.ndim == 4 else m
        m = m[min(head, m.shape[0] - 1)] if m.ndim == 3 else m
        return m

    def mask_steps(self) -> list[int]:
        return sorted({s for (_, s) in self.masks})

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def render_mask(result: RunResult, layer: str, head: int, step: int, out_dir: str | os.PathLike) -> np.ndarray:
    """The heatmap of one block mask as an RGB uint8 image ``[H, W, 3]`` (drawn by ``save_masks``).

    A call that ran dense (warm-up step or dense layer) is drawn as a full mask of the same size.
    """
    from PIL import Image

    if layer not in result.layers:
        raise ValueError(f"layer={layer!r} is not in this run; choose one of {result.layers}")
    if not 0 <= int(head) < result.num_heads:
        raise ValueError(f"head={head!r}: choose 0 to {result.num_heads - 1}")
    if int(step) not in result.steps:
        raise ValueError(f"step={step!r} is not in this run; choose one of {result.steps}")
    head, step = int(head), int(step)
    mask = result.mask(layer, step, head)
    title = f"{layer} · head {head} · step {step} (query blocks x key blocks)"
    if mask is None:
        like = next((m for (l, _), m in result.masks.items() if l == layer), None)
        like = like if like is not None else next(iter(result.masks.values()), None)
        size = like.shape[-2:] if like is not None else (1, 1)
        mask = torch.ones(*size, dtype=torch.bool)
        title = f"{layer} · head {head} · step {step}: ran dense"
    fd, path = tempfile.mkstemp(suffix=".png", dir=os.fspath(out_dir))
    os.close(fd)
    try:
        save_masks([(title, mask)], path, dpi=100)
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    finally:
        os.unlink(path)


class DemoRunner:
    """Runs demo generations on one pipeline, one at a time, inside one temporary folder.

    Args:
        pipe: a Diffusers video pipeline (the tiny one, Wan, ...), already on its device.
        model_name: shown in the page title.
        limits: what the UI accepts (default :func:`limits_for`).
        min_tokens: sequences shorter than this keep the model's attention (default 0 for the tiny model,
            else diffattn's default).
        keep_runs: results kept on disk at once; older ones are removed (sessions that never come
            back cannot fill the disk).
    """

    def __init__(
        self,
        pipe: Any,
        model_name: str = "tiny",
        limits: Limits | None = None,
        min_tokens: int | None = None,
        keep_runs: int = 8,
    ) -> None:
        from ..pipelines.tiny import TinyVideoPipeline

        self.pipe = pipe
        self.model_name = model_name
        self.is_tiny = isinstance(pipe, TinyVideoPipeline)
        self.limits = limits or limits_for(pipe)
        self.min_tokens = (0 if self.is_tiny else DEFAULT_MIN_TOKENS) if min_tokens is None else min_tokens
        self.keep_runs = keep_runs
        self.root = Path(tempfile.mkdtemp(prefix="diffattn-demo-"))
        # a process that ends without close() (an exception, Ctrl-C) still removes the folder
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, RunResult] = OrderedDict()
        self._runs_lock = threading.Lock()
        cfg = getattr(getattr(pipe, "transformer", None), "config", None)
        self.num_heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    # ----------------------------------------------------------------------------- requests
    def request(
        self, prompt: Any, method: str, values: dict[str, Any], seed: Any, frames: Any, height: Any,
        width: Any, steps: Any,
    ) -> GenerationRequest:
        """Validate UI values into a :class:`GenerationRequest` (``ValueError`` with the fix)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty; describe a video, e.g. " + repr(DEFAULT_PROMPT))
        if len(prompt) > 1000:
            raise ValueError(f"prompt has {len(prompt)} characters; keep it under 1000")
        if method not in demo_methods():
            raise ValueError(f"method={method!r}: choose one of {demo_methods()}")
        config = make_config(method, values)
        seed = _whole("seed", seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed} must be between 0 and 2**63 - 1")
        frames, height, width, steps = self.limits.check(frames, height, width, steps)
        return GenerationRequest(prompt.strip(), config, seed, frames, height, width, steps)

    # ----------------------------------------------------------------------------- generation
    def _sample(self, req: GenerationRequest, report: Callable[[int], None]) -> tuple[np.ndarray, float]:
        def on_step(pipe, i, t, kwargs):
            report(i + 1)
            return {}

        device = getattr(self.pipe, "_execution_device", torch.device("cpu"))
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = self.pipe(
            prompt=req.prompt, num_frames=req.frames, height=req.height, width=req.width,
            num_inference_steps=req.steps, generator=torch.Generator("cpu").manual_seed(req.seed),
            output_type="np", callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=[],
        )
        sync()
        elapsed = time.perf_counter() - t0
        frames = np.asarray(out.frames[0], dtype=np.float32)
        return frames, elapsed

    def generate(
        self,
        req: GenerationRequest,
        progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> RunResult:
        """Dense run, sparse run, videos, metrics and masks for ``req``.

        ``progress(fraction, text)`` is called after every denoising step; when ``cancel`` is set the
        run stops at the next step and raises :class:`Cancelled`, leaving no files and the pipeline as
        it was.
        """
        from ..pipelines.metrics import psnr, ssim
        from ..pipelines.video_io import write_video

        run_dir = self.root / f"run-{uuid.uuid4().hex[:12]}"
        run_dir.mkdir()
        total = 2 * req.steps
        done = False

        def reporter(phase: int, label: str) -> Callable[[int], None]:
            def report(i: int) -> None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")
                if progress is not None:
                    progress((phase * req.steps + i) / total, f"{label}: step {i}/{req.steps}")

            return report

        try:
            with self._lock:
                reporter(0, "dense")(0)
                dense, dense_s = self._sample(req, reporter(0, "dense"))
                apply(self.pipe, req.config, min_tokens=self.min_tokens, capture_layouts=True)
                try:
                    sparse, sparse_s = self._sample(req, reporter(1, req.config.method))
                    st = stats(self.pipe)
                    summary, rows = st.summary(), list(st.rows)
                finally:
                    remove(self.pipe)
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            dense_path = write_video(run_dir / "dense.mp4", dense)
            sparse_path = write_video(run_dir / f"{req.config.method}.mp4", sparse)
            masks, layers = _collect_masks(rows)
            result = RunResult(
                dir=run_dir, dense_video=dense_path, sparse_video=sparse_path, dense_frames=dense,
                sparse_frames=sparse, dense_s=dense_s, sparse_s=sparse_s, psnr=psnr(sparse, dense),
                ssim=ssim(sparse, dense) if min(req.height, req.width) >= 11 else float("nan"),
                method=req.config.method, summary=summary, masks=masks, layers=layers,
                steps=list(range(req.steps)), num_heads=self.num_heads,
            )
            done = True
        finally:
            if not done:
                shutil.rmtree(run_dir, ignore_errors=True)
        self._keep(result)
        return result

    def _keep(self, result: RunResult) -> None:
        with self._runs_lock:
            self._runs[result.dir.name] = result
            while len(self._runs) > self.keep_runs:
                _, old = self._runs.popitem(last=False)
                old.cleanup()

    def discard(self, result: RunResult | None) -> None:
        """Remove a result's files (a session moved on or ended)."""
        if result is None:
            return
        with self._runs_lock:
            self._runs.pop(result.dir.name, None)
        result.cleanup()

    def close(self) -> None:
        """Remove every file the demo wrote."""
        with self._runs_lock:
            self._runs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _collect_masks(rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], torch.Tensor], list[str]]:
    """Masks of the conditional branch per (layer, step), identical ones shared; layers in call order."""
    layers: list[str] = []
    interned: dict[tuple, torch.Tensor] = {}
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for r in rows:
        if r["layer"] not in layers:
            layers.append(r["layer"])
        m = r.get("block_mask")
        if m is None or r.get("branch", 0) != 0:
            continue
        m = m.to(torch.bool).cpu()
        key = (tuple(m.shape), m.numpy().tobytes())
        masks[(r["layer"], int(r["step"]))] = interned.setdefault(key, m)
    return masks, layers


# ---------------------------------------------------------------------------------------- the app
_GENERAL = ("prompt", "method", "seed", "frames", "height", "width", "steps")


def build_app(
    pipe: Any,
    model_name: str = "tiny",
    *,
    concurrency: int = 1,
    max_queue: int = 16,
    limits: Limits | None = None,
    min_tokens: int | None = None,
    default_method: str = "adaspa",
    defaults: dict[str, Any] | None = None,
    result_ttl: int = 1800,
):
    """The Gradio app around a :class:`DemoRunner` on ``pipe``.

    A session's last result (its videos, kept for the mask views) and Gradio's copies of the files it
    served are removed ``result_ttl`` seconds after they were made, also for clients that never close
    their session (API callers send no heartbeat).

    Returns:
        ``gr.Blocks`` with ``app.diffattn_runner`` (the runner; call ``close()`` after the server stops).
        The generation is also an API endpoint ``/generate`` (inputs: prompt, method, seed, frames,
        height, width, steps, then every method's fields; outputs: dense video, sparse video, summary,
        metrics JSON, per-layer table, mask controls, mask image).
    """
    from .._extras import need

    gr = need("gradio", "demo")

    runner = DemoRunner(pipe, model_name, limits=limits, min_tokens=min_tokens)
    lim = runner.limits
    methods = demo_methods()
    if default_method not in methods:
        raise ValueError(f"default_method={default_method!r}: choose one of {methods}")
    d = {"frames": 9, "height": 64, "width": 64, "steps": 10, "seed": 0, "prompt": DEFAULT_PROMPT}
    if not runner.is_tiny:
        d.update(frames=1 + 4 * lim.frame_step, height=480, width=832, steps=30, prompt="a cat walking on grass")
    d.update(defaults or {})

    controls: list[tuple[str, FieldSpec, Any]] = []
    groups = {}
    if result_ttl < 1:
        raise ValueError(f"result_ttl={result_ttl} must be at least 1 second")
    cache_sweep = (max(1, min(60, result_ttl // 2)), result_ttl)  # (every, older than) in seconds
    with gr.Blocks(title="diffattn demo", analytics_enabled=False, delete_cache=cache_sweep) as app:
        gr.Markdown(
            f"# diffattn: dense vs sparse attention\nModel: `{model_name}` · the same prompt and seed are "
            "generated with the model's own attention and with the chosen method."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="prompt", value=d["prompt"], lines=2, max_length=1000, elem_id="prompt")
                presets = {k: p for k, p in TINY_PRESETS.items() if p["method"] in methods} if runner.is_tiny else {}
                preset = gr.Dropdown(list(presets), value=None, label="preset", elem_id="preset",
                                     visible=bool(presets), info="CPU speed-up: where attention dominates on a CPU")
                method = gr.Dropdown(methods, value=default_method, label="method", elem_id="method")
                for m in methods:
                    specs, hidden = method_fields(m)
                    with gr.Accordion(f"{m} settings", open=False, visible=(m == default_method)) as group:
                        for s in specs:
                            controls.append((m, s, _control(gr, s)))
                        if hidden:
                            gr.Markdown(f"Not settable here (defaults kept): {', '.join(hidden)}")
                    groups[m] = group
                seed = gr.Number(label="seed", value=d["seed"], precision=0, minimum=0, elem_id="seed")
                frames = gr.Slider(1, lim.max_frames, value=d["frames"], step=lim.frame_step, label="frames",
                                   elem_id="frames")
                with gr.Row():
                    height = gr.Slider(lim.min_size, lim.max_size, value=d["height"], step=lim.size_multiple,
                                       label="height", elem_id="height")
                    width = gr.Slider(lim.min_size, lim.max_size, value=d["width"], step=lim.size_multiple,
                                      label="width", elem_id="width")
                steps = gr.Slider(1, lim.max_steps, value=d["steps"], step=1, label="steps", elem_id="steps")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_out = gr.Video(label="dense", format="mp4", autoplay=True, loop=True,
                                         elem_id="dense-video", interactive=False)
                    sparse_out = gr.Video(label="sparse", format="mp4", autoplay=True, loop=True,
                                          elem_id="sparse-video", interactive=False)
                summary_md = gr.Markdown(elem_id="summary")
                metrics_json = gr.JSON(label="metrics", visible=False)
                table = gr.Dataframe(
                    headers=["layer", "calls", "density", "recall", "searches", "cache hits", "attention ms"],
                    label="per layer (sparse run)", interactive=False, wrap=True,
                )
                with gr.Row():
                    layer_dd = gr.Dropdown([], label="layer", interactive=True)
                    head_dd = gr.Dropdown([], label="head", interactive=True)
                    step_dd = gr.Dropdown([], label="step", interactive=True)
                mask_img = gr.Image(label="block mask", type="numpy", format="png", interactive=False,
                                    elem_id="mask-image")
        state = gr.State(None, delete_callback=runner.discard, time_to_live=result_ttl)

        def show_fields(selected: str):
            return [gr.Accordion(visible=(m == selected)) for m in methods]

        method.change(show_fields, method, [groups[m] for m in methods], api_visibility="private")

        def apply_preset(name: str | None):
            if name not in presets:
                return [gr.update()] * 5
            p = presets[name]
            return [gr.update(value=p[key]) for key in ("method", "frames", "height", "width", "steps")]

        preset.input(apply_preset, preset, [method, frames, height, width, steps], api_visibility="private")

        n_general = len(_GENERAL)

        async def on_generate(previous, *values, progress=gr.Progress()):
            general = dict(zip(_GENERAL, values[:n_general]))
            chosen = general["method"]
            fields = {s.name: v for (m, s, _), v in zip(controls, values[n_general:]) if m == chosen}
            try:
                req = runner.request(general["prompt"], chosen, fields, general["seed"], general["frames"],
                                     general["height"], general["width"], general["steps"])
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None
            cancel = threading.Event()
            progress(0.0, desc="starting")
            # Gradio finds the event a progress update belongs to through context variables, which an
            # executor thread does not inherit: run the work inside a copy of this context.
            context = contextvars.copy_context()
            work = asyncio.get_running_loop().run_in_executor(
                None, context.run, lambda: runner.generate(req, lambda f, text: progress(f, desc=text), cancel)
            )
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The worker stops at its next step and removes its files; wait for that so the next run
                # finds the pipeline restored.
                cancel.set()
                await asyncio.wait([work])
                if not work.cancelled() and work.exception() is None:
                    runner.discard(work.result())  # finished just before the cancel: nobody will show it
                raise
            except Cancelled:
                raise gr.Error("cancelled", print_exception=False) from None
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None
            runner.discard(previous)
            # a session keeps its result for the mask views; the decoded frames are not needed any more
            result.dense_frames = result.sparse_frames = None
            return _outputs(gr, runner, result)

        # Named API parameters (``method_field``) instead of positional ones, for gradio_client users.
        params = [inspect.Parameter("previous", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in _GENERAL]
        params += [inspect.Parameter(f"{m}_{s.name}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for m, s, _ in controls]
        params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
        on_generate.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

        outputs = [dense_out, sparse_out, summary_md, metrics_json, table, layer_dd, head_dd, step_dd, mask_img,
                   state]
        gen = run_btn.click(
            on_generate, [state, prompt, method, seed, frames, height, width, steps, *(c for _, _, c in controls)],
            outputs, api_name="generate", concurrency_limit=concurrency, concurrency_id="generate",
        )
        stop_btn.click(None, None, None, cancels=[gen])

        def on_mask(result, layer, head, step):
            if result is None or layer is None or head is None or step is None:
                return None
            try:
                return render_mask(result, layer, int(head), int(step), runner.root)
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None

        for dd in (layer_dd, head_dd, step_dd):
            dd.input(on_mask, [state, layer_dd, head_dd, step_dd], mask_img, api_visibility="private")

    # Gradio copies every returned file into its cache; keep that cache inside the runner's folder so
    # closing the runner removes it too.
    cache = str(runner.root / "gradio")
    for block in (app, *app.blocks.values()):
        block.GRADIO_CACHE = cache
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    app.diffattn_runner = runner  # type: ignore[attr-defined]
    return app


def _control(gr, s: FieldSpec):
    info = s.info or None
    if s.kind == "bool":
        return gr.Checkbox(value=s.default, label=s.name, info=info)
    if s.kind == "choice":
        return gr.Dropdown(list(s.choices), value=s.default, label=s.name, info=info)
    if s.kind == "int":
        return gr.Number(value=s.default, label=s.name, info=info, precision=0)
    if s.kind == "float":
        return gr.Number(value=s.default, label=s.name, info=info)
    placeholder = "empty = None" if s.kind == "optional_int" else "comma-separated"
    return gr.Textbox(value=s.default, label=s.name, info=info, placeholder=placeholder)


def _outputs(gr, runner: DemoRunner, result: RunResult) -> list[Any]:
    mask_steps = result.mask_steps()
    masked_layers = [l for l in result.layers if any((l, s) in result.masks for s in mask_steps)]
    layer = masked_layers[0] if masked_layers else (result.layers[0] if result.layers else None)
    step = mask_steps[-1] if mask_steps else (result.steps[-1] if result.steps else None)
    image = render_mask(result, layer, 0, step, runner.root) if layer is not None and step is not None else None
    return [
        str(result.dense_video),
        str(result.sparse_video),
        result.markdown(),
        result.metrics(),
        result.table(),
        gr.Dropdown(choices=result.layers, value=layer),
        gr.Dropdown(choices=list(range(result.num_heads)), value=0),
        gr.Dropdown(choices=result.steps, value=step),
        image,
        result,
    ]


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
        from ..pipelines.tiny import load_pipeline

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

    from .._extras import need

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
