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
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin

import torch

__all__ = [
    "MethodConfig",
    "AttnContext",
    "AttentionMethod",
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
    into ``[B, total, ...]`` over the ranks (for rules that compare heads); both None otherwise.
    """

    layer: str = ""
    layer_index: int = 0
    num_layers: int = 1
    is_self: bool = True
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
    record: Callable[..., None] = field(default=lambda **kw: None, repr=False)

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


# -------------------------------------------------------------------------------------------- methods
class AttentionMethod:
    """Runtime side of a method: holds config and mutable state; ``attend`` computes attention.

    Subclasses set ``name`` and ``config_cls`` and implement :meth:`attend`. State that lives across
    calls (caches, counters) is cleared by :meth:`reset`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

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


def method_names() -> list[str]:
    """Registered public method names (names starting with "_" are private, e.g. test fixtures)."""
    return [n for n in _REGISTRY if not n.startswith("_")]


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
