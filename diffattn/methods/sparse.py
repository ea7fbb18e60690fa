"""Shared machinery of the sparse video methods: text handling, warm-up, and the dense baseline.

A video method only plans attention among the ``F*H*W`` video tokens. Text tokens of a joint sequence
are always dense (every method keeps text rows and columns), so :class:`VideoSparseMethod` splits the
sequence: video queries get ``sparse(video keys)`` merged exactly (through LSEs) with ``dense(text keys)``,
and text queries attend densely to everything. Padded text keys (HunyuanVideo) are masked exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..kernels import BlockSparseLayout, block_sparse_attention, merge_attention
from ..patterns import check_block_size
from .base import DEFAULTS, AttentionMethod, AttnContext, MethodConfig, register_method

__all__ = [
    "DenseConfig", "DenseMethod", "KernelCall", "VideoSparseMethod", "capture_kernel_calls", "kernel_attention",
    "dense_layout",
]


class KernelCall(NamedTuple):
    """One block-sparse kernel call a method made: the exact (possibly permuted) inputs and layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: BlockSparseLayout
    scale: float | None


_kernel_calls: ContextVar[list | None] = ContextVar("diffattn_kernel_calls", default=None)


@contextmanager
def capture_kernel_calls() -> Iterator[list[KernelCall]]:
    """Collect every :class:`KernelCall` made inside the block (benchmarks replay them to time the kernel
    on a method's real layouts; ``capture_layouts`` keeps the last one's block mask for plots). The list
    holds references to the inputs, not copies. Nested blocks also report their calls to the outer one."""
    outer = _kernel_calls.get()
    calls: list[KernelCall] = []
    token = _kernel_calls.set(calls)
    try:
        yield calls
    finally:
        _kernel_calls.reset(token)
        if outer is not None:
            outer.extend(calls)


Backend = Literal["auto", "triton", "torch", "flex"]


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Dense attention through our own kernel at density 1.0 — the equivalence baseline.

    Attributes:
        block_size: tile size (tokens) of the kernel's blocks. Speed only.
        backend: kernel backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch" or "flex".
    """

    block_size: int = 64
    backend: Backend = "auto"

    def validate(self) -> None:
        check_block_size(self.block_size, "DenseConfig.block_size")


def check_warmup(config: MethodConfig) -> None:
    """Check a config's ``dense_layers`` and ``dense_steps`` (the warm-up of the static video methods)."""
    name = type(config).__name__
    if config.dense_layers < 0:
        raise ValueError(f"{name}.dense_layers must be >= 0, got {config.dense_layers}")
    if not 0 <= config.dense_steps <= 50:
        raise ValueError(f"{name}.dense_steps counts steps of a 50-step schedule; use 0..50, got {config.dense_steps}")


def warmup_layers_and_steps(method: "VideoSparseMethod", ctx: AttnContext) -> bool:
    """A ``use_dense``: dense in the first ``config.dense_layers`` layers and the first
    ``config.dense_steps`` steps (of 50, scaled to the run)."""
    cfg = method.config
    return ctx.layer_index < cfg.dense_layers or ctx.step < ctx.scaled_step(cfg.dense_steps)


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    calls = _kernel_calls.get()
    if calls is not None:
        calls.append(KernelCall(q, k, v, layout, scale))
    o, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, backend=backend)
    return o, lse


_DENSE_LAYOUTS: dict[tuple, BlockSparseLayout] = {}


def dense_layout(nq: int, nk: int, block: int, device: torch.device) -> BlockSparseLayout:
    """The all-blocks layout for one shape, built once (building and validating one reads the device)."""
    key = (nq, nk, block, str(device))
    layout = _DENSE_LAYOUTS.get(key)
    if layout is None:
        if len(_DENSE_LAYOUTS) >= 256:
            _DENSE_LAYOUTS.clear()
        layout = _DENSE_LAYOUTS[key] = BlockSparseLayout.dense(1, 1, nq, nk, block, block, device=device)
    return layout


_PADDING_LAYOUTS: dict[tuple, tuple[torch.Tensor, BlockSparseLayout]] = {}


