"""Block inputs for methods that match tokens on them (ToMe for SD, AgentSD).

tomesd and AgentSD compare tokens by the ``hidden_states`` a UNet transformer block receives (before
``norm1``), which the attention call never sees. A forward pre-hook on each
``BasicTransformerBlock`` whose ``attn1`` diffattn replaces keeps that tensor, keyed by the ``attn1``
layer name, until the block returns; the processor hands it to the method as ``ctx.block_input``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["watch_block_inputs"]


def watch_block_inputs(model: torch.nn.Module, names: dict[int, tuple[str, int]], store: dict[str, Any]) -> list:
    """Hook every UNet transformer block whose ``attn1`` is in ``names``; returns the hook handles.

    ``store[layer name]`` holds the block's input while the block runs (nothing is kept afterwards).
    """
    from diffusers.models.attention import BasicTransformerBlock

    handles = []
    for block in model.modules():
        attn = getattr(block, "attn1", None)
        if not isinstance(block, BasicTransformerBlock) or attn is None or id(attn) not in names:
            continue
        layer = names[id(attn)][0]

        def keep(mod, args, kwargs, layer=layer):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                store[layer] = x

        def drop(mod, args, output, layer=layer):
            store.pop(layer, None)

        handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
        handles.append(block.register_forward_hook(drop))
    return handles
