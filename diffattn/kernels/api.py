"""Public kernel entry points and backend dispatch.

``block_sparse_attention`` runs on one of several backends. Each is an object whose
``can_run(q, k, v, layout, qk_bits, pv_bits)`` says, from the tensors' device, dtype and the layout's
blocks alone (never their values), whether it can serve the call, and if not why. The ``backend``
argument names a family; ``"auto"`` tries the families in order of speed. The backend chosen and
every fallback are logged once; a request no backend of the family can serve raises with the fix.

* ``"triton"`` — our block-sparse flash kernel (CUDA; on CPU only under ``TRITON_INTERPRET=1``), and
  for quantized calls (``qk_bits`` set) the INT8 kernel of :mod:`diffattn.kernels.triton_quant`.
* ``"torch"``  — the CPU path; it picks per problem (same result on every path, see :func:`cpu_path`):

  - ``"dense"``: a layout listing every block with no partial ones runs PyTorch's fused CPU attention;
  - ``"masked"``: problems whose token mask has at most :data:`CPU_MASKED_MAX_ELEMENTS` entries and
    whose density is above :data:`CPU_KERNEL_MAX_DENSITY_SMALL` run the fused CPU attention under the
    exact token mask (every score computed, but no per-block overhead);
  - ``"kernel"``: everything else runs the C++ block-sparse kernel of :mod:`diffattn.kernels.cpu`
    (time proportional to the listed blocks);
  - ``"gathered"``: without a C++ compiler (logged once) the plain-PyTorch gather of listed key
    blocks, or ``"masked"`` where the mask is small. On CUDA ``"torch"`` always gathers.

  Quantized calls run :func:`diffattn.kernels.quant.quantized_block_sparse_attention` (P rounded
  against the final row max, where the Triton kernel rounds online; both within their bounds).
* ``"flex"``   — PyTorch FlexAttention with ``BlockMask.from_kv_blocks``, compiled on CUDA: an
  alternative and the baseline to beat. On CPU it runs eagerly (exact, but ``Nq x Nk`` memory).
  No quantized path.
* ``"auto"``   — ``triton`` on CUDA where it can serve the call, else ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from ._tuning import MAX_TILE, interpreting
from .layout import BlockSparseLayout, check_block
from .cpu import cpu_kernel, sparse_cpu_attention
from .torch_attention import gathered_block_attention, masked_cpu_attention

__all__ = [
    "block_sparse_attention", "block_mass", "available_backends", "resolve_backend", "select_backend", "BACKENDS",
]

logger = logging.getLogger("diffattn")
BACKENDS = ("auto", "triton", "torch", "flex")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_logged: set[str] = set()
# The "torch" backend on CPU computes densely under the token mask while the mask (``LB*LH*Nq*Nk``
# entries of the layout's broadcast shape) stays this small; 0 always gathers blocks.
CPU_MASKED_MAX_ELEMENTS = 1 << 25
# Below this density the C++ kernel beats the masked dense shortcut even on small problems: its time is
# about 1.3-1.5x density times dense attention's (measured on a 2-core x86 machine, N 1,024-32,760).
CPU_KERNEL_MAX_DENSITY_SMALL = 0.6
CPU_PATHS = ("dense", "masked", "kernel", "gathered")
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


triton_interpret = interpreting


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _has_flex() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the torch build
        return False
    return True


def can_run(backend: str, device: torch.device, raise_error: bool = False) -> bool:
    """Whether the ``backend`` family can run on ``device`` at all (a call's block sizes and
    quantization are for each :class:`Backend`'s ``can_run``); with ``raise_error`` say why not."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = None
    if backend == "triton":
        reason = _triton_reason(device)
    elif backend == "flex" and not _has_flex():
        # Off CUDA FlexAttention runs eagerly: still exact (our mask_mod encodes the layout), but it
        # materialises Nq x Nk scores, so "auto" never picks it there.
        reason = "this torch build has no torch.nn.attention.flex_attention; upgrade torch or use 'torch'"
    if reason is not None and raise_error:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    return reason is None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if can_run(b, device)]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        can_run(backend, device, raise_error=True)
        return backend
    if device.type == "cuda" and can_run("triton", device):
        log_once("auto-triton", "diffattn: block-sparse attention uses the Triton kernel (CUDA)")
        return "triton"
    why = "no CUDA device" if device.type != "cuda" else "Triton is not installed"
    log_once("auto-torch-resolve", f"diffattn: block-sparse attention falls back to the PyTorch path ({why})")
    return "torch"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and heads must match and "
            "k, v must have the same length"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be <= {_MAX_HEAD_DIM}, got {q.shape[-1]} / {v.shape[-1]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class Backend:
    """One way to compute ``block_sparse_attention``; ``family`` is the ``backend=`` value it serves."""

    name: str
    family: str
    quantized: bool = False

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None) -> str | None:
        """``None`` if this backend can serve the call, else why not and how to get there. Reads
        devices, dtypes and block sizes only: it runs on every call and must not wait on the device."""
        raise NotImplementedError

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        raise NotImplementedError


