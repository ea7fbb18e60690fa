"""Dense against a method on one pipeline: the comparison ``diffattn generate``, the demo and
``diffattn bench tiny`` share.

A :class:`Comparer` holds a loaded pipeline and the attention it runs (:meth:`Comparer.use` installs a
method through :func:`diffattn.apply`, or restores the model's own). :meth:`Comparer.sample` runs one
generation from a CPU generator seeded with ``seed`` — the same noise on every device, so the dense and
the method video start alike — and returns a :class:`Sample`: the frames, the method's
:func:`diffattn.stats`, and three timings in seconds, none of which makes the work wait on the host:

* ``total``: the whole pipeline call, by the host clock between two device synchronisations at its
  boundaries (on a CPU no synchronisation is needed);
* ``transformer``: the time inside the denoiser(s)' forward calls — the device time between CUDA
  events on a GPU, the host clock on a CPU;
* ``attention``: the time of the replaced attention calls as :func:`diffattn.stats` records it (CUDA
  events on a GPU, the host clock on a CPU); ``None`` when the model's own attention ran.

:func:`quality` gives PSNR/SSIM(/LPIPS) of a video against the dense one, :func:`environment` the
software versions and device a result row carries.

>>> from diffattn.pipelines.compare import Comparer, quality  # doctest: +SKIP
>>> cmp = Comparer(load_pipeline("tiny"))  # doctest: +SKIP
>>> dense = cmp.sample("a red circle moving left on a blue background", seed=0)  # doctest: +SKIP
>>> cmp.use("radial"); sparse = cmp.sample("a red circle moving left on a blue background", seed=0)  # doctest: +SKIP
>>> quality(sparse.frames, dense.frames)["psnr"], dense.seconds["total"] / sparse.seconds["total"]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import numpy as np
import torch

from ..processors import apply, remove, stats
from ..processors.api import DENOISER_ATTRS
from ..processors.state import Span, synchronize

__all__ = ["Comparer", "Sample", "quality", "environment", "versions", "device_name", "frames_of"]


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that change what a run computes: torch's as it reports
    itself (with its build, e.g. ``+cu124``), the others' from their installed package or, where the
    package has another name (``pytorch-triton``), from the module itself."""
    found = {"python": platform.python_version()}
    for name in ("diffattn", "torch", "diffusers", "transformers", "accelerate", "triton"):
        if name == "torch":
            found[name] = torch.__version__
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = _module_version(name)
            if version is not None:
                found[name] = version
    return found


def _module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # a module that fails to import or has no version: nothing to report
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str) -> dict[str, Any]:
    """``{"device", "versions"}``: what a result row says it was produced with."""
    return {"device": device_name(device), "versions": versions()}


def frames_of(output: Any) -> np.ndarray:
    """First video of a pipeline output as float32 ``[F, H, W, 3]`` in [0, 1]."""
    frames = getattr(output, "frames", None)
    if frames is None:
        frames = getattr(output, "images", None)
    if frames is None and isinstance(output, (tuple, list)):
        frames = output[0]
    if frames is None:
        raise TypeError(f"cannot find frames in the pipeline output {type(output).__name__}")
    first = frames[0]
    if isinstance(first, torch.Tensor):
        first = first.float().cpu().numpy()
    if isinstance(first, list):  # list of PIL images
        first = np.stack([np.asarray(f) for f in first])
    arr = np.asarray(first)
    if arr.ndim == 3:  # one image [H, W, C]
        arr = arr[None]
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):  # [F, C, H, W]
        arr = arr.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(arr[..., :3], dtype=np.float32)


def quality(video: np.ndarray, reference: np.ndarray, lpips: bool = True) -> dict[str, Any]:
    """``{"psnr", "ssim", "lpips", "identical"}`` of ``video`` against ``reference`` (the dense video).

    PSNR is ``inf`` for identical videos; SSIM is ``None`` for frames under its 11 px window; LPIPS is
    ``None`` unless asked for and available offline (:func:`~diffattn.pipelines.metrics.lpips_status`).
    """
    from .metrics import lpips_distance, psnr, ssim

    value = psnr(video, reference)
    small = min(np.shape(video)[-3:-1]) < 11
    return {
        "psnr": value,
        "ssim": None if small else ssim(video, reference),
        "lpips": lpips_distance(video, reference) if lpips else None,
        "identical": value == math.inf,
    }


