"""``diffattn generate``: batch video generation with an attention method, timed and compared to dense.

For every prompt it generates one video with ``--method`` (and, with ``--compare dense``, the dense
video from the same seed), writes ``<index>-<slug>.mp4`` atomically and appends one JSON line to
``report.jsonl``: prompt, seed, model, method, config, seconds (total / transformer / attention),
density, speedup vs dense, PSNR/SSIM(/LPIPS) vs dense, software versions and device. A failing item
is recorded with its error and the batch goes on; ``--resume`` skips items already reported with
their file present; Ctrl-C leaves no partial files.

Under ``accelerate launch`` the prompts are split round-robin by process index, each process appends
to its own ``report.shard-<i>-of-<n>.jsonl``, and the main process merges the shards into
``report.jsonl`` at the end (or at the start of the next run, after an interruption).

>>> from diffattn.pipelines.generate import GenerateOptions, run  # doctest: +SKIP
>>> run(GenerateOptions(prompts=["a red circle moving left on a blue background"], out="out", compare="dense"))  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "PromptItem",
    "GenerateOptions",
    "read_prompts",
    "parse_config",
    "slugify",
    "run",
    "merge_reports",
    "DEFAULT_TINY_PROMPTS",
]

DEFAULT_TINY_PROMPTS = (
    "a red circle moving right on a blue background",
    "a yellow square moving down on a purple background",
    "a white triangle moving left on a green background",
    "an orange circle moving up on a black background",
)
REPORT = "report.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"  # what the videos in the folder were generated with (see _run_identity)
_VIDEO = re.compile(r"^\d{4}-.+\.mp4$")
# what --resume must keep equal: every option that changes a video (prompts are per row in the report)
_IDENTITY = ("model", "method", "config", "frames", "height", "width", "steps", "guidance",
             "negative_prompt", "seed", "dtype")
_ITEM_KEYS = {
    "prompt": "prompt",
    "seed": "seed",
    "negative_prompt": "negative_prompt",
    "frames": "frames",
    "num_frames": "frames",
    "height": "height",
    "width": "width",
    "steps": "steps",
    "num_inference_steps": "steps",
    "guidance": "guidance",
    "guidance_scale": "guidance",
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
DTYPE_CHOICES = ("auto", *_DTYPES)


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class PromptItem:
    """One line of the prompt file. ``error`` is set (and the rest may be missing) for a bad line."""

    index: int
    prompt: str | None
    line: int = 0
    seed: int | None = None
    negative_prompt: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    error: str | None = None


def _check_field(name: str, value: Any) -> Any:
    if name in ("prompt", "negative_prompt"):
        if not isinstance(value, str) or (name == "prompt" and not value.strip()):
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if name == "guidance":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"guidance must be a number, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if name != "seed" and value < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Items of a ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped) or ``.jsonl``
    file (one object a line: ``prompt`` and optional ``seed``, ``negative_prompt``, ``frames``,
    ``height``, ``width``, ``steps``, ``guidance``). A malformed ``.jsonl`` line becomes an item with
    ``error`` set, so it is reported without stopping the others."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--prompts {str(path)!r}: use a .txt (one prompt a line) or .jsonl file")
    items: list[PromptItem] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            text = raw.strip()
            if not text or (suffix == ".txt" and text.startswith("#")):
                continue
            item = PromptItem(index=len(items), prompt=None, line=lineno)
            if suffix == ".txt":
                item.prompt = text
            else:
                try:
                    data = json.loads(text)
                    if not isinstance(data, dict):
                        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                    unknown = sorted(set(data) - set(_ITEM_KEYS))
                    if unknown:
                        raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(_ITEM_KEYS)}")
                    if "prompt" not in data:
                        raise ValueError("missing 'prompt'")
                    for key, value in data.items():
                        setattr(item, _ITEM_KEYS[key], _check_field(_ITEM_KEYS[key], value))
                except ValueError as e:  # json.JSONDecodeError is a ValueError
                    item.error = f"{path.name} line {lineno}: {e}"
                    if isinstance(data_prompt := _maybe_prompt(text), str):
                        item.prompt = data_prompt
            items.append(item)
    if not items:
        raise ValueError(f"--prompts {str(path)!r} has no prompts")
    return items


def _maybe_prompt(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("prompt") if isinstance(data, dict) else None


def slugify(text: str | None, max_len: int = 64) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:max_len].rstrip("-")
    return slug or "item"


# ------------------------------------------------------------------------------------------- config
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_config(values: Sequence[str] | None) -> dict[str, Any]:
    """Merge ``--config`` values: paths of JSON files (objects) and ``key=value`` fields, in order.

    Values are read as JSON where possible (``decay_factor=0.2``, ``steps=[10,30]``, ``flag=true``)
    and as strings otherwise (``backend=torch``).
    """
    config: dict[str, Any] = {}
    for value in values or ():
        if "=" in value and not os.path.isfile(value):
            key, _, raw = value.partition("=")
            key = key.strip()
            if not key.isidentifier():
                raise ValueError(f"--config {value!r}: {key!r} is not a field name; use field=value")
            config[key] = _parse_value(raw.strip())
        elif os.path.isfile(value):
            try:
                with open(value) as fh:
                    data = json.load(fh)
            except ValueError as e:
                raise ValueError(f"--config {value!r} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ValueError(f"--config {value!r} must hold a JSON object of config fields")
            config.update(data)
        else:
            raise ValueError(f"--config {value!r}: give a JSON file that exists or key=value fields")
    return config


# ------------------------------------------------------------------------------------------ options
@dataclass
class GenerateOptions:
    """Everything ``diffattn generate`` takes (see ``diffattn generate --help``)."""

    model: str = "tiny"
    method: str = "dense"
    config: dict[str, Any] = field(default_factory=dict)
    prompts: str | Sequence[str] | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str | None = None
    out: str = "diffattn-out"
    compare: str | None = None
    resume: bool = False
    overwrite: bool = False
    fps: int = 8
    save_dense: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Check arguments before any model is loaded; ``ValueError`` naming the argument and the fix."""
        import diffattn

        if self.method not in diffattn.methods():
            raise ValueError(f"--method {self.method!r} is unknown; available: {diffattn.methods()}")
        config = dict(self.config)
        named = config.pop("method", self.method)
        if named != self.method:
            raise ValueError(f"--config is for method {named!r} but --method is {self.method!r}")
        try:
            diffattn.make_config(self.method, config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config for {self.method!r}: {e}") from None
        self.config = config
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
        if self.compare not in (None, "dense"):
            raise ValueError(f"--compare {self.compare!r}: only 'dense' is supported")
        for name in ("frames", "height", "width", "steps", "fps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} {value!r} must be a positive integer")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"--guidance {self.guidance!r} must be a number >= 0")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r}; choose one of {list(DTYPE_CHOICES)}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
        if self.model != "tiny" and not os.path.isdir(os.path.expanduser(self.model)):
            if self.model.startswith((".", "/", "~")) or self.model.count("/") != 1:
                raise ValueError(
                    f"--model {self.model!r} is neither a folder nor a hub id (org/name); give 'tiny', "
                    "a Diffusers folder (written by save_pretrained) or a hub id"
                )
        if self.prompts is None and self.model != "tiny":
            raise ValueError("--prompts (a .txt or .jsonl file) or --prompt is needed for models other than tiny")

    def items(self) -> list[PromptItem]:
        if self.prompts is None:
            return [PromptItem(i, p) for i, p in enumerate(DEFAULT_TINY_PROMPTS)]
        if isinstance(self.prompts, (str, os.PathLike)):
            return read_prompts(self.prompts)
        prompts = list(self.prompts)
        if not prompts:
            raise ValueError("no prompts given")
        return [PromptItem(i, p, error=None if isinstance(p, str) and p.strip() else f"empty prompt {p!r}")
                for i, p in enumerate(prompts)]

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.model == "tiny" or device.type == "cpu":
            return torch.float32
        return torch.bfloat16


