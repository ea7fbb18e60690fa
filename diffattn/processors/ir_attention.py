"""IR-Diffusion's attention processors (the method and its state: :mod:`diffattn.processors.ir`).

:class:`IRAttnProcessor` computes the self-attention of the target with reference keys, isolation
and reposition; :class:`IRCrossAttnProcessor` adds mutual cross-attention after the module's own;
:class:`SubjectMapProcessor` only accumulates subject-word attention maps for deriving regions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..patterns.regions import reposition
from .attention_body import AttentionBody

# ``state`` below is the IRState of processors/ir.py, which builds these processors: typed as Any so
# that the import runs one way.
IRState = Any

__all__ = ["IRAttnProcessor", "IRCrossAttnProcessor", "SubjectMapProcessor"]


def _attend(q, k, v, allowed, scale, want_probs, state=None):
    """Masked attention ``[B, H, Nq, D]``; with ``want_probs`` also the fp32 probabilities."""
    if not want_probs:
        mask = None if allowed is None else state.attention_mask(allowed)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype), probs


def _groups(state: "IRState", batch: int, layer: str, what: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch rows of the targets ``[G]`` and of the references ``[G * n]`` (groups of refs + target)."""
    n = state.regions.num_subjects
    if batch % (n + 1):
        raise ValueError(
            f"{what} got a batch of {batch} on {layer!r}, not a multiple of {n + 1} = {n} references + 1 "
            "target; the batch must be [refs..., target] per CFG half"
        )
    rows = torch.arange(batch, device=device).view(-1, n + 1)
    return rows[:, -1], rows[:, :-1].flatten()


class IRAttnProcessor:
    """Self-attention processor of one UNet ``attn1`` module with reference/isolation/reposition.

    The batch must be ``G`` groups of ``[ref_0, ..., ref_{n-1}, target]`` (``G = 2`` with CFG: the
    unconditional and conditional halves keep that order each). Reference rows get ordinary
    self-attention; the target row gets the IR attention described in :mod:`diffattn.processors.ir`.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: "IRState", layer_index: int, layer_name: str = "") -> None:
        self.state = state
        self.layer_index = layer_index
        self.layer_name = layer_name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                f"IRAttnProcessor on {self.layer_name!r} got encoder_hidden_states/attention_mask; "
                "install it on self-attention (attn1) modules only"
            )
        st = self.state
        body = AttentionBody(attn, hidden_states, temb)
        q = body.query()
        k, v = body.key_value()

        use_ref = st.regions is not None and st.reference_active(self.layer_index)
        use_iso = (
            st.regions is not None
            and st.config.isolation
            and (st.config.isolate_every_layer or use_ref)
        )
        if not (use_ref or use_iso):
            out, probs = _attend(q, k, v, None, attn.scale, st.capture)
            if st.capture:
                self._record(q, k, probs, None, "plain")
        else:
            out = self._ir_attention(body, q, k, v, use_ref)
        return body.finish(out.to(q.dtype))

    def _ir_attention(self, body: AttentionBody, q, k, v, use_ref):
        st, attn = self.state, body.attn
        hidden_states = body.hidden_states
        n = st.regions.num_subjects
        bsz, n_tok, channels = hidden_states.shape
        tgt, refs = _groups(st, bsz, self.layer_name, "IR attention", q.device)
        if st.latent_hw is None:
            raise RuntimeError("IR attention needs the latent size; install it with IRAttention")
        h, w = st.grid(n_tok)
        plan = st.plan(h, w, q.device)
        ngroups = tgt.shape[0]

        out = torch.empty_like(q)
        o_ref, p_ref = _attend(q[refs], k[refs], v[refs], None, attn.scale, st.capture)
        out[refs] = o_ref
        q_t = q[tgt]
        if use_ref:
            ref_hs = hidden_states[refs].view(ngroups, n, n_tok, channels)
            if st.config.reposition:
                grid = ref_hs.transpose(-1, -2).reshape(ngroups, n, channels, h, w)
                moved = [
                    reposition(grid[:, i], plan.src[i], plan.dst[i], st.config.interpolation)
                    for i in range(n)
                ]
                ref_hs = torch.stack(moved, 1).flatten(3).transpose(-1, -2)
            k_r, v_r = body.key_value(ref_hs.reshape(ngroups * n, n_tok, channels))
            # [G*n, H, N, D] -> [G, H, n*N, D], subject-major like the mask's key order.
            k_r = k_r.view(ngroups, n, *k_r.shape[1:]).transpose(1, 2).flatten(2, 3)
            v_r = v_r.view(ngroups, n, *v_r.shape[1:]).transpose(1, 2).flatten(2, 3)
            keys = torch.cat([k_r, k[tgt]], dim=2)
            values = torch.cat([v_r, v[tgt]], dim=2)
            # use_ref without use_iso only happens with config.isolation off, which the plan reflects.
            allowed = st.reference_mask(plan.allowed_ref, h, w, n * n_tok, q.device)
        else:
            keys, values = k[tgt], v[tgt]
            allowed = plan.allowed_iso
        o_t, p_t = _attend(q_t, keys, values, allowed, attn.scale, st.capture, st)
        out[tgt] = o_t
        if st.capture:
            self._record(q_t, keys, p_t, allowed, "reference" if use_ref else "isolation",
                         q_ref=q[refs], k_ref=k[refs], probs_ref=p_ref, grid=(h, w))
        return out

    def _record(self, q, k, probs, allowed, kind, **extra):
        self.state.records.append(
            dict(layer=self.layer_name, layer_index=self.layer_index, step=self.state.step, kind=kind,
                 q=q.detach(), k=k.detach(), probs=probs.detach(), allowed=allowed, **extra)
        )


class IRCrossAttnProcessor:
    """Cross-attention (``attn2``) processor adding mutual cross-attention to the target rows.

    Runs the module's own processor, then in the target's subject region ``i`` blends its output with
    the output of the target's queries attending to reference ``i``'s text keys/values (same CFG
    half), weight ``config.mutual_cross_attention``. Reference rows and background cells keep the
    module's own output.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: "IRState", original, layer_name: str = "") -> None:
        self.state = state
        self.original = original
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        st = self.state
        lam = st.config.mutual_cross_attention
        if (
            lam <= 0.0
            or st.regions is None
            or encoder_hidden_states is None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or st.latent_hw is None
        ):
            return out
        n = st.regions.num_subjects
        bsz, n_tok, _ = hidden_states.shape
        tgt, refs = _groups(st, bsz, self.layer_name, "IR cross-attention", hidden_states.device)
        labels = st.plan(*st.grid(n_tok), hidden_states.device).labels
        body = AttentionBody(attn, hidden_states[tgt])
        g = tgt.shape[0]
        q = body.query().repeat_interleave(n, 0)  # row g*n + i: target of group g with reference i
        k, v = body.key_value(encoder_hidden_states[refs], encoder=True)  # [G*n, H, T, D]
        mutual = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).to(hidden_states.dtype)
        mutual = body.finish(mutual, residual=body.residual.repeat_interleave(n, 0)).view(g, n, n_tok, -1)
        # Per cell: the mutual output of its own subject; background cells keep their own output.
        own = labels.clamp_min(0)
        pick = mutual.gather(1, own.view(1, 1, n_tok, 1).expand(g, 1, n_tok, mutual.shape[-1]))[:, 0]
        weight = (labels >= 0).to(out.dtype).view(1, n_tok, 1) * lam
        out = out.clone()
        out[tgt] = out[tgt] + weight * (pick - out[tgt])
        return out