def padding_layout(key_valid: torch.Tensor, nq: int, block: int) -> BlockSparseLayout:
    """``BlockSparseLayout.from_key_padding``, built once per mask: every layer of a forward shares the
    model's padding mask, and parsing it reads the device. Keyed by the mask's memory, view and version
    counter (an in-place change rebuilds); the entry keeps the mask alive so its memory is not reused."""
    key = (key_valid.data_ptr(), tuple(key_valid.shape), key_valid.stride(), key_valid._version, nq, block,
           str(key_valid.device))
    hit = _PADDING_LAYOUTS.get(key)
    if hit is not None:
        return hit[1]
    if len(_PADDING_LAYOUTS) >= 64:
        _PADDING_LAYOUTS.pop(next(iter(_PADDING_LAYOUTS)))
    layout = BlockSparseLayout.from_key_padding(key_valid, nq, block, block)
    _PADDING_LAYOUTS[key] = (key_valid, layout)
    return layout


def _key_valid(ctx: AttnContext, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    kp = ctx.key_padding
    if kp is None:
        return None
    if kp.shape != (b, n):
        kp = kp.expand(b, n)
    return kp.to(device=device, dtype=torch.bool)


def dense_with_padding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float | None,
    block: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``q`` over all valid keys, through the kernel (returns LSE)."""
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    if key_valid is None:
        layout = dense_layout(nq, nk, block, q.device)
    else:
        layout = padding_layout(key_valid, nq, block)
    return kernel_attention(q, k, v, layout, scale, backend)


@register_method
class DenseMethod(AttentionMethod):
    """Full attention through the block-sparse kernel with every block listed."""

    name = "dense"
    config_cls = DenseConfig
    families = ("video", "unet")
    benchmarks = {"quality": DEFAULTS}
    small_example = lossless_example = {"block_size": 16, "backend": "torch"}

    def attend(self, q, k, v, ctx):
        b, _, n, _ = q.shape
        valid = _key_valid(ctx, b, k.shape[-2], q.device)
        o, _ = dense_with_padding(q, k, v, valid, ctx.scale, self.config.block_size, self.config.backend)
        ctx.record(density=1.0)
        return o


class VideoSparseMethod(AttentionMethod):
    """Base for methods that plan attention among video tokens on the latent grid.

    Subclasses implement :meth:`video_attention` (sparse attention among video tokens, returning
    ``(o, lse)``) and may override :meth:`use_dense` for warm-up steps/layers.
    """

    families = ("video",)
    # Every video method is timed as a kernel and on the tiny model at its defaults unless it says otherwise.
    benchmarks = {"kernel": DEFAULTS, "tiny": DEFAULTS}

    def use_dense(self, ctx: AttnContext) -> bool:
        return False

    def video_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, q, k, v, ctx):
        b, h, n, d = q.shape
        cfg = self.config
        block = getattr(cfg, "block_size", 64)
        backend = getattr(cfg, "backend", "auto")
        valid = _key_valid(ctx, b, k.shape[-2], q.device)
        if ctx.grid is None or ctx.num_video + ctx.text_len != n or k.shape[-2] != n:
            ctx.record(fallback="no latent grid for this sequence; ran dense", density=1.0)
            return dense_with_padding(q, k, v, valid, ctx.scale, block, backend)[0]
        if self.use_dense(ctx):
            ctx.record(density=1.0, warmup=True)
            return dense_with_padding(q, k, v, valid, ctx.scale, block, backend)[0]

        vs, ts = ctx.video_slice(n), ctx.text_slice(n)
        qv, kv, vv = q[:, :, vs], k[:, :, vs], v[:, :, vs]
        if ctx.capture_layouts:
            # the demo and plots show the last layout computed: the sparse pattern actually run
            with capture_kernel_calls() as seen:
                o_v, lse_v = self.video_attention(qv, kv, vv, ctx)
            if seen:
                ctx.record(block_mask=ctx.real_heads(seen[-1].layout.to_block_mask()).cpu())
        else:
            o_v, lse_v = self.video_attention(qv, kv, vv, ctx)
        if ctx.text_len == 0:
            return o_v
        text_valid = None if valid is None else valid[:, ts]
        kt, vt = k[:, :, ts], v[:, :, ts]
        o_vt, lse_vt = dense_with_padding(qv, kt, vt, text_valid, ctx.scale, block, backend)
        o_v, _ = merge_attention(o_v, lse_v, o_vt, lse_vt)
        # Text queries are few: ordinary dense attention over all (valid) keys.
        mask = None if valid is None else valid[:, None, None, :]
        o_t = F.scaled_dot_product_attention(q[:, :, ts], k, v, attn_mask=mask, scale=ctx.scale)
        parts = (o_t, o_v) if ctx.text_first else (o_v, o_t)
        return torch.cat(parts, dim=2)
