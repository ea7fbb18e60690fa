"""Fast block-sparse attention on CPUs: a small C++ kernel built once per machine, on PyTorch's BLAS.

One task per (batch, head, query block) runs an online softmax over the listed key blocks. Runs of
consecutive key blocks are contiguous rows of K and V, so each run is one matrix multiply on the
tensors in place — nothing is gathered — and the time follows the number of listed blocks (radial
bands, neighbourhood tiles and sliding windows are runs; random layouts are runs of one block).

The kernel (``cpu_kernel.cpp`` next to this file) is compiled with ``torch.utils.cpp_extension`` the
first time it is needed and cached by PyTorch (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), keyed by the source and the CPU's vector capability; later processes
load it in well under a second. Where no compiler works, :func:`cpu_kernel` returns ``None`` and logs
once why; :mod:`diffattn.kernels.api` then keeps its plain-PyTorch paths.

>>> import torch
>>> from diffattn.kernels import BlockSparseLayout
>>> q = k = v = torch.randn(1, 2, 300, 64)
>>> layout = BlockSparseLayout.dense(1, 1, 300, 300)
>>> o, lse = sparse_cpu_attention(q, k, v, layout, scale=64**-0.5)  # doctest: +SKIP (the first call builds the kernel)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from .layout import BlockSparseLayout

__all__ = ["cpu_kernel", "build_seconds", "sparse_cpu_attention", "MAX_COLS"]

logger = logging.getLogger("diffattn")
_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# Keys per matrix multiply: long enough for BLAS to run near peak, short enough that a 64 x 512 fp32
# score tile (128 KiB) stays in L2.
MAX_COLS = 512
_state: dict = {}


def _flags() -> tuple[str, list[str]]:
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return cap, flags


def cpu_kernel():
    """The compiled kernel module, building it on first use; ``None`` (logged once) if it cannot be built.

    ``DIFFATTN_CPU_KERNEL=0`` turns it off (the plain-PyTorch paths run instead).
    """
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("DIFFATTN_CPU_KERNEL", "1") == "0":
        logger.info("diffattn: DIFFATTN_CPU_KERNEL=0, block-sparse attention on CPU uses the PyTorch paths")
    else:
        cap, flags = _flags()
        digest = hashlib.sha1(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            load(
                name=f"diffattn_cpu_{cap.lower()}_{digest}",
                sources=[str(_SOURCE)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            module = torch.ops.diffattn_cpu
        except Exception as exc:  # no compiler, no BLAS symbol, read-only cache, ...
            logger.warning(
                "diffattn: the C++ CPU block-sparse kernel could not be built (%s: %s); block-sparse attention "
                "on CPU falls back to the plain-PyTorch paths (several times slower). Install a C++ compiler "
                "(e.g. g++) and ninja to enable it.",
                type(exc).__name__,
                str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
            )
        else:
            _state["build_s"] = time.perf_counter() - t0
            logger.info("diffattn: C++ CPU block-sparse kernel ready (%.1f s to build or load)", _state["build_s"])
    _state["module"] = module
    return module


def build_seconds() -> float | None:
    """Seconds the first :func:`cpu_kernel` call took to build or load the kernel (``None`` if not built)."""
    return _state.get("build_s")


def sparse_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    max_cols: int = MAX_COLS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the C++ kernel (which must be available, see :func:`cpu_kernel`).

    Computes in fp32 whatever the inputs' dtype (exact against the fp32 reference); returns ``o`` in
    q's dtype ``[B, H, Nq, Dv]`` and ``lse`` float32 ``[B, H, Nq]``; rows with nothing kept give zeros
    and ``-inf``.
    """
    module = cpu_kernel()
    if module is None:
        raise RuntimeError("the C++ CPU kernel is not available (see the log); use backend='torch' paths")
    qf, kf, vf = (t.float().contiguous() for t in (q, k, v))
    if layout.kv_mask_ids is None:
        ids, masks = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bool)
    else:
        ids, masks = layout.kv_mask_ids.contiguous(), layout.block_masks.contiguous()
    o, lse = module.forward(
        qf, kf, vf, layout.kv_indices.contiguous(), layout.kv_counts.contiguous(), ids, masks,
        scale, layout.block_q, layout.block_k, max(int(max_cols), layout.block_k),
    )
    return o.to(q.dtype), lse