# -------------------------------------------------------------------------------------- processes
@dataclass
class _Procs:
    index: int = 0
    count: int = 1
    local_index: int = 0
    device: torch.device = torch.device("cpu")
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self.state is not None and self.count > 1:
            self.state.wait_for_everyone()


def _processes(want_cpu: bool) -> _Procs:
    """Process index/count from ``accelerate`` (one process per GPU under ``accelerate launch``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        dev = torch.device("cuda") if torch.cuda.is_available() and not want_cpu else torch.device("cpu")
        return _Procs(device=dev)
    from accelerate import PartialState

    state = PartialState(cpu=want_cpu)
    return _Procs(state.process_index, state.num_processes, state.local_process_index, state.device, state)


# ----------------------------------------------------------------------------------------- reports
def _shard_name(index: int, count: int) -> str:
    return f"report.shard-{index:03d}-of-{count:03d}.jsonl"


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # one write() of one whole line on an O_APPEND descriptor: an interrupt never leaves half a line
    data = (json.dumps(row, default=str, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed process: that item simply runs again
            if isinstance(row, dict):
                rows.append(row)
    return rows


def merge_reports(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Fold every ``report.shard-*.jsonl`` of ``out`` into ``report.jsonl`` (atomically), return all rows.

    Rows are ordered by item index; shards are deleted once merged.
    """
    out = Path(out)
    report = out / REPORT
    shards = sorted(out.glob("report.shard-*.jsonl"))
    rows = _read_jsonl(report)
    if not shards:
        return rows
    for shard in shards:
        rows.extend(_read_jsonl(shard))
    rows.sort(key=lambda r: (r.get("index", -1), r.get("time", "")))
    tmp = out / f".{REPORT}.{os.getpid()}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str, allow_nan=False) + "\n")
        os.replace(tmp, report)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for shard in shards:
        shard.unlink(missing_ok=True)
    return rows


