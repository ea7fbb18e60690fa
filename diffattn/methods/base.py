"""What every attention method shares: config base class, runtime context, registry.

A method is three things (house rule): a frozen, JSON-round-trippable config dataclass (what is
computed), a planner in :mod:`diffattn.patterns` (a pure function you can plot), and a registry entry
here binding a name to an :class:`AttentionMethod` subclass that owns the per-run state (caches,
counters) and turns a planner's layout into kernel calls. Methods know nothing of diffusers: they see
``q, k, v`` ``[B, H, N, D]`` and an :class:`AttnContext`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, NamedTuple, Union, get_args, get_origin

import torch

__all__ = [
    "MethodConfig",
    "AttnContext",
    "AttentionMethod",
    "Drawing",
    "MethodInfo",
    "Variant",
    "benchmark_variants",
    "describe",
    "register_method",
    "get_method_class",
    "method_names",
    "make_config",
]


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Frozen; ``to_dict``/``from_dict``/``to_json``/``from_json`` round-trip.

    Field values are type-checked against their annotations on construction, so a wrong type fails
    early with the field's name. Lists are accepted for tuple fields (as JSON gives them).
    """

    method: ClassVar[str] = ""
    # Named settings (a model family's official values, a window family) that :meth:`preset` expands.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{type(self).__name__}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Check value ranges; subclasses extend. Raise ``ValueError`` naming the field and the fix."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps({"method": self.method, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = dict(data)
        name = data.pop("method", cls.method)
        if name and cls.method and name != cls.method:
            raise ValueError(f"config is for method {name!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MethodConfig":
        """The config of preset ``name`` (see ``PRESETS``), with ``overrides`` on top."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` (or a tuple from a list) if it matches ``tp``; raise ``TypeError`` otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, name)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{name}={value!r} does not match {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return value
        raise TypeError(f"{name}={value!r} is not None")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ValueError(f"{name}={value!r}; choose one of {list(get_args(tp))}")
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{name}={value!r} must be a tuple/list ({_type_name(tp)})")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise TypeError(f"{name}={value!r} must have {len(args)} entries ({_type_name(tp)})")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{name}={value!r} must be a bool (True/False)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{name}={value!r} must be an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{name}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{name}={value!r} must be a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"{name}={value!r} must be {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# --------------------------------------------------------------------------------------------- context
@dataclass
class AttnContext:
    """What a method may know about one attention call, published by the processor.

    The video tokens form a latent grid ``F x H x W`` flattened frame-major. In a joint sequence the
    ``text_len`` text tokens sit before the video (``text_first``, CogVideoX/Flux) or after it
    (HunyuanVideo); ``key_padding`` (bool ``[B, N]``, True = real token) marks padded text keys.
    ``block_input`` is the ``hidden_states`` the layer's UNet transformer block received (``[B, N, C]``,
    before ``norm1``; None elsewhere) and ``latent_grid`` the denoiser's input grid.

    Under context parallelism a rank holds the whole sequence for some heads only: ``heads`` is
    ``(start, stop, total)`` and ``gather_heads(t)`` turns a per-head tensor ``[B, stop - start, ...]``
    into ``[B, total, ...]`` over the ranks (for rules that compare heads); both None otherwise. When
    the degree does not divide the model's head count, zero heads are appended to the head axis
    (``total`` counts them) and the last ``padded_heads`` of this call's heads are such zero heads:
    their outputs are dropped, and statistics leave them out (:meth:`real_heads`). A rule that
    compares heads through ``gather_heads`` would see them and must refuse in
    :meth:`AttentionMethod.padded_heads_refusal`.
    """

    layer: str = ""
    layer_index: int = 0
    num_layers: int = 1
    grid: tuple[int, int, int] | None = None
    text_len: int = 0
    text_first: bool = False
    key_padding: torch.Tensor | None = None
    step: int = 0
    num_steps: int = 50
    branch: int = 0
    scale: float | None = None
    model: str = ""
    capture_layouts: bool = False
    block_input: torch.Tensor | None = None
    latent_grid: tuple[int, int, int] | None = None
    heads: tuple[int, int, int] | None = None
    gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    padded_heads: int = 0
    record: Callable[..., None] = field(default=lambda **kw: None, repr=False)

    def real_heads(self, t: torch.Tensor) -> torch.Tensor:
        """A per-head tensor ``[B, H, ...]`` of this call's ``H`` heads without its zero padding heads
        (a head axis of another size, e.g. 1 for a layout all heads share, stays)."""
        if self.padded_heads and self.heads is not None and t.shape[1] == self.heads[1] - self.heads[0]:
            return t[:, : t.shape[1] - self.padded_heads]
        return t

    @property
    def cache_key(self) -> tuple[str, int]:
        """Caches are kept per (layer, branch) so CFG branches never share plans."""
        return (self.layer, self.branch)

    @property
    def num_video(self) -> int:
        if self.grid is None:
            return 0
        f, h, w = self.grid
        return f * h * w

    def video_slice(self, n: int) -> slice:
        """Slice of the video tokens in a joint sequence of ``n`` tokens."""
        if self.text_first:
            return slice(self.text_len, n)
        return slice(0, n - self.text_len)

    def text_slice(self, n: int) -> slice:
        if self.text_first:
            return slice(0, self.text_len)
        return slice(n - self.text_len, n)

    def scaled_step(self, step_of_50: int | float) -> int:
        """A step given for a 50-step schedule, scaled to this run's ``num_steps``."""
        return int(round(step_of_50 * self.num_steps / 50.0))


