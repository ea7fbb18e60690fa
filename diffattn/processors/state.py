"""Per-model runtime state: denoising step and CFG branch tracking, latent grid, and statistics.

A forward pre-hook on the denoiser calls :meth:`ModelState.begin_forward` with the forward's
arguments. Step, step count and CFG branch come first from the ``CacheContext`` diffusers pipelines
publish around each denoiser call (``with transformer.cache_context("cond", step_index=...)``: the
name gives the branch, ``step_index`` / ``num_inference_steps`` the schedule where the pipeline fills
them in). Whatever the context leaves open comes from the pipeline's scheduler when one is known (its
``step_index``, and a new ``timesteps`` tensor marks a new generation), and last from the timestep
values (a repeated timestep is another CFG branch of the same step, a larger one starts a new
generation). Wan calls the transformer twice per step (branches 0 and 1); SD and CogVideoX batch CFG
into one call (branch 0).

The state is a plain object referenced from the model (``model._diffattn_state``) and from every
attention module it serves, so ``copy.deepcopy(model)`` carries a consistent, independent copy.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .models import Grid, ModelSpec, bind_forward_args
from .ops import register_state

__all__ = ["StepTracker", "Stats", "SummaryTable", "ModelState", "ForwardInfo"]


def _is_symbolic(t: torch.Tensor) -> bool:
    """Meta and fake tensors have no values to read (shape inference, ``torch.compile`` tracing)."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _timestep_value(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() == 0 or _is_symbolic(t):
            return None
        return float(t.detach().flatten()[0].float().cpu())
    try:
        return float(t)
    except (TypeError, ValueError):
        return None


