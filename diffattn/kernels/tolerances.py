"""The one tolerance policy for numerical comparisons against fp32 references.

Kernel outputs are compared with a reference computed in fp32 from the *same* (already rounded)
inputs, so the error budget is the kernel's own arithmetic: fp32 accumulation with the inputs' dtype
for the matmul operands, and the final cast of ``o`` to the input dtype. Loosening an entry is a
decision to write down here, with the reason — not a fix for a failing test.

The tests (``tests/tolerances.py``) and ``diffattn bench gpu`` both read this module.
"""

import torch

# (atol, rtol) for attention outputs of magnitude ~1.
OUTPUT_TOL = {
    torch.float32: (2e-5, 2e-5),
    # P is rounded to fp16 before P@V (as flash kernels do) and o is cast to fp16: ~2 ulp at 1.0.
    torch.float16: (2e-3, 2e-3),
    # bf16 keeps 8 mantissa bits: one rounding of P and one of o is ~2 * 2**-8.
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# LSE is accumulated in fp32 from scores of rounded inputs.
LSE_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# Block attention mass (sums of up to block_q*block_k probabilities, each exp(s - lse) <= 1): scores
# are fp32 dot products of the same rounded inputs, so only fp32 exp/summation order differs.
MASS_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 1e-4),
}

# Whole-model comparisons (fp32 models): our dense path vs the model's own SDPA.
MODEL_TOL = (1e-4, 1e-4)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output"):
    table = {"lse": LSE_TOL, "mass": MASS_TOL}.get(what, OUTPUT_TOL)
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False)


# Quantized attention (diffattn/kernels/quant.py) vs fp32 masked attention: relative L2 error
# of the output, keyed by (qk_bits, pv_bits) and input kind. These are not rounding slack but the
# documented accuracy of each scheme, measured on the test inputs (seeded) and given ~1.5x headroom:
# "random" = i.i.d. Gaussian q, k, v (diffuse attention, the hard case for per-tile P scales);
# "structured" = diffattn.patterns.synthetic DiT-like inputs. The proved worst-case bounds are
# checked separately (quantization_error_bound).
QUANT_REL_L2 = {
    (8, None): {"random": 0.018, "structured": 0.008},
    (8, 8): {"random": 0.021, "structured": 0.010},
    (8, 4): {"random": 0.19, "structured": 0.07},
    (4, 8): {"random": 0.32, "structured": 0.15},
}

# A quantized path vs its plain-PyTorch oracle (diffattn/kernels/naive_quant.py): the Triton kernel vs
# online_quantized_attention (same int8 operands, scores formed in the same order), the "torch"
# backend's quantized path vs naive_quantized_attention (same rounding grids, scores summed in another
# order). OUTPUT_TOL / LSE_TOL (summation order) apply, except that a score or exp may differ by an
# ulp and move an entry of P across a rounding boundary of its grid. Such a row moves by at most
# vmax / (2**pv_bits - 1) (one level of a grid no finer than that, divided by the row sum l >= 1); at
# most this fraction of rows may do so.
QUANT_LEVEL_FLIP_ROWS = 0.01


def assert_quant_close(o, ref_o, v, keep, pv_bits, lse=None, ref_lse=None):
    """Quantized output ``o`` (and ``lse``, if given) vs its oracle under the policy above; ``keep`` is
    the bool token mask ``[B|1, H|1, Nq, Nk]`` the attention used and ``v`` its values (which bound
    how far a row may move)."""
    atol, rtol = OUTPUT_TOL[o.dtype]
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without keys differ"
        la, lr = LSE_TOL[torch.float32]
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=la, rtol=lr)
    err = ((o.float() - ref_o.float()).abs() - rtol * ref_o.float().abs()).amax(-1)
    off = err > atol
    assert off.float().mean() <= QUANT_LEVEL_FLIP_ROWS, f"{int(off.sum())} of {off.numel()} rows differ"
    if off.any():
        levels = 1 if pv_bits is None else 2**pv_bits - 1
        keep = keep.expand(*o.shape[:2], -1, -1)
        vmax = torch.where(keep, v.float().abs().amax(-1)[:, :, None, :], torch.zeros((), device=v.device)).amax(-1)
        assert (err[off] <= vmax[off] / levels + atol).all(), "a row moved by more than one P level"
