"""Optional dependencies: each feature beyond generating videos has its own extra in ``pyproject.toml``.

:func:`need` imports a module of an extra or raises :class:`MissingExtra`, whose message is the one
line to show a user: what needs it and the ``pip install`` that brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "need"]

# extra -> what it enables (the pyproject.toml extras of the same name list the packages)
EXTRAS = {
    "video": "writing mp4 files",
    "edit": "the editing pipelines (FateZero, IR-Diffusion) and the tiny Stable Diffusion model",
    "plot": "drawing attention patterns and benchmark plots",
    "demo": "the Gradio demo",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; ``str(exc)`` is one line naming the extra."""

    def __init__(self, extra: str, feature: str, module: str) -> None:
        self.extra = extra
        self.module = module
        super().__init__(f'{feature} needs the "{extra}" extra ({module} is not installed): '
                         f'pip install "diffattn[{extra}]"')


def need(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming ``extra`` when it is absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the module exists but one of its own dependencies is broken: show that error
        raise MissingExtra(extra, feature or EXTRAS[extra], top) from None