class StepTracker:
    """Turns the sequence of denoiser calls into (step, branch, num_steps); ``reset()`` forgets."""

    def __init__(self, scheduler: Any = None, num_steps: int | None = None) -> None:
        self.scheduler = scheduler
        self.default_num_steps = num_steps
        # Set where the caller batches CFG (IR-Diffusion's [refs..., target] groups): without a
        # context or scheduler, a repeated timestep is then the next step, not a second branch.
        self.one_call_per_step = False
        self.generation = 0
        self.reset()

    # A weak reference: a deep copy of the model follows the same pipeline scheduler, not a copy of it.
    @property
    def scheduler(self) -> Any:
        return None if self._scheduler is None else self._scheduler()

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        self._scheduler = None if value is None else weakref.ref(value)

    def reset(self) -> None:
        """Forget the position in the schedule: the next call starts a new generation."""
        self.step = -1
        self.branch = 0
        self.last_t: float | None = None
        self._timesteps_id: int | None = None
        self._branches: dict[str, int] = {}
        self._names_this_step: set[str] = set()

    def _scheduler_step(self) -> tuple[int | None, int | None, bool]:
        sch = self.scheduler
        if sch is None:
            return None, None, False
        timesteps = getattr(sch, "timesteps", None)
        new_schedule = False
        if isinstance(timesteps, torch.Tensor):
            new_schedule = self._timesteps_id is not None and id(timesteps) != self._timesteps_id
            self._timesteps_id = id(timesteps)
        num = None
        if isinstance(timesteps, torch.Tensor) and timesteps.numel():
            num = max(1, int(timesteps.numel()) // max(int(getattr(sch, "order", 1) or 1), 1))
        if not hasattr(sch, "step_index"):
            return None, num, new_schedule
        idx = sch.step_index
        return (0 if idx is None else int(idx)), num, new_schedule

    def _branch_of(self, name: str) -> int:
        # "cond" is branch 0 and "uncond" 1 (Wan's two calls); a batched "cond_uncond" call is 0.
        if name not in self._branches:
            fixed = {"cond": 0, "cond_uncond": 0, "uncond": 1}
            self._branches[name] = fixed.get(name, len(self._branches))
        return self._branches[name]

    def advance(self, timestep: Any, context: Any = None) -> tuple[int, int, int, bool]:
        """Register one denoiser call; returns (step, branch, num_steps, new_generation).

        ``context`` is the diffusers ``CacheContext`` of the call, if the pipeline set one.
        """
        ctx_step = getattr(context, "step_index", None)
        ctx_num = getattr(context, "num_inference_steps", None)
        name = getattr(context, "name", None)
        if ctx_step is not None:
            ctx_step = int(ctx_step)
            new_gen = self.step < 0 or ctx_step < self.step or (
                ctx_step == self.step and name is not None and name in self._names_this_step
            )
            if ctx_step != self.step or new_gen:
                self._names_this_step = set()
            branch = self._branch_of(name) if name is not None else (
                0 if new_gen or ctx_step != self.step else self.branch + 1
            )
            if name is not None:
                self._names_this_step.add(name)
            if new_gen:
                self.generation += 1
            self.step, self.branch = ctx_step, branch
            self.last_t = _timestep_value(timestep) if ctx_num is None else None
            num = int(ctx_num) if ctx_num else (self._scheduler_step()[1] or self.default_num_steps or 50)
            return ctx_step, branch, num, new_gen
        step, branch, num, new_gen = self._infer(timestep)
        if name is not None:
            branch = self._branch_of(name)
            self.branch = branch
        if ctx_num:
            num = int(ctx_num)
        return step, branch, num, new_gen

    def _infer(self, timestep: Any) -> tuple[int, int, int, bool]:
        t = _timestep_value(timestep)
        sched_step, sched_num, new_schedule = self._scheduler_step()
        new_gen = False
        if self.step < 0:
            new_gen = True
            step = sched_step if sched_step is not None else 0
            branch = 0
        elif sched_step is not None:
            if new_schedule or sched_step < self.step:
                new_gen, step, branch = True, sched_step, 0
            elif sched_step == self.step:
                step, branch = sched_step, self.branch + 1
            else:
                step, branch = sched_step, 0
        else:
            if t is not None and self.last_t is not None and t == self.last_t and not self.one_call_per_step:
                step, branch = self.step, self.branch + 1
            elif t is not None and self.last_t is not None and t > self.last_t:
                new_gen, step, branch = True, 0, 0
            else:
                step, branch = self.step + 1, 0
        if new_gen:
            self.generation += 1
        self.step, self.branch, self.last_t = step, branch, t
        num = sched_num or self.default_num_steps or 50
        return step, branch, num, new_gen


@dataclass
class ForwardInfo:
    """What the current denoiser call tells the processors."""

    grid: Grid | None
    step: int
    branch: int
    num_steps: int
    generation: int


class Stats:
    """Per-call records of every replaced attention: one row per (layer, step, branch, call).

    A row's ``time_ms`` may arrive as a :class:`Span` still running on the device; it becomes a
    number when the rows are read, so recording a call never waits for it.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            pending, self._pending = self._pending, []
        # Reading a pending time may wait on the device: outside the lock, so the attention path's
        # add() never waits behind it.
        for row in pending:
            row["time_ms"] = row["time_ms"].ms
        return self._rows

    def __deepcopy__(self, memo: dict) -> "Stats":
        import copy

        new = Stats()
        new._rows = copy.deepcopy(self.rows, memo)
        return new

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()
            self._pending.clear()

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)
            if isinstance(row.get("time_ms"), Span):
                self._pending.append(row)

    def summary(self) -> "SummaryTable":
        """Totals over all rows and a per-layer breakdown (mean density, time, searches, hits).

        A dict (``summary["density"]``, ``summary["layers"][name]``) that prints as a table;
        ``summary.rows`` lists the layers as dicts with their name under ``"layer"``.
        """
        per_layer: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"calls": 0, "density_sum": 0.0, "time_ms": 0.0, "searches": 0, "cache_hits": 0,
                     "fallbacks": 0, "recall_sum": 0.0, "recall_n": 0}
        )
        for r in self.rows:
            d = per_layer[r["layer"]]
            d["calls"] += 1
            d["density_sum"] += float(r.get("density", 1.0))
            d["time_ms"] += float(r.get("time_ms", 0.0))
            d["searches"] += int(bool(r.get("search", False)))
            d["cache_hits"] += int(bool(r.get("cache_hit", False)))
            d["fallbacks"] += int("fallback" in r)
            if r.get("recall") is not None:
                d["recall_sum"] += float(r["recall"])
                d["recall_n"] += 1
        layers = {}
        for name, d in per_layer.items():
            layers[name] = {
                "calls": d["calls"],
                "density": d["density_sum"] / max(d["calls"], 1),
                "time_ms": d["time_ms"],
                "searches": d["searches"],
                "cache_hits": d["cache_hits"],
                "fallbacks": d["fallbacks"],
                "recall": (d["recall_sum"] / d["recall_n"]) if d["recall_n"] else None,
            }
        calls = sum(d["calls"] for d in layers.values())
        return SummaryTable({
            "calls": calls,
            "density": (sum(d["density"] * d["calls"] for d in layers.values()) / calls) if calls else None,
            "attention_ms": sum(d["time_ms"] for d in layers.values()),
            "searches": sum(d["searches"] for d in layers.values()),
            "cache_hits": sum(d["cache_hits"] for d in layers.values()),
            "fallbacks": sum(d["fallbacks"] for d in layers.values()),
            "layers": layers,
        })

    def to_json(self) -> str:
        rows = [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for r in self.rows]
        return json.dumps({"rows": rows, "summary": self.summary()}, default=str)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        s = self.summary()
        dens = "n/a" if s["density"] is None else f"{s['density']:.3f}"
        return (
            f"Stats(calls={s['calls']}, density={dens}, attention_ms={s['attention_ms']:.1f}, "
            f"searches={s['searches']}, cache_hits={s['cache_hits']}, fallbacks={s['fallbacks']})"
        )


@dataclass
class ModelState:
    """Everything diffattn keeps for one patched denoiser."""

    spec: ModelSpec
    num_layers: int = 0
    tracker: StepTracker = field(default_factory=StepTracker)
    stats: Stats = field(default_factory=Stats)
    info: ForwardInfo | None = None
    methods: list[Any] = field(default_factory=list)  # method objects to reset at a new generation
    sync_timing: bool = False
    capture_layouts: bool = False
    context: Any = None  # the diffusers CacheContext of the current call (set by the pipeline)
    layers: list[Any] = field(default_factory=list)  # the target attention modules, by layer index
    originals: dict[str, Any] | None = None  # the processors before diffattn, restored by ``remove``
    covered: list[dict[str, Any]] = field(default_factory=list)  # processors under later installs, a stack
    parallel: Any = None  # the model's diffusers ParallelConfig when it was adopted after enable_parallelism

    def __post_init__(self) -> None:
        # The compiled graph names the state by this int (``diffattn::attend``'s ``handle``).
        self.handle = register_state(self)

    def __deepcopy__(self, memo: dict) -> "ModelState":
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new.handle = register_state(new)
        return new

    def begin_forward(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.begin(model, bind_forward_args(model, args, kwargs))

    def begin(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        self.begin_values(self.shape_of(model, inputs), inputs.get(self.spec.timestep_arg))

    def shape_of(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Grid | None:
        """The forward's latent grid, from its inputs' shapes (static under compile)."""
        try:
            return self.spec.grid(model, inputs)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError):
            return None

    def begin_values(self, grid: Grid | None, timestep: Any) -> None:
        step, branch, num, new_gen = self.tracker.advance(timestep, self.context)
        if new_gen and self.tracker.generation > 1:
            for m in self.methods:
                m.reset()
        self.info = ForwardInfo(grid, step, branch, num, self.tracker.generation)

    def end_forward(self) -> None:
        self.info = None
        self._masks = {}
        self.token = None

    def per_forward(self, mask: Any, key: tuple, make: Callable[[Any], Any]) -> Any:
        """``make(mask)`` once per mask object and forward: every layer gets the model's same mask, and
        what is derived from it (a view, a gather over ranks, a parse that reads the device) need not be
        redone per layer."""
        if mask is None:
            return make(mask)
        masks = self.__dict__.setdefault("_masks", {})
        slot = (id(mask), *key)
        hit = masks.get(slot)
        if hit is None or hit[0] is not mask:
            hit = masks[slot] = (mask, make(mask))
        return hit[1]

    def key_padding(self, mask: Any, b: int, n: int, parse: Callable) -> tuple[bool, Any]:
        """``parse(mask, b, n)`` once per mask and forward (parsing reads the device)."""
        return self.per_forward(mask, ("parse", b, n), lambda m: parse(m, b, n))

    def timer(self, device: torch.device | str | None = None) -> Span:
        return Span(device, self.sync_timing)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


class Span:
    """How long a stretch of work took, measured so that the work never waits on the host.

    On a CUDA device: the device time between two events recorded on the device's current stream,
    read (and waited for) only when :attr:`ms` is first asked, after the work. With ``sync``, and on
    other accelerators, the host time between two device synchronisations (exact, but a stall per
    span). On a CPU the host time, which is the work's own time there. Under CUDA-graph capture
    nothing may wait or be timed: the host clock alone (what capturing took, not a replay).
    """

    def __init__(self, device: torch.device | str | None = None, sync: bool = False) -> None:
        device = torch.device(device if device is not None else "cpu")
        cuda = device.type == "cuda" and torch.cuda.is_available()
        capturing = cuda and torch.cuda.is_current_stream_capturing()
        self._device = device
        self._events = cuda and not sync and not capturing
        self._sync = device.type != "cpu" and not self._events and not capturing
        self._ms: float | None = None

    def __enter__(self) -> "Span":
        if self._events:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self._device))
        else:
            if self._sync:
                synchronize(self._device)
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._events:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(torch.cuda.current_stream(self._device))
            return
        if self._sync:
            synchronize(self._device)
        self._ms = (time.perf_counter() - self._t0) * 1e3

    @property
    def ms(self) -> float:
        if self._ms is None:
            self._end.synchronize()
            self._ms = float(self._start.elapsed_time(self._end))
            self._start = self._end = None
        return self._ms


class SummaryTable(dict):
    """:meth:`Stats.summary`: the totals and ``"layers"`` as a dict, printed as a per-layer table."""

    _COLUMNS = (("calls", "calls", "d"), ("density", "density", ".3f"), ("recall", "recall", ".3f"),
                ("time_ms", "attn ms", ".1f"), ("searches", "searches", "d"), ("cache_hits", "cache hits", "d"),
                ("fallbacks", "fallbacks", "d"))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [{"layer": name, **values} for name, values in self.get("layers", {}).items()]

    def __str__(self) -> str:
        def cell(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        total = {"layer": "all layers", "calls": self.get("calls"), "density": self.get("density"),
                 "recall": None, "time_ms": self.get("attention_ms"), "searches": self.get("searches"),
                 "cache_hits": self.get("cache_hits"), "fallbacks": self.get("fallbacks")}
        body = [[r["layer"], *(cell(r.get(k), spec) for k, _, spec in self._COLUMNS)] for r in self.rows]
        foot = [total["layer"], *(cell(total[k], spec) for k, _, spec in self._COLUMNS)]
        head = ["layer", *(title for _, title, _ in self._COLUMNS)]
        widths = [max(len(row[i]) for row in [head, foot, *body]) for i in range(len(head))]

        def line(row: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(head))
        return "\n".join([line(head), rule, *map(line, body), rule, line(foot)])