def denoisers(pipe: Any) -> list[torch.nn.Module]:
    # The modules as the pipeline holds them (a compiled wrapper stays wrapped: a hook on the inner
    # module would be traced into the compiled graph).
    found = [getattr(pipe, n) for n in DENOISER_ATTRS if getattr(pipe, n, None) is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to time")
    return found


class _DenoiserTimer:
    """Time spent inside the denoisers' forward calls, one :class:`Span` per call (forward hooks)."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.spans: list[Span] = []
        self._device = device
        self._open: dict[int, Span] = {}
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        self._open[id(module)] = Span(self._device).__enter__()

    def _post(self, module, args, output) -> None:
        span = self._open.pop(id(module), None)
        if span is not None:
            span.__exit__(None, None, None)
            self.spans.append(span)

    @property
    def seconds(self) -> float:
        return sum(s.ms for s in self.spans) / 1e3

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Sample:
    """One timed generation.

    Attributes:
        frames: float32 ``[F, H, W, 3]`` in [0, 1].
        seconds: ``{"total", "transformer", "attention"}`` (see the module docstring); ``attention`` is
            ``None`` when the model's own attention ran.
        summary: :meth:`diffattn.Stats.summary` of the method's calls (empty for the model's attention).
        rows: the method's per-call :func:`diffattn.stats` rows (block masks when captured).
    """

    frames: np.ndarray
    seconds: dict[str, float | None]
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


class Comparer:
    """Generations on one pipeline with the model's own attention or a method, seeded and timed alike.

    Args:
        pipe: a Diffusers pipeline (the tiny one, Wan, ...), already on its device.
        device: where it runs (default: the pipeline's execution device).
    """

    def __init__(self, pipe: Any, device: torch.device | str | None = None) -> None:
        self.pipe = pipe
        self.device = torch.device(device if device is not None else getattr(pipe, "_execution_device", "cpu"))
        self.denoisers = denoisers(pipe)
        self._installed: str | None = None
        self.config = None

    def environment(self) -> dict[str, Any]:
        return environment(self.device)

    def use(self, method: Any = None, config: dict[str, Any] | None = None, **options: Any) -> Any:
        """Run the next samples with ``method`` (a name or config, ``config`` fields and
        :func:`diffattn.apply` ``options``), or with the model's own attention when ``method`` is None
        or ``"dense"``. Asking again for what is installed keeps it (and its caches). Returns the
        method's config (None for the model's attention)."""
        key = None
        if method is not None and method != "dense":
            name = method if isinstance(method, str) else method.to_json()
            key = json.dumps([name, config or {}, options], sort_keys=True, default=repr)
        if key == self._installed:
            return self.config
        if self._installed is not None:
            remove(self.pipe)
            self._installed = self.config = None
        if key is not None:
            self.config = apply(self.pipe, method, dict(config) if config else None, **options)
            self._installed = key
        return self.config

    def restore(self) -> None:
        """The model's own attention again, exactly as before the first :meth:`use`."""
        self.use(None)

    def sample(self, prompt: str, seed: int, *, on_step: Callable[[int], None] | None = None,
               **call: Any) -> Sample:
        """Generate ``prompt`` from ``seed`` (pipeline keyword arguments in ``call``).

        ``on_step(i)`` runs after every denoising step (``i`` from 1); an exception it raises stops
        the generation and propagates.
        """
        if on_step is not None:
            def on_step_end(pipe, i, t, kwargs):
                on_step(i + 1)
                return {}

            call.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=[])
        if self._installed is not None:
            stats(self.pipe).reset()  # rows of a generation that raised half-way
        generator = torch.Generator("cpu").manual_seed(seed)
        timer = _DenoiserTimer(self.denoisers, self.device)
        try:
            synchronize(self.device)
            start = time.perf_counter()
            output = self.pipe(prompt=prompt, generator=generator, output_type="np", **call)
            synchronize(self.device)
            total = time.perf_counter() - start
        finally:
            timer.close()
        seconds: dict[str, float | None] = {"total": total, "transformer": timer.seconds, "attention": None}
        sample = Sample(frames_of(output), seconds)
        if self._installed is not None:
            st = stats(self.pipe)
            sample.rows = list(st.rows)
            sample.summary = st.summary()
            st.reset()
            seconds["attention"] = sample.summary["attention_ms"] / 1e3
        return sample