def _triton_reason(device: torch.device) -> str | None:
    if not _has_triton():
        return "Triton is not installed; `pip install triton` (Linux) or use backend='torch'"
    if device.type != "cuda" and not triton_interpret():
        return (
            f"the Triton kernel needs CUDA tensors, got {device.type}; move inputs to a GPU, set "
            "TRITON_INTERPRET=1 (slow, for tests) or use backend='torch'"
        )
    return None


class _Triton(Backend):
    name, family = "triton", "triton"

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None):
        if layout.block_k > MAX_TILE:
            return (
                f"its key tile is the layout's key block, at most {MAX_TILE}, got {layout.block_k}; use smaller blocks"
            )
        return _triton_reason(q.device)

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        from .triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, layout, scale)


class _TritonQuant(Backend):
    name, family, quantized = "triton-quant", "triton", True

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None):
        if qk_bits is None:
            return "the quantized kernel needs integer Q·Kᵀ (qk_bits=8 or 4); P-only quantization runs on 'torch'"
        if max(layout.block_q, layout.block_k) > MAX_TILE:
            return (
                f"its tiles are the layout's blocks, at most {MAX_TILE}, got {layout.block_q} x {layout.block_k}; "
                "use smaller blocks"
            )
        return _triton_reason(q.device)

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        from .triton_quant import triton_quantized_block_sparse_attention

        return triton_quantized_block_sparse_attention(q, k, v, layout, scale, qk_bits, pv_bits)


class _Flex(Backend):
    name, family = "flex", "flex"

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None):
        return None if can_run("flex", q.device) else "this torch build has no FlexAttention; use 'torch'"

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        from .flex import flex_block_sparse_attention

        return flex_block_sparse_attention(q, k, v, layout, scale)


class _Torch(Backend):
    name, family = "torch", "torch"

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None):
        return None

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        path = cpu_path(q, k, v, layout)
        if path == "dense":
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
            return o, lse.float()
        if path == "masked":
            return masked_cpu_attention(q, k, v, layout, scale)
        if path == "kernel":
            return sparse_cpu_attention(q, k, v, layout, scale)
        return gathered_block_attention(q, k, v, layout, scale)


class _TorchQuant(Backend):
    name, family, quantized = "torch-quant", "torch", True

    def can_run(self, q, k, v, layout, qk_bits=None, pv_bits=None):
        return None

    def run(self, q, k, v, layout, scale, qk_bits=None, pv_bits=None):
        from .quant import quantized_block_sparse_attention

        return quantized_block_sparse_attention(q, k, v, layout, scale, qk_bits, pv_bits)


BACKEND_IMPLS: tuple[Backend, ...] = (_Triton(), _TritonQuant(), _Flex(), _Torch(), _TorchQuant())


def _auto_families(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "torch")
    log_once("auto-torch", "diffattn: block-sparse attention uses the PyTorch path (no CUDA device)")
    return ("torch",)