class SubjectMapProcessor:
    """Cross-attention processor that accumulates subject-token attention maps (no change to output).

    For every batch row listed in ``state.subject_maps["tokens"]`` (``{row: [[token ids of subject
    0], ...]}``) it adds, per subject, the head-averaged attention to those tokens, resized to the latent
    grid, into ``state.subject_maps["sum"][row]`` (``[n, H_lat, W_lat]``), counting layers in
    ``state.subject_maps["count"]``. Layers with more than ``max_tokens`` queries are skipped (fine
    layers are noisy and costly), as the official code aggregates the coarse layers.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: "IRState", original, max_tokens: int = 32 * 32) -> None:
        self.state = state
        self.original = original
        self.max_tokens = max_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        maps = self.state.subject_maps
        if encoder_hidden_states is None or hidden_states.ndim != 3 or not maps.get("tokens"):
            return out
        n_tok = hidden_states.shape[1]
        if n_tok > self.max_tokens or self.state.latent_hw is None:
            return out
        h, w = self.state.grid(n_tok)
        rows = sorted(maps["tokens"])
        body = AttentionBody(attn, hidden_states[rows])
        q = body.query().float()
        k = body.key_value(encoder_hidden_states[rows], encoder=True)[0].float()
        probs = (torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale).softmax(-1).mean(1)  # [R, N, T]
        for j, row in enumerate(rows):
            per_subject = torch.stack([probs[j][:, idx].sum(-1) for idx in maps["tokens"][row]])
            grid = per_subject.view(-1, 1, h, w)
            up = F.interpolate(grid, size=self.state.latent_hw, mode="bilinear", align_corners=False)[:, 0]
            maps["sum"][row] = maps["sum"].get(row, 0) + up  # on the device: no sync per layer
        maps["count"] = maps.get("count", 0) + 1
        return out
