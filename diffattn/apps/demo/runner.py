"""Demo generations: one request rendered densely and with the chosen method, its videos, metrics and
block masks, on one pipeline inside one temporary folder."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...methods import MethodConfig
from ...patterns.plot import save_masks
from ...processors.sparse import DEFAULT_MIN_TOKENS
from .controls import demo_methods, parse_controls
from .limits import Limits, _whole, limits_for

__all__ = ["DEFAULT_PROMPT", "GenerationRequest", "RunResult", "Cancelled", "DemoRunner", "render_mask"]

DEFAULT_PROMPT = "a red circle moving left on a blue background"
# Frames of kept dense generations, at most (a Wan 480p video of 81 frames is ~0.4 GB of float32).
DENSE_CACHE_BYTES = 1 << 30


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
        dense_reused: the dense side is an earlier run of the same prompt, seed and size (kept by the
            runner), not generated again for this request.
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
    dense_reused: bool = False

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
            "dense_reused": self.dense_reused,
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
        earlier = " (earlier run, same prompt, seed and size)" if self.dense_reused else ""
        return (
            f"| | dense | {self.method} |\n|---|---|---|\n"
            f"| wall time | {self.dense_s:.2f} s{earlier} | {self.sparse_s:.2f} s |\n\n"
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
        dense_runs: dense generations kept in memory, by prompt, seed and size, so trying another
            method (or other settings) on the same video does not generate the dense one again; at
            most :data:`DENSE_CACHE_BYTES` of frames (the newest is always kept). 0 keeps none. The
            process's first dense generation is not kept: its time includes one-off start-up costs
            (allocator growth, kernel builds) that would inflate every later speed-up against it.
    """

    def __init__(
        self,
        pipe: Any,
        model_name: str = "tiny",
        limits: Limits | None = None,
        min_tokens: int | None = None,
        keep_runs: int = 8,
        dense_runs: int = 4,
    ) -> None:
        from ...pipelines.compare import Comparer
        from ...pipelines.tiny import TinyVideoPipeline

        self.pipe = pipe
        self.model_name = model_name
        self.is_tiny = isinstance(pipe, TinyVideoPipeline)
        self.limits = limits or limits_for(pipe)
        self.min_tokens = (0 if self.is_tiny else DEFAULT_MIN_TOKENS) if min_tokens is None else min_tokens
        self.keep_runs = keep_runs
        self.dense_runs = dense_runs
        self._dense: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._dense_runs_done = 0
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
        self.comparer = Comparer(pipe)

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
        config = parse_controls(method, values)
        seed = _whole("seed", seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed} must be between 0 and 2**63 - 1")
        frames, height, width, steps = self.limits.check(frames, height, width, steps)
        return GenerationRequest(prompt.strip(), config, seed, frames, height, width, steps)

    # ----------------------------------------------------------------------------- generation
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
        from ...pipelines.compare import quality
        from ...pipelines.video_io import write_video

        run_dir = self.root / f"run-{uuid.uuid4().hex[:12]}"
        run_dir.mkdir()
        done = False
        call = dict(num_frames=req.frames, height=req.height, width=req.width, num_inference_steps=req.steps)
        key = (req.prompt, req.seed, req.frames, req.height, req.width, req.steps)

        def reporter(phase: int, phases: int, label: str) -> Callable[[int], None]:
            def report(i: int) -> None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")
                if progress is not None:
                    progress((phase * req.steps + i) / (phases * req.steps), f"{label}: step {i}/{req.steps}")

            return report

        try:
            with self._lock:
                dense = self._dense.get(key)
                reused = dense is not None
                phases = 1 if reused else 2
                if reused:
                    self._dense.move_to_end(key)
                    reporter(0, phases, req.config.method)(0)
                else:
                    reporter(0, phases, "dense")(0)
                    self.comparer.restore()
                    dense = self.comparer.sample(req.prompt, req.seed, on_step=reporter(0, phases, "dense"), **call)
                    self._remember_dense(key, dense)
                try:
                    self.comparer.use(req.config, min_tokens=self.min_tokens, capture_layouts=True)
                    sparse = self.comparer.sample(req.prompt, req.seed,
                                                  on_step=reporter(phases - 1, phases, req.config.method), **call)
                finally:
                    self.comparer.restore()
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            dense_path = write_video(run_dir / "dense.mp4", dense.frames)
            sparse_path = write_video(run_dir / f"{req.config.method}.mp4", sparse.frames)
            masks, layers = _collect_masks(sparse.rows)
            q = quality(sparse.frames, dense.frames, lpips=False)
            result = RunResult(
                dir=run_dir, dense_video=dense_path, sparse_video=sparse_path, dense_frames=dense.frames,
                sparse_frames=sparse.frames, dense_s=dense.seconds["total"], sparse_s=sparse.seconds["total"],
                psnr=q["psnr"], ssim=float("nan") if q["ssim"] is None else q["ssim"],
                method=req.config.method, summary=sparse.summary, masks=masks, layers=layers,
                steps=list(range(req.steps)), num_heads=self.num_heads, dense_reused=reused,
            )
            done = True
        finally:
            if not done:
                shutil.rmtree(run_dir, ignore_errors=True)
        self._keep(result)
        return result

    def _remember_dense(self, key: tuple[Any, ...], sample: Any) -> None:
        self._dense_runs_done += 1
        if self.dense_runs < 1 or self._dense_runs_done == 1:
            return
        self._dense[key] = sample
        while len(self._dense) > 1 and (
            len(self._dense) > self.dense_runs
            or sum(s.frames.nbytes for s in self._dense.values()) > DENSE_CACHE_BYTES
        ):
            self._dense.popitem(last=False)

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
        self._dense.clear()
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