def _item_key(index: int, prompt: str | None, method: str, config: dict[str, Any]) -> str:
    return json.dumps([index, prompt, method, config], sort_keys=True, default=str)


def _completed(out: Path, rows: Iterable[dict[str, Any]]) -> set[str]:
    done = set()
    for r in rows:
        if r.get("status") == "ok" and r.get("file") and (out / r["file"]).is_file():
            done.add(_item_key(r.get("index"), r.get("prompt"), r.get("method"), r.get("config") or {}))
    return done


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("diffattn", "torch", "diffusers", "transformers", "accelerate", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


# ------------------------------------------------------------------------------------ output folder
class OutputFolderError(ValueError):
    """``--out`` cannot be used as asked; the message says why and what to do (one line)."""


def _run_identity(opts: GenerateOptions) -> dict[str, Any]:
    return {name: getattr(opts, name) for name in _IDENTITY}


def _previous_run(out: Path) -> tuple[dict[str, Any] | None, bool]:
    """``(identity of the run in out or None, whether out holds any run's files)``."""
    try:
        identity = json.loads((out / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if isinstance(identity, dict):
        return identity, True
    rows = _read_jsonl(out / REPORT)
    for shard in sorted(out.glob("report.shard-*.jsonl")):
        rows += _read_jsonl(shard)
    if rows:  # a report without run.json: what its rows name
        first = rows[0]
        return {k: first.get(k) if k != "config" else (first.get("config") or {}) for k in ("model", "method", "config")}, True
    held = (out / SUMMARY).exists() or any(_VIDEO.match(p.name) for p in out.iterdir())
    return None, held


def _describe(identity: dict[str, Any]) -> str:
    config = identity.get("config") or {}
    text = f"--method {identity.get('method')}"
    if config:
        text += " --config " + " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    return text


def _check_out(out: Path, opts: GenerateOptions) -> None:
    """Refuse, before any model is loaded, an ``--out`` that cannot be written or holds another run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}.partial"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputFolderError(f"--out {str(out)!r} is not writable: {reason}; give a folder you can write to") from None
    previous, held = _previous_run(out)
    if not held or opts.overwrite:
        return
    fix = (f"use a new --out folder, --overwrite to replace that run, or --resume with the same options "
           f"({_describe(previous)}) to continue it" if previous else
           "use a new --out folder or --overwrite to replace it")
    if not opts.resume:
        raise OutputFolderError(f"--out {str(out)!r} already holds a run: {fix}")
    mine = _run_identity(opts)
    if previous is None:
        raise OutputFolderError(f"--out {str(out)!r} holds videos but no report to resume from: {fix}")
    differ = [k for k in previous if k in mine and json.dumps(previous[k], sort_keys=True, default=str)
              != json.dumps(mine[k], sort_keys=True, default=str)]
    if differ:
        changes = ", ".join(f"{k} {previous[k]!r} -> {mine[k]!r}" for k in differ)
        raise OutputFolderError(
            f"--resume: --out {str(out)!r} holds a run with other options ({changes}); --resume continues "
            f"a run only with the same method, config and sizes: {fix}"
        )


def _clear_run(out: Path) -> None:
    """``--overwrite``: remove the files of the run in ``out`` (and nothing else in the folder)."""
    rows = _read_jsonl(out / REPORT)
    shards = sorted(out.glob("report.shard-*.jsonl"))
    for shard in shards:
        rows += _read_jsonl(shard)
    names = {r.get(k) for r in rows for k in ("file", "dense_file") if isinstance(r.get(k), str)}
    names |= {p.name for p in out.iterdir() if _VIDEO.match(p.name)}
    for name in sorted(names):
        if "/" not in name and name not in ("", ".", ".."):
            (out / name).unlink(missing_ok=True)
    for path in [out / REPORT, out / SUMMARY, out / RUN, *shards]:
        path.unlink(missing_ok=True)


def _write_run(out: Path, opts: GenerateOptions) -> None:
    tmp = out / f".{RUN}.partial"
    tmp.write_text(json.dumps(_run_identity(opts), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, out / RUN)


# ------------------------------------------------------------------------------------------- timing
class _DenoiserTimer:
    """Wall time spent inside the pipeline's transformer(s)/UNet, via forward hooks."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.seconds = 0.0
        self._sync = device.type == "cuda"
        self._start: dict[int, float] = {}
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self._start[id(module)] = self._now()

    def _post(self, module, args, output):
        start = self._start.pop(id(module), None)
        if start is not None:
            self.seconds += self._now() - start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _denoisers(pipe: Any) -> list[torch.nn.Module]:
    found = [getattr(pipe, n) for n in ("transformer", "transformer_2", "unet") if getattr(pipe, n, None) is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer or unet to time")
    return found


def _frames_of(output: Any) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------ running
class _Runner:
    def __init__(self, opts: GenerateOptions, procs: _Procs) -> None:
        from .tiny import load_pipeline

        self.opts = opts
        self.procs = procs
        if opts.device is not None:
            device = torch.device(opts.device)
            if device.type == "cuda" and device.index is None and procs.count > 1:
                device = torch.device("cuda", procs.local_index)
        else:
            device = procs.device
        self.device = device
        self.dtype = opts.torch_dtype(device)
        self.pipe = load_pipeline(opts.model, dtype=self.dtype, device=device)
        self.pipe.set_progress_bar_config(
            disable=not opts.progress, leave=False, desc="steps", position=1 if procs.count == 1 else procs.index * 2 + 1
        )
        self.denoisers = _denoisers(self.pipe)
        self.versions = _versions()
        self.device_name = _device_name(device)
        self._applied = False

    # the method is (re)installed per item only when it has to alternate with the dense reference
    def _use_method(self, on: bool) -> None:
        import diffattn

        if self.opts.method == "dense":
            return
        if on and not self._applied:
            diffattn.apply(self.pipe, self.opts.method, dict(self.opts.config))
            self._applied = True
        elif not on and self._applied:
            diffattn.remove(self.pipe)
            self._applied = False

    def _stats(self) -> dict[str, Any]:
        import diffattn

        if not self._applied:
            return {}
        stats = diffattn.stats(self.pipe)
        summary = stats.summary()
        stats.reset()
        return summary

    def _call(self, item: PromptItem, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        o = self.opts
        kwargs: dict[str, Any] = {}
        for name, key in (("frames", "num_frames"), ("height", "height"), ("width", "width"),
                          ("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
            value = getattr(item, name) if getattr(item, name) is not None else getattr(o, name)
            if value is not None:
                kwargs[key] = value
        negative = item.negative_prompt if item.negative_prompt is not None else o.negative_prompt
        if negative is not None:
            kwargs["negative_prompt"] = negative
        # a CPU generator gives the same noise on every device, so dense and method runs match
        generator = torch.Generator("cpu").manual_seed(seed)
        timer = _DenoiserTimer(self.denoisers, self.device)
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            output = self.pipe(prompt=item.prompt, generator=generator, output_type="np", **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
        finally:
            timer.close()
        return _frames_of(output), {"total": total, "transformer": timer.seconds}

    def generate(self, item: PromptItem) -> dict[str, Any]:
        from .metrics import video_metrics
        from .video_io import write_video

        o = self.opts
        seed = item.seed if item.seed is not None else o.seed + item.index
        row: dict[str, Any] = self._base_row(item, seed)
        if item.error:
            raise ValueError(item.error)
        dense = dense_secs = None
        if o.compare == "dense" and o.method != "dense":
            self._use_method(False)
            dense, dense_secs = self._call(item, seed)
        self._use_method(True)
        frames, secs = self._call(item, seed)
        stats = self._stats()
        if o.compare == "dense" and o.method == "dense":
            dense, dense_secs = frames, secs  # the method is the reference: no second run
        name = f"{item.index:04d}-{slugify(item.prompt)}.mp4"
        write_video(Path(o.out) / name, frames, fps=o.fps)
        row["file"] = name
        f, h, w, _ = frames.shape
        row.update(frames=f, height=h, width=w)
        attention_ms = stats.get("attention_ms")
        row["seconds"] = {
            "total": round(secs["total"], 4),
            "transformer": round(secs["transformer"], 4),
            "attention": None if attention_ms is None else round(attention_ms / 1000, 4),
        }
        row["density"] = 1.0 if o.method == "dense" else stats.get("density")
        if stats:
            row["attention_calls"] = stats.get("calls")
            row["fallbacks"] = stats.get("fallbacks")
        if dense is not None:
            row["dense_seconds"] = {k: round(v, 4) for k, v in dense_secs.items()}
            row["speedup"] = round(dense_secs["total"] / secs["total"], 4)
            row["transformer_speedup"] = round(dense_secs["transformer"] / max(secs["transformer"], 1e-9), 4)
            quality = video_metrics(frames, dense)
            row["identical_to_dense"] = quality["psnr"] == math.inf
            row["psnr"] = _finite(quality["psnr"])
            row["ssim"] = quality["ssim"]
            row["lpips"] = quality["lpips"]
            if o.save_dense:
                dense_name = f"{item.index:04d}-{slugify(item.prompt)}.dense.mp4"
                write_video(Path(o.out) / dense_name, dense, fps=o.fps)
                row["dense_file"] = dense_name
        row["status"] = "ok"
        return row

    def _default(self, name: str) -> Any:
        """The pipeline's own default of a ``__call__`` argument (what runs when none is given)."""
        param = inspect.signature(self.pipe.__call__).parameters.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default

    def _base_row(self, item: PromptItem, seed: int) -> dict[str, Any]:
        o = self.opts
        return {
            "index": item.index,
            "status": "error",
            "prompt": item.prompt,
            "negative_prompt": item.negative_prompt if item.negative_prompt is not None else o.negative_prompt,
            "seed": seed,
            "model": o.model,
            "method": o.method,
            "config": o.config,
            "steps": item.steps or o.steps or self._default("num_inference_steps"),
            "guidance": _first(item.guidance, o.guidance, self._default("guidance_scale")),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device_name,
            "versions": self.versions,
            "process": self.procs.index,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _error_row(runner: _Runner | None, opts: GenerateOptions, item: PromptItem, exc: BaseException) -> dict[str, Any]:
    seed = item.seed if item.seed is not None else opts.seed + item.index
    row = runner._base_row(item, seed) if runner is not None else {
        "index": item.index, "prompt": item.prompt, "seed": seed, "model": opts.model, "method": opts.method,
        "config": opts.config, "versions": _versions(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    row["status"] = "error"
    row["error"] = f"{type(exc).__name__}: {exc}"
    row["traceback"] = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return row


def run(opts: GenerateOptions) -> int:
    """Run the batch. Returns 0 when every item succeeded, 1 when some failed, 130 on Ctrl-C."""
    from tqdm.auto import tqdm

    opts.validate()
    items = opts.items()
    out = Path(opts.out)
    want_cpu = opts.device is not None and torch.device(opts.device).type == "cpu"
    procs = _processes(want_cpu)
    _check_out(out, opts)  # every process, before any of them changes the folder
    procs.barrier()
    if procs.is_main:
        for stale in out.glob(".*.partial*"):
            stale.unlink(missing_ok=True)  # left by a killed process (Ctrl-C cleans its own)
        if opts.overwrite:
            _clear_run(out)
        _write_run(out, opts)
        previous = merge_reports(out)
    procs.barrier()
    if not procs.is_main:
        previous = _read_jsonl(out / REPORT)
    done = _completed(out, previous) if opts.resume else set()
    mine = [it for it in items if it.index % procs.count == procs.index]
    todo = [it for it in mine if _item_key(it.index, it.prompt, opts.method, opts.config) not in done]
    report = out / (REPORT if procs.count == 1 else _shard_name(procs.index, procs.count))
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"[process {procs.index}] --resume: {skipped} item(s) already done, {len(todo)} to go", file=sys.stderr)

    failures = 0
    interrupted = False
    runner: _Runner | None = None
    try:
        if todo:
            try:
                runner = _Runner(opts, procs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # recorded for every item, so the report says why nothing ran
                for it in todo:
                    _append_jsonl(report, _error_row(None, opts, it, e))
                print(f"cannot load --model {opts.model!r}: {type(e).__name__}: {e}", file=sys.stderr)
                todo = []
                failures = 1
        bar = tqdm(todo, desc="videos" if procs.count == 1 else f"videos [{procs.index}]", unit="video",
                   disable=not opts.progress, position=0 if procs.count == 1 else procs.index * 2)
        for item in bar:
            try:
                row = runner.generate(item)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # one bad item must not stop the batch
                row = _error_row(runner, opts, item, e)
                failures += 1
                tqdm.write(f"item {item.index} failed: {row['error']}", file=sys.stderr)
            _append_jsonl(report, row)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: finished videos are in {out}; run again with --resume to continue", file=sys.stderr)
    if interrupted:
        return 130
    procs.barrier()
    if procs.is_main:
        rows = merge_reports(out)
        keys = {_item_key(it.index, it.prompt, opts.method, opts.config) for it in items}
        latest: dict[int, dict[str, Any]] = {}
        for r in rows:
            if _item_key(r.get("index"), r.get("prompt"), r.get("method"), r.get("config") or {}) in keys:
                latest[r["index"]] = r
        summary = summarize([latest[i] for i in sorted(latest)])
        tmp = out / f".{SUMMARY}.partial"
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, out / SUMMARY)
        print(format_table(summary))
        failures = summary["errors"]
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------- summary
def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


SPEEDUP_DEFINITION = (
    "speedup = dense seconds / method seconds for the same prompt and seed (whole pipeline call); "
    "the overall figure divides the sums over the compared items"
)
CPU_NOTE = ("timings on a shared CPU are noisy (identical runs can differ several-fold); "
            "compare speed on an idle machine or a GPU")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the latest row of every item: counts, seconds of every timed run, speedup, quality."""
    ok = [r for r in rows if r.get("status") == "ok"]
    compared = [r for r in ok if r.get("dense_seconds")]
    method_seconds = sum(r["seconds"]["total"] for r in ok)
    dense_seconds = sum(r["dense_seconds"]["total"] for r in compared)
    compared_method = sum(r["seconds"]["total"] for r in compared)
    speedups = [r["speedup"] for r in compared if r.get("speedup") is not None]
    devices = sorted({str(r.get("device", "")).split(" ")[0] for r in ok})
    return {
        "items": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "seconds": method_seconds + dense_seconds,  # every timed pipeline call, dense comparisons included
        "method_seconds": method_seconds,
        "dense_seconds": dense_seconds,
        "speedup": (dense_seconds / compared_method) if compared and compared_method > 0 else None,
        "speedup_mean": _mean(speedups),
        "speedup_min": min(speedups) if speedups else None,
        "speedup_max": max(speedups) if speedups else None,
        "speedup_definition": SPEEDUP_DEFINITION if compared else None,
        "devices": devices,
        "note": CPU_NOTE if compared and any(d.startswith("cpu") for d in devices) else None,
        "density": _mean([r.get("density") for r in ok]),
        "psnr": _mean([r.get("psnr") for r in compared]),
        "ssim": _mean([r.get("ssim") for r in compared]),
        "lpips": _mean([r.get("lpips") for r in compared]),
        "rows": rows,
    }


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def format_table(summary: dict[str, Any]) -> str:
    """The summary printed at the end of a batch: a row per item (prompts and errors in full), totals,
    the speedup's definition and, on a CPU, the timing caveat."""
    head = f"{'#':>4}  {'status':6}  {'sec':>7}  {'dense s':>7}  {'speedup':>7}  {'density':>7}  {'PSNR':>6}  {'SSIM':>6}  prompt"
    lines = [head, "-" * len(head)]
    errors = []
    for r in summary["rows"]:
        secs = (r.get("seconds") or {}).get("total")
        dense = (r.get("dense_seconds") or {}).get("total")
        psnr = "same" if r.get("identical_to_dense") else _fmt(r.get("psnr"), ".2f")
        lines.append(
            f"{r.get('index', '?'):>4}  {r.get('status', '?'):6}  {_fmt(secs, '.2f'):>7}  {_fmt(dense, '.2f'):>7}"
            f"  {_fmt(r.get('speedup'), '.2f', 'x'):>7}  {_fmt(r.get('density'), '.3f'):>7}  {psnr:>6}"
            f"  {_fmt(r.get('ssim'), '.4f'):>6}  {r.get('prompt') or ''}"
        )
        if r.get("status") != "ok":
            errors.append(f"item {r.get('index', '?')} failed: {r.get('error') or 'unknown error'}")
    lines.append("-" * len(head))
    lines.extend(errors)
    seconds = f"{summary['seconds']:.1f} s"
    if summary.get("dense_seconds"):
        seconds += f" ({summary['method_seconds']:.1f} method + {summary['dense_seconds']:.1f} dense)"
    lines.append(
        f"{summary['ok']}/{summary['items']} ok, {summary['errors']} failed, {seconds}; "
        f"density {_fmt(summary['density'], '.3f')}, PSNR {_fmt(summary['psnr'], '.2f')}, "
        f"SSIM {_fmt(summary['ssim'], '.4f')}"
        + (f", LPIPS {summary['lpips']:.4f}" if summary.get("lpips") is not None else "")
    )
    if summary.get("speedup") is not None:
        lines.append(
            f"speedup {summary['speedup']:.2f}x overall; per item mean {_fmt(summary['speedup_mean'], '.2f', 'x')}"
            f" ({_fmt(summary['speedup_min'], '.2f', 'x')} to {_fmt(summary['speedup_max'], '.2f', 'x')})"
        )
        lines.append(summary["speedup_definition"])
    if summary.get("note"):
        lines.append("note: " + summary["note"])
    return "\n".join(lines)