def select_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout,
    qk_bits: int | None = None, pv_bits: int | None = None,
) -> Backend:
    """The backend that serves this call: the first of the requested family (for ``"auto"``: Triton on
    CUDA, then torch) whose ``can_run`` agrees. Logs the choice and any fallback once; raises when the
    family named cannot serve the call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    quantized = qk_bits is not None or pv_bits is not None
    families = (backend,) if backend != "auto" else _auto_families(q.device)
    refused = []
    for family in families:
        impls = [i for i in BACKEND_IMPLS if i.family == family and i.quantized == quantized]
        if not impls:
            refused.append(f"{family!r} has no quantized path; use backend='triton' (CUDA) or 'torch'")
        for impl in impls:
            why = impl.can_run(q, k, v, layout, qk_bits, pv_bits)
            if why is None:
                if refused:
                    log_once(
                        f"fallback-{impl.name}-{refused[0]}",
                        f"diffattn: block-sparse attention falls back to {impl.name!r} ({refused[0]})",
                    )
                else:
                    log_once(f"backend-{impl.name}", f"diffattn: block-sparse attention uses {impl.name!r}")
                return impl
            refused.append(f"{impl.name} cannot run it: {why}")
    raise RuntimeError(f"backend={backend!r} cannot run this call: " + "; ".join(refused))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float | None = None,
    return_lse: bool = True,
    backend: str = "auto",
    qk_bits: int | None = None,
    pv_bits: int | None = None,
):
    """Block-sparse softmax attention over the key blocks listed in ``layout``.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]`` (fp16, bf16 or fp32; ``Nq != Nk`` allowed; lengths
            need not be multiples of the block; ``D <= 256``).
        layout: a :class:`BlockSparseLayout` with ``ceil(Nq/block_q)`` query blocks and
            ``ceil(Nk/block_k)`` key blocks (batch/head dims 1 or matching).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp per query.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"flex"``.
        qk_bits: 8 or 4 for integer Q·Kᵀ with per-block scales (see :mod:`diffattn.kernels.quant`);
            None (default) keeps the inputs' precision.
        pv_bits: 8 or 4 to quantize P for P·V; None (default) keeps it unrounded.

    Returns:
        ``o`` ``[B, H, Nq, D]`` in q's dtype, and (if ``return_lse``) ``lse`` float32 ``[B, H, Nq]``.
        Rows that select no block give zeros and ``lse = -inf``.

    >>> import torch
    >>> q = k = v = torch.randn(1, 2, 100, 64)
    >>> layout = BlockSparseLayout.dense(1, 1, 100, 100)
    >>> o, lse = block_sparse_attention(q, k, v, layout, backend="torch")
    >>> o.shape, lse.shape
    (torch.Size([1, 2, 100, 64]), torch.Size([1, 2, 100]))
    """
    check_qkv(q, k, v)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    for name, bits in (("qk_bits", qk_bits), ("pv_bits", pv_bits)):
        if bits not in (None, 4, 8):
            raise ValueError(f"{name} must be 8, 4 or None (no quantization), got {bits!r}")
    b, h, nq, d = q.shape
    layout.check_inputs(b, h, nq, k.shape[-2])
    if layout.kv_indices.device != q.device:
        layout = layout.to(q.device)
    scale = d**-0.5 if scale is None else float(scale)
    impl = select_backend(backend, q, k, v, layout, qk_bits, pv_bits)
    o, lse = impl.run(q, k, v, layout, scale, qk_bits, pv_bits)
    return (o, lse) if return_lse else o


def cpu_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockSparseLayout) -> str:
    """Which of :data:`CPU_PATHS` the ``"torch"`` backend runs for these inputs (see the module doc)."""
    if q.device.type != "cpu":
        return "gathered"
    fused = _HAS_CPU_FLASH and q.dtype == k.dtype == v.dtype and v.shape[-1] == q.shape[-1]
    # Both facts are host values kept on the layout: known when it was built, or read once.
    density = layout.density
    if fused and layout.is_full:
        return "dense"
    lb, lh = layout.kv_counts.shape[:2]
    small = fused and lb * lh * q.shape[-2] * k.shape[-2] <= CPU_MASKED_MAX_ELEMENTS
    if small and density > CPU_KERNEL_MAX_DENSITY_SMALL:
        return "masked"
    if cpu_kernel() is not None:
        return "kernel"
    return "masked" if small else "gathered"


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention mass of every (query block, key block) tile given each query's LSE.

    ``mass[b, h, i, j] = sum_{r in Qblk i, c in Kblk j} exp(q_r . k_c * scale - lse_r)`` as float32
    ``[B, H, Mq, Mk]``; one pass over ``Q K^T`` with no ``P V`` and no ``Nq x Nk`` buffer. With the true
    LSE each row of blocks sums to the number of valid queries in that block.

    ``backend`` is ``"auto"`` (Triton on CUDA for tiles up to 128, else PyTorch), ``"triton"`` or
    ``"torch"``; ``"flex"`` (no mass-only pass exists) is treated as ``"auto"``.
    """
    check_qkv(q, k, k)
    if not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, H, Nq] = {tuple(q.shape[:3])}, got {_describe(lse)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q on {q.device}; move lse to q's device")
    if not lse.is_floating_point():
        raise ValueError(f"lse must be a floating tensor (float32), got {lse.dtype}")
    check_block(block_q, "block_q")
    check_block(block_k, "block_k")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "flex":
        # FlexAttention has no mass-only pass; the speed-only backend choice falls back to "auto".
        log_once("mass-flex", "diffattn: block_mass has no 'flex' backend; using 'auto'")
        backend = "auto"
    name = resolve_backend(backend, q.device)
    if name == "triton" and backend == "auto" and max(block_q, block_k) > MAX_TILE:
        log_once("mass-big-block", "diffattn: block_mass tiles above 128 use the PyTorch path")
        name = "torch"
    if name == "triton":
        from .triton_block_mass import triton_block_mass

        return triton_block_mass(q, k, lse, block_q, block_k, scale)
    from .torch_attention import block_mass_torch

    return block_mass_torch(q, k, lse, block_q, block_k, scale)