# ------------------------------------------------------------------------------------- description
class Drawing(NamedTuple):
    """How ``diffattn draw <method>`` draws a method: the planner module in :mod:`diffattn.patterns`
    whose ``main(argv, prog)`` renders it, and a phrase saying what the picture shows."""

    module: str
    what: str


class Variant(NamedTuple):
    """One configuration a benchmark runs: config fields over the defaults and its label in tables
    (``""``: the method's name)."""

    fields: dict[str, Any] = {}
    label: str = ""


DEFAULTS = (Variant(),)


@dataclass(frozen=True)
class MethodInfo:
    """What tooling knows of a registered method, read from its class (see :func:`describe`)."""

    name: str
    config_cls: type[MethodConfig]
    families: tuple[str, ...]
    drawing: Drawing | None
    benchmarks: dict[str, tuple[Variant, ...]]
    event_steps: tuple[int, ...]
    steady_step: int
    small_example: dict[str, Any]
    lossless_example: dict[str, Any]

    def config(self, variant: Variant = Variant(), **fields: Any) -> MethodConfig:
        """The config of ``variant`` over ``fields`` a benchmark gives every method (e.g. ``backend``);
        those the config does not have are left out, as not every method has a backend."""
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        return self.config_cls(**{**{k: v for k, v in fields.items() if k in known}, **variant.fields})


