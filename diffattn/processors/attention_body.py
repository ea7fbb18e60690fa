"""The body of a diffusers ``Attention`` call around its core attention, for processors that compute
the core themselves (FateZero's explicit probability maps, IR-Diffusion's reference keys).

diffusers' ``AttnProcessor2_0`` runs, in order: spatial norm, ``[B, C, H, W] -> [B, N, C]``, group norm,
the projections (``norm_cross`` on the encoder states), heads split and qk-norm; then the core
attention; then heads merged, the output projection and dropout, the image shape restored, the
residual and ``rescale_output_factor``. :class:`AttentionBody` is that prologue and epilogue, so a
processor only writes what it changes in between.

>>> import torch
>>> from diffusers.models.attention_processor import Attention, AttnProcessor2_0
>>> attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
>>> x = torch.randn(2, 5, 16)
>>> body = AttentionBody(attn, x)
>>> q, (k, v) = body.query(), body.key_value()
>>> out = body.finish(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale))
>>> torch.allclose(out, AttnProcessor2_0()(attn, x), atol=1e-6)
True
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["AttentionBody"]


class AttentionBody:
    """One call's prologue and epilogue on ``attn``.

    Args:
        attn: the diffusers ``Attention`` module.
        hidden_states: the call's ``[B, N, C]`` or ``[B, C, H, W]`` input.
        temb: the time embedding the module's spatial norm reads (when it has one).

    Attributes:
        hidden_states: ``[B, N, C]`` after spatial and group norm: what ``to_q`` (and ``to_k``/``to_v``
            of a self-attention) project.
        residual: the input as given, added back by :meth:`finish` when the module has a residual.
    """

    def __init__(self, attn, hidden_states: torch.Tensor, temb: Optional[torch.Tensor] = None) -> None:
        self.attn = attn
        self.residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        self.image_shape = None
        if hidden_states.ndim == 4:
            self.image_shape = tuple(hidden_states.shape)
            b, c, h, w = self.image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.hidden_states = hidden_states

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, N, heads * D] -> [B, heads, N, D]``."""
        h = self.attn.heads
        return t.view(t.shape[0], -1, h, t.shape[-1] // h).transpose(1, 2)

    def query(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, heads, N, D]`` queries of ``x`` (default: :attr:`hidden_states`), qk-normed."""
        q = self.heads(self.attn.to_q(self.hidden_states if x is None else x))
        return q if self.attn.norm_q is None else self.attn.norm_q(q)

    def key_value(
        self, context: Optional[torch.Tensor] = None, encoder: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, heads, M, D]`` keys and values of ``context`` (default: :attr:`hidden_states`).

        ``encoder``: ``context`` is encoder (text) states, which take the module's ``norm_cross``.
        """
        attn = self.attn
        if context is None:
            context = self.hidden_states
        elif encoder and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        k, v = self.heads(attn.to_k(context)), self.heads(attn.to_v(context))
        return (k if attn.norm_k is None else attn.norm_k(k)), v

    def finish(self, out: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The module's output from the core attention's ``[B, heads, N, D]``.

        ``residual`` replaces :attr:`residual` for an output whose rows are not the input's.
        """
        attn = self.attn
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if self.image_shape is not None:
            out = out.transpose(-1, -2).reshape(out.shape[0], *self.image_shape[1:])
        if attn.residual_connection:
            out = out + (self.residual if residual is None else residual)
        return out / attn.rescale_output_factor
