"""The demo's config controls: a method's config dataclass as control descriptions, and control values
parsed back into the config (its own validation gives the error messages)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from ...methods import MethodConfig, VideoSparseMethod, get_method_class, make_config, method_names

__all__ = ["FieldSpec", "field_docs", "method_fields", "parse_controls", "demo_methods"]


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


def parse_controls(method: str, values: dict[str, Any]) -> MethodConfig:
    """Parse control ``values`` (``{field: value}``; missing fields keep defaults) into the config,
    built by :func:`diffattn.make_config`.

    Raises:
        ValueError: an unknown method or field, or a value the control or the config class rejects;
            the message names the method, the field and the fix.
    """
    if method not in method_names():
        raise ValueError(f"method={method!r} is unknown; choose one of {method_names()}")
    hints = typing.get_type_hints(get_method_class(method).config_cls)
    specs = {s.name: s for s in method_fields(method)[0]}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ValueError(f"{method}: no settable field(s) {unknown}; fields: {sorted(specs)}")
    parsed = {name: _parse_value(specs[name], hints[name], v) for name, v in values.items()}
    try:
        return make_config(method, parsed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{method}: {e}") from None


def demo_methods() -> list[str]:
    """Methods a video generation can compare against dense: the sparse video methods."""
    return [n for n in method_names() if issubclass(get_method_class(n), VideoSparseMethod)]
