"""The attention context a method is called with in unit tests (no model, no processor)."""

from __future__ import annotations

from diffattn.methods import AttnContext


def video_ctx(step, records=None, *, num_steps, grid, layer="l0", branch=0, text_len=0, text_first=True):
    """An :class:`AttnContext` for one call on a latent ``grid`` at ``step`` of ``num_steps``; what the
    method records is appended to ``records`` (when given) as ``{"step", "key": (layer, branch), ...}``."""

    def sink(**kw):
        if records is not None:
            records.append({"step": step, "key": (layer, branch), **kw})

    return AttnContext(
        layer=layer, grid=grid, step=step, num_steps=num_steps, branch=branch, text_len=text_len,
        text_first=text_first, record=sink,
    )
