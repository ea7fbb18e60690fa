"""Block inputs for methods that match tokens on them (ToMe for SD, AgentSD).

tomesd and AgentSD compare tokens by the ``hidden_states`` a UNet transformer block receives (before
``norm1``), which the attention call never sees. A forward pre-hook on each
``BasicTransformerBlock`` whose ``attn1`` diffattn replaces keeps that tensor in a slot on the ``attn1``
module until the block returns; the processor hands it to the method as ``ctx.block_input``. The hooks are
small objects that hold their module, so ``copy.deepcopy`` of the model carries working hooks.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["watch_block_inputs", "unwatch_block_inputs", "block_input_of"]

_ATTR = "_diffattn_block_input"


class _Slot:
    """Holds the running block's input. One per watched ``attn1``, set once on the host: the hooks only
    change its ``value``, which Dynamo traces (writing a module's ``__dict__`` breaks the graph)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _KeepBlockInput:
    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn

    def __call__(self, mod, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            self.attn.__dict__[_ATTR].value = x


class _DropBlockInput:
    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn

    def __call__(self, mod, args, output):
        self.attn.__dict__[_ATTR].value = None


def watch_block_inputs(model: torch.nn.Module, is_target) -> list[tuple[torch.nn.Module, int, int]]:
    """Hook every UNet transformer block whose ``attn1`` satisfies ``is_target(attn1)``.

    Returns ``(block, pre hook id, post hook id)`` triples for :func:`unwatch_block_inputs`.
    """
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:  # pragma: no cover - diffusers is a dependency of every patched model
        return []
    found = []
    for block in model.modules():
        attn = getattr(block, "attn1", None)
        if not isinstance(block, BasicTransformerBlock) or attn is None or not is_target(attn):
            continue
        attn.__dict__[_ATTR] = _Slot()
        pre = block.register_forward_pre_hook(_KeepBlockInput(attn), with_kwargs=True)
        post = block.register_forward_hook(_DropBlockInput(attn))
        found.append((block, pre.id, post.id))
    return found


def unwatch_block_inputs(model: torch.nn.Module) -> None:
    """Remove the hooks :func:`watch_block_inputs` put on ``model``'s blocks (found by their type)."""
    for block in model.modules():
        for hooks in (block._forward_pre_hooks, block._forward_hooks):
            for hid in [h for h, fn in hooks.items() if isinstance(fn, (_KeepBlockInput, _DropBlockInput))]:
                hooks.pop(hid)
                block._forward_pre_hooks_with_kwargs.pop(hid, None)
        attn = getattr(block, "attn1", None)
        if isinstance(attn, torch.nn.Module):
            attn.__dict__.pop(_ATTR, None)


def block_input_of(attn: torch.nn.Module) -> Any:
    """The input of the block ``attn`` belongs to, while that block runs (else None)."""
    slot = attn.__dict__.get(_ATTR)
    return None if slot is None else slot.value