# -------------------------------------------------------------------------------------------- methods
class AttentionMethod:
    """Runtime side of a method: holds config and mutable state; ``attend`` computes attention.

    Subclasses set ``name`` and ``config_cls`` and implement :meth:`attend`. A ``state_cls`` gives the
    state object (``self.state``) that :meth:`reset` makes afresh; a method with more to forget extends
    :meth:`reset`.

    The other class attributes describe the method to the tooling, so that the command line, the
    benchmarks and the demo need no list of methods: ``families`` (model families it runs on at its
    defaults: ``"video"`` for DiTs on a latent grid, ``"unet"`` for Stable Diffusion UNets),
    ``drawing`` (how ``diffattn draw`` pictures it; None: no picture), ``benchmarks`` (per benchmark —
    ``"kernel"``, ``"quality"``, ``"tiny"`` — the variants it runs; a benchmark not named leaves the
    method out; a subclass's entries extend its parent's, labels included, and ``()`` takes one back),
    ``steady_step`` (a step of 50 at which it runs its steady-state plan),
    :meth:`event_steps` (steps of 50 at which it plans anew: by default the steps listed in the config
    field ``event_steps_field`` names) and ``small_example`` (config fields with
    which it does its real work on a latent grid of a few hundred tokens: small blocks and windows, no
    warm-up, the PyTorch backend; what a check on a tiny model runs) and ``lossless_example`` (the
    same with a setting that keeps all of attention, so the method must reproduce dense attention
    through all of its machinery: permutations, plans, text and padding handling).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    state_cls: ClassVar[Callable[[], Any] | None] = None
    families: ClassVar[tuple[str, ...]] = ()
    drawing: ClassVar[Drawing | None] = None
    benchmarks: ClassVar[dict[str, tuple[Variant, ...]]] = {}
    steady_step: ClassVar[int] = 40
    event_steps_field: ClassVar[str | None] = None
    small_example: ClassVar[dict[str, Any]] = {}
    lossless_example: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "benchmarks" in cls.__dict__:
            merged = {**super(cls, cls).benchmarks, **cls.__dict__["benchmarks"]}
            cls.benchmarks = {name: variants for name, variants in merged.items() if variants}

    @classmethod
    def sharding_refusal(cls, config: MethodConfig) -> str | None:
        """Why ``config`` cannot run under context parallelism, which hands each rank the whole
        sequence for a share of the heads (None: it can; the default for per-head attention)."""
        return None

    @classmethod
    def padded_heads_refusal(cls, config: MethodConfig) -> str | None:
        """Why ``config`` cannot run when context parallelism pads the heads with zero heads to a
        multiple of its degree (None: it can; the default, as each head's attention is its own). A
        method whose rule compares heads (through ``AttnContext.gather_heads``) must refuse here."""
        return None

    @classmethod
    def event_steps(cls, config: MethodConfig) -> tuple[int, ...]:
        """Steps (of a 50-step schedule) at which ``config`` makes a new plan (searches, calibrations);
        a benchmark calls the method there before measuring it at ``steady_step``."""
        return tuple(getattr(config, cls.event_steps_field)) if cls.event_steps_field else ()

    def __init__(self, config: MethodConfig | None = None) -> None:
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"method {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget all per-run state (called at a new generation and by ``diffattn.remove``)."""
        if self.state_cls is not None:
            self.state = self.state_cls()

    def plan_facts(self, grid: tuple[int, int, int], device: torch.device) -> dict[str, Any]:
        """Facts about the plan for a latent ``grid`` that a kernel benchmark reports beside its timings
        (e.g. a speed-up bound); keys are row fields."""
        return {}

    def search_call(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> Callable[[], Any] | None:
        """A call that runs one plan search on these video tokens, for a benchmark to time; None when
        the method has no search of its own."""
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        """Attention output ``[B, H, N, D]`` for ``q, k, v`` ``[B, H, N, D]``."""
        raise NotImplementedError


_REGISTRY: dict[str, type[AttentionMethod]] = {}


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Class decorator: make ``cls`` available by ``cls.name`` in ``diffattn.apply``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    if not cls.config_cls.method:
        cls.config_cls.method = cls.name
    return cls


def method_names(family: str | None = None, benchmark: str | None = None) -> list[str]:
    """Registered public method names (names starting with "_" are private, e.g. test fixtures), in
    registration order; ``family`` keeps those that run on that model family, ``benchmark`` those that
    take part in that benchmark."""
    return [
        n for n, cls in _REGISTRY.items()
        if not n.startswith("_")
        and (family is None or family in cls.families)
        and (benchmark is None or benchmark in cls.benchmarks)
    ]


def describe(name: str) -> MethodInfo:
    """What tooling needs to know of method ``name``: families, drawing, benchmark variants, event
    steps of its default config.

    >>> describe("adaspa").event_steps
    (10, 30)
    """
    cls = get_method_class(name)
    return MethodInfo(
        name=name,
        config_cls=cls.config_cls,
        families=cls.families,
        drawing=cls.drawing,
        benchmarks=dict(cls.benchmarks),
        event_steps=tuple(cls.event_steps(cls.config_cls())),
        steady_step=cls.steady_step,
        small_example=dict(cls.small_example),
        lossless_example=dict(cls.lossless_example),
    )


def benchmark_variants(benchmark: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every variant of every method taking part in ``benchmark``, in registration order: label ->
    (method name, config fields over its defaults); a variant without a label is named by its method.

    >>> benchmark_variants("tiny")["gna-small"]
    ('gna', {'kernel_size': (5, 8, 8), 'stride': (1, 4, 4)})
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in method_names(benchmark=benchmark):
        for variant in get_method_class(name).benchmarks[benchmark]:
            label = variant.label or name
            if label in out:
                raise ValueError(f"benchmark {benchmark!r} has two variants labelled {label!r}; give them distinct labels")
            out[label] = (name, dict(variant.fields))
    return out


def get_method_class(name: str) -> type[AttentionMethod]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {method_names()}")
    return _REGISTRY[name]


def make_config(name: str, config: MethodConfig | dict | None = None, **fields: Any) -> MethodConfig:
    """Build the config of method ``name`` from a config object, a dict and/or keyword fields."""
    cls = get_method_class(name).config_cls
    if isinstance(config, MethodConfig):
        if not isinstance(config, cls):
            raise TypeError(f"method {name!r} takes a {cls.__name__}, got {type(config).__name__}")
        return config.replace(**fields) if fields else config
    data = dict(config or {})
    data.update(fields)
    return cls.from_dict(data)
