"""A private method for tests: dense attention that records what every call was told."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffattn.methods import AttentionMethod, MethodConfig, register_method


@dataclass(frozen=True)
class RecordConfig(MethodConfig):
    """Dense attention that records the context of every call (for checking what processors publish)."""


@register_method
class RecordMethod(AttentionMethod):
    """``calls`` holds one dict per call (kept across resets); ``resets`` counts the resets after the first."""

    name = "_test_record"
    config_cls = RecordConfig

    def reset(self):
        self.calls = getattr(self, "calls", [])
        self.resets = getattr(self, "resets", -1) + 1

    def attend(self, q, k, v, ctx):
        self.calls.append(
            dict(key=ctx.cache_key, layer=ctx.layer, step=ctx.step, branch=ctx.branch, grid=ctx.grid,
                 text_len=ctx.text_len, num_steps=ctx.num_steps, batch=q.shape[0], layer_index=ctx.layer_index,
                 block_input=ctx.block_input, latent_grid=ctx.latent_grid)
        )
        mask = None if ctx.key_padding is None else ctx.key_padding[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale)
