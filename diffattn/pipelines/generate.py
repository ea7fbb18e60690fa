"""``diffattn generate``: batch video generation with an attention method, timed and compared to dense.

For every prompt it generates one video with ``--method`` (and, with ``--compare dense``, the dense
video from the same seed), writes ``<index>-<slug>.mp4`` atomically and appends one JSON line to
``report.jsonl``: prompt, seed, model, method, config, seconds, density, speedup vs dense,
PSNR/SSIM(/LPIPS) vs dense, software versions and device. ``seconds`` holds ``total`` (the whole
pipeline call, device-synchronised at its ends), ``transformer`` (inside the denoiser's forwards) and
``attention`` (inside the method's attention calls); on a GPU the last two are device time from CUDA
events, on a CPU host time (:mod:`diffattn.pipelines.compare`, which runs every generation here).
A failing item is recorded with its error and the batch goes on; ``--resume`` skips items already
reported with their file present; Ctrl-C leaves no partial files.

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
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .prompts import PromptItem, parse_config, read_prompts, slugify
from .report import (
    REPORT,
    SUMMARY,
    OutputFolderError,
    append_jsonl,
    check_out,
    clear_run,
    completed,
    format_table,
    item_key,
    merge_reports,
    read_jsonl,
    shard_name,
    summarize,
    write_run,
)
from .tiny.data import DEFAULT_PROMPTS as DEFAULT_TINY_PROMPTS

if TYPE_CHECKING:
    from .compare import Sample

__all__ = [
    "PromptItem",
    "GenerateOptions",
    "OutputFolderError",
    "read_prompts",
    "parse_config",
    "slugify",
    "run",
    "merge_reports",
    "summarize",
    "format_table",
    "DEFAULT_TINY_PROMPTS",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
DTYPE_CHOICES = ("auto", *_DTYPES)


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


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _item_settings(item: PromptItem, opts: GenerateOptions) -> dict[str, Any]:
    """What ``item`` runs with: each setting its prompt line gives, else the run's (``None``: the
    pipeline's own default); the seed is the line's, else the run's seed plus the item's index."""
    found = {name: _first(getattr(item, name), getattr(opts, name)) for name in _PIPELINE_ARGS}
    found["negative_prompt"] = _first(item.negative_prompt, opts.negative_prompt)
    found["seed"] = item.seed if item.seed is not None else opts.seed + item.index
    return found


# Per-item settings and the pipeline arguments they are passed as.
_PIPELINE_ARGS = {"frames": "num_frames", "height": "height", "width": "width", "steps": "num_inference_steps",
                  "guidance": "guidance_scale"}


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


# ------------------------------------------------------------------------------------------ running
class _Runner:
    def __init__(self, opts: GenerateOptions, procs: _Procs) -> None:
        from .compare import Comparer
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
        self.comparer = Comparer(self.pipe, device)
        env = self.comparer.environment()
        self.versions, self.device_name = env["versions"], env["device"]

    def _call(self, item: PromptItem, settings: dict[str, Any]) -> Sample:
        kwargs = {arg: settings[name] for name, arg in _PIPELINE_ARGS.items() if settings[name] is not None}
        if settings["negative_prompt"] is not None:
            kwargs["negative_prompt"] = settings["negative_prompt"]
        return self.comparer.sample(item.prompt, settings["seed"], **kwargs)

    def generate(self, item: PromptItem) -> dict[str, Any]:
        from .compare import quality
        from .video_io import write_video

        o = self.opts
        settings = _item_settings(item, o)
        row: dict[str, Any] = self._base_row(item, settings)
        if item.error:
            raise ValueError(item.error)
        dense = None
        if o.compare == "dense" and o.method != "dense":
            self.comparer.use(None)  # the method stays installed between items unless dense alternates
            dense = self._call(item, settings)
        self.comparer.use(o.method, o.config)
        sample = self._call(item, settings)
        if o.compare == "dense" and o.method == "dense":
            dense = sample  # the method is the reference: no second run
        frames, secs, stats = sample.frames, sample.seconds, sample.summary
        name = f"{item.index:04d}-{slugify(item.prompt)}.mp4"
        write_video(Path(o.out) / name, frames, fps=o.fps)
        row["file"] = name
        f, h, w, _ = frames.shape
        row.update(frames=f, height=h, width=w)
        row["seconds"] = {k: None if v is None else round(v, 4) for k, v in secs.items()}
        row["density"] = 1.0 if o.method == "dense" else stats.get("density")
        if stats:
            row["attention_calls"] = stats.get("calls")
            row["fallbacks"] = stats.get("fallbacks")
        if dense is not None:
            dense_secs = dense.seconds
            row["dense_seconds"] = {k: round(dense_secs[k], 4) for k in ("total", "transformer")}
            row["speedup"] = round(dense_secs["total"] / secs["total"], 4)
            row["transformer_speedup"] = round(dense_secs["transformer"] / max(secs["transformer"], 1e-9), 4)
            q = quality(frames, dense.frames)
            row["identical_to_dense"] = q["identical"]
            row["psnr"] = _finite(q["psnr"])
            row["ssim"] = q["ssim"]
            row["lpips"] = q["lpips"]
            if o.save_dense:
                dense_name = f"{item.index:04d}-{slugify(item.prompt)}.dense.mp4"
                write_video(Path(o.out) / dense_name, dense.frames, fps=o.fps)
                row["dense_file"] = dense_name
        row["status"] = "ok"
        return row

    def _default(self, name: str) -> Any:
        """The pipeline's own default of a ``__call__`` argument (what runs when none is given)."""
        param = inspect.signature(self.pipe.__call__).parameters.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default

    def _base_row(self, item: PromptItem, settings: dict[str, Any]) -> dict[str, Any]:
        o = self.opts
        return {
            "index": item.index,
            "status": "error",
            "prompt": item.prompt,
            "negative_prompt": settings["negative_prompt"],
            "seed": settings["seed"],
            "model": o.model,
            "method": o.method,
            "config": o.config,
            "steps": _first(settings["steps"], self._default("num_inference_steps")),
            "guidance": _first(settings["guidance"], self._default("guidance_scale")),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device_name,
            "versions": self.versions,
            "process": self.procs.index,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _error_row(runner: _Runner | None, opts: GenerateOptions, item: PromptItem, exc: BaseException) -> dict[str, Any]:
    from .compare import versions

    settings = _item_settings(item, opts)
    row = runner._base_row(item, settings) if runner is not None else {
        "index": item.index, "prompt": item.prompt, "seed": settings["seed"], "model": opts.model, "method": opts.method,
        "config": opts.config, "versions": versions(),
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
    check_out(out, opts)  # every process, before any of them changes the folder
    procs.barrier()
    if procs.is_main:
        for stale in out.glob(".*.partial*"):
            stale.unlink(missing_ok=True)  # left by a killed process (Ctrl-C cleans its own)
        if opts.overwrite:
            clear_run(out)
        write_run(out, opts)
        previous = merge_reports(out)
    procs.barrier()
    if not procs.is_main:
        previous = read_jsonl(out / REPORT)
    done = completed(out, previous) if opts.resume else set()
    mine = [it for it in items if it.index % procs.count == procs.index]
    todo = [it for it in mine if item_key(it.index, it.prompt, opts.method, opts.config) not in done]
    report = out / (REPORT if procs.count == 1 else shard_name(procs.index, procs.count))
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
                    append_jsonl(report, _error_row(None, opts, it, e))
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
            append_jsonl(report, row)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: finished videos are in {out}; run again with --resume to continue", file=sys.stderr)
    if interrupted:
        return 130
    procs.barrier()
    if procs.is_main:
        rows = merge_reports(out)
        keys = {item_key(it.index, it.prompt, opts.method, opts.config) for it in items}
        latest: dict[int, dict[str, Any]] = {}
        for r in rows:
            if item_key(r.get("index"), r.get("prompt"), r.get("method"), r.get("config") or {}) in keys:
                latest[r["index"]] = r
        summary = summarize([latest[i] for i in sorted(latest)])
        tmp = out / f".{SUMMARY}.partial"
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, out / SUMMARY)
        print(format_table(summary))
        failures = summary["errors"]
    return 1 if failures else 0


