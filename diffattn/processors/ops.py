"""``diffattn::attend``: the core attention of a patched layer as one opaque operator.

Under ``torch.compile`` the processor's Python around the attention call is traced, but the method
itself (step schedule, planning, layout caches, searches, calibration, statistics rows) must run on
the host at run time with real tensors, and nothing it decides may become a Dynamo guard. So the
traced code only calls this operator with ``q, k, v`` (SDPA layout), the optional attention mask and
block input, two static ints: the model state's handle and the layer index, and under context
parallelism the static head range the rank holds. At run time the
operator finds the model state and runs the layer's method eagerly. The denoiser's forward pre-hook
is traced too; compiled, it calls ``diffattn::begin_forward``, which advances the schedule at run
time (step, branch and step count from the pipeline's cache context or the timestep) and returns an
empty token that every ``attend`` of the forward takes, so the order holds in any backend. The fake
implementation only states the output shape, so the graph has no break around it.

Eager calls skip the operator and run the same function directly (a dispatcher round trip per call
would hide the method's aten ops from ``TorchDispatchMode`` and cost a few microseconds).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Optional

import torch

__all__ = ["register_state", "unregister_state", "state_for", "begin_forward", "attend"]

_states: dict[int, "weakref.ref[Any]"] = {}
_handles = itertools.count(1)
_impl: Callable[..., torch.Tensor] | None = None


def register_state(state: Any) -> int:
    """A new handle for ``state`` (a copy of a state gets its own, see ``ModelState.__deepcopy__``)."""
    handle = next(_handles)
    _states[handle] = weakref.ref(state)
    return handle


def unregister_state(handle: int) -> None:
    _states.pop(handle, None)


def state_for(handle: int) -> Any:
    ref = _states.get(handle)
    state = None if ref is None else ref()
    if state is None:
        raise RuntimeError(
            f"diffattn: the compiled graph refers to a model state (handle {handle}) that no longer "
            "exists; diffattn.remove(...) was called on this model: compile it again (torch.compile) "
            "or apply the method again"
        )
    return state


def set_impl(fn: Callable[..., torch.Tensor]) -> None:
    global _impl
    _impl = fn


@torch.library.custom_op("diffattn::begin_forward", mutates_args=())
def begin_forward(
    like: torch.Tensor, timestep: Optional[torch.Tensor], handle: int, grid: list[int]
) -> torch.Tensor:
    """Advance the model's schedule for one compiled forward (what the eager pre-hook does); returns an
    empty token every ``attend`` of the forward takes, so that this runs first and is never dropped."""
    state_for(handle).begin_values(tuple(grid) if grid else None, timestep)
    return like.new_empty(0)


@begin_forward.register_fake
def _begin_forward_fake(like, timestep, handle, grid):
    return like.new_empty(0)


@torch.library.custom_op("diffattn::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    block_input: Optional[torch.Tensor],
    scale: Optional[float],
    enable_gqa: bool,
    handle: int,
    layer: int,
    token: Optional[torch.Tensor],
    heads: Optional[list[int]] = None,
) -> torch.Tensor:
    state = state_for(handle)
    attn = state.layers[layer]
    out = _impl(state, attn, attn.processor, q, k, v, attn_mask, block_input, scale, enable_gqa, heads)
    # An operator's output may not alias its inputs (a method may hand back a view of one), and its
    # strides must be those the fake implementation states (contiguous).
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    return out.clone(memory_format=torch.contiguous_format) if out.untyped_storage().data_ptr() in inputs else out.contiguous()


@attend.register_fake
def _attend_fake(q, k, v, attn_mask, block_input, scale, enable_gqa, handle, layer, token, heads=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
