"""Prompt files and ``--config`` values of ``diffattn generate``.

A ``.txt`` prompt file holds one prompt a line (blank lines and ``#`` comments skipped); a ``.jsonl``
file one object a line (``prompt`` and optional ``seed``, ``negative_prompt``, ``frames``,
``height``, ``width``, ``steps``, ``guidance``). ``--config`` values are JSON files or
``key=value`` fields.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PromptItem", "read_prompts", "parse_config", "slugify"]

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

