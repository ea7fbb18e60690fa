"""Quantized Triton block-sparse kernel: equal to its online PyTorch reference, within the proved bound
of fp32 attention, on odd shapes, partial blocks and empty rows; PARO dispatches to it."""

import pytest
import torch

from diffattn.kernels import BlockSparseLayout, dense_masked_attention
from diffattn.kernels.naive_quant import online_quantized_attention, quantization_error_bound
from diffattn.patterns.synthetic import synthetic_qkv
from tests.tolerances import OUTPUT_TOL, QUANT_LEVEL_FLIP_ROWS, QUANT_REL_L2, assert_quant_close

B, H, N = 2, 3, 150  # 5 blocks of 32, the last one 22 tokens long
BLOCK = 32


# Where the launcher runs: CUDA when present, else the CPU interpreter (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel(q, k, v, layout, **kw):
    """The kernel on DEVICE, its outputs back on the inputs' device (where the references are)."""
    from diffattn.kernels.triton_quant import triton_quantized_block_sparse_attention

    o, lse = triton_quantized_block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout.to(DEVICE), **kw)
    return o.to(q.device), lse.to(q.device)


def _layout(density, seed=0, n=N, block=BLOCK, b=B, h=H):
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block)
    mask = torch.rand(b, h, m, m, generator=g) < density
    mask |= torch.eye(m, dtype=torch.bool)
    return BlockSparseLayout.from_block_mask(mask, block, block, n, n)


def _assert_matches_reference(o, lse, ref_o, ref_lse, v, layout, pv_bits):
    assert_quant_close(o, ref_o, v, layout.to_token_mask(o.shape[2], v.shape[2]), pv_bits, lse, ref_lse)


CASES = [
    # (head dim, density, qk_bits, pv_bits)
    (40, 1.0, 8, 8),
    (40, 1.0, 8, 4),
    (64, 0.3, 8, 8),
    (64, 0.3, 8, 4),
]


@pytest.mark.parametrize("d,density,qk,pv", CASES, ids=[f"D{c[0]}-dens{c[1]}-qk{c[2]}-pv{c[3]}" for c in CASES])
def test_kernel_equals_online_reference_and_stays_within_bound(d, density, qk, pv):
    torch.manual_seed(d)
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    k = k + 3.0  # a channel offset that the key smoothing must remove
    layout = _layout(density, seed=d)
    o, lse = _kernel(q, k, v, layout, qk_bits=qk, pv_bits=pv)
    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, qk_bits=qk, pv_bits=pv)
    _assert_matches_reference(o, lse, ref_o, ref_lse, v, layout, pv)

    fp_o, fp_lse = dense_masked_attention(q, k, v, layout)
    o_bound, lse_bound = quantization_error_bound(q, k, v, layout, qk_bits=qk, pv_bits=pv, online=True)
    slack = 1e-4  # fp32 rounding of the two computations, far below any bound here
    err = (o - fp_o).abs().amax(-1)
    assert (err <= o_bound + slack).all(), f"worst row exceeds its bound by {(err - o_bound).max():.3g}"
    assert ((lse - fp_lse).abs() <= lse_bound + slack).all()
    assert err.max() > 1e-5  # quantization does change the result
    rel = float((o - fp_o).norm() / fp_o.norm())
    assert rel <= QUANT_REL_L2[(qk, pv)]["random"], f"relative L2 error {rel:.4f}"


@pytest.mark.parametrize("pv", [8, 4, None], ids=["pv8", "pv4", "pvNone"])
def test_partial_blocks_and_empty_rows(pv):
    torch.manual_seed(1)
    b, h, n, d = 2, 3, 83, 40
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    token_mask = torch.rand(b, h, n, n) < 0.3
    token_mask[:, :, :20] = False  # rows with nothing kept
    token_mask[:, :, 40:45, :] = False
    layout = BlockSparseLayout.from_token_mask(token_mask, 32, 32)
    assert layout.has_partial
    o, lse = _kernel(q, k, v, layout, scale=0.2, qk_bits=8, pv_bits=pv)
    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, scale=0.2, qk_bits=8, pv_bits=pv)
    _assert_matches_reference(o, lse, ref_o, ref_lse, v, layout, pv)
    empty = ~token_mask.any(-1)
    assert torch.equal(o[empty], torch.zeros_like(o[empty]))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    fp_o, _ = dense_masked_attention(q, k, v, layout, scale=0.2)
    o_bound, _ = quantization_error_bound(q, k, v, layout, scale=0.2, qk_bits=8, pv_bits=pv, online=True)
    assert ((o - fp_o).abs().amax(-1) <= o_bound + 1e-4).all()


def test_structured_inputs_fp16_int4_qk():
    # DiT-like attention (3 x 10 x 10 = 300 tokens), fp16 operands, 4-bit Q·Kᵀ grid, block 64.
    q, k, v = (t.half() for t in synthetic_qkv((3, 10, 10), batch=1, heads=2, head_dim=64, seed=3))
    layout = _layout(0.5, seed=2, n=300, block=64, b=1, h=2)
    o, lse = _kernel(q, k, v, layout, qk_bits=4, pv_bits=8)
    assert o.dtype == torch.float16
    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, qk_bits=4, pv_bits=8)
    _assert_matches_reference(o, lse, ref_o, ref_lse, v, layout, 8)
    fp_o, _ = dense_masked_attention(q.float(), k.float(), v.float(), layout)
    o_bound, _ = quantization_error_bound(q, k, v, layout, qk_bits=4, pv_bits=8, online=True)
    # fp16 output cast adds half an ulp of |o| <= vmax.
    assert ((o.float() - fp_o).abs().amax(-1) <= o_bound + 2e-3).all()


def test_online_reference_without_p_rounding_equals_tiled_reference():
    from diffattn.kernels.quant import quantized_block_sparse_attention

    torch.manual_seed(5)
    q, k, v = (torch.randn(B, H, N, 40) for _ in range(3))
    layout = _layout(0.5, seed=5)
    o, lse = online_quantized_attention(q, k, v, layout, qk_bits=8, pv_bits=None)
    ref_o, ref_lse = quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=None)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "kw,match",
    [({"qk_bits": None}, "qk_bits"), ({"pv_bits": 2}, "pv_bits"), ({"block": 256}, "block_q")],
    ids=["qkNone", "pv2", "block256"],
)
def test_bad_arguments_are_rejected(kw, match):
    block = kw.pop("block", 32)
    q = k = v = torch.randn(1, 1, 64, 16)
    layout = BlockSparseLayout.dense(1, 1, 64, 64, block, block) if block != 32 else _layout(1.0, n=64, b=1, h=1)
    with pytest.raises(ValueError, match=match):
        _kernel(q, k, v, layout, **kw)


def test_paro_quantized_path_uses_the_kernel_on_the_triton_backend():
    from diffattn.methods import AttnContext, PAROConfig, PAROMethod
    from diffattn.patterns.paro import head_permutations, inverse_permutation, permute_heads

    grid = (3, 5, 7)
    x = synthetic_qkv(grid, batch=1, heads=2, head_dim=32, seed=4)
    method = PAROMethod(PAROConfig(density=0.5, block_size=32, backend="triton", qk_bits=8, pv_bits=4))

    def ctx(step):
        return AttnContext(
            layer="l0", grid=grid, step=step, num_steps=10, branch=0, text_len=0, record=lambda **kw: None
        )

    on_device = [t.to(DEVICE) for t in x]
    method.attend(*on_device, ctx(1))  # calibration (dense)
    o = method.attend(*on_device, ctx(2)).cpu()
    c = method.state.entries[("l0", 0, 0)]
    perms = head_permutations(grid, c.orders)
    layout = BlockSparseLayout.from_block_mask(c.mask[None].cpu(), 32, 32, 105, 105)
    op, _ = online_quantized_attention(*(permute_heads(t, perms) for t in x), layout, None, 8, 4)
    ref = permute_heads(op, inverse_permutation(perms))
    a, r = OUTPUT_TOL[torch.float32]
    # Only the online rounding reproduces the Triton path; a flip of one P level is allowed (see above).
    assert ((o - ref).abs().amax(-1) > a + r).float().mean() <= QUANT_LEVEL_FLIP_ROWS


@pytest.mark.gpu
@pytest.mark.parametrize("pv", [8, 4], ids=["pv8", "pv4"])
def test_gpu_fp16_long_sequence(pv):
    torch.manual_seed(0)
    b, h, n, d = 1, 4, 2000, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    layout = _layout(0.3, seed=1, n=n, block=64, b=b, h=h).to("cuda")
    o, lse = _kernel(q, k, v, layout, qk_bits=8, pv_bits=pv)
    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, qk_bits=8, pv_bits=pv)
    _assert_matches_reference(o, lse, ref_o, ref_lse, v, layout, pv)
    fp_o, _ = dense_masked_attention(q.float(), k.float(), v.float(), layout)
    o_bound, _ = quantization_error_bound(q, k, v, layout, qk_bits=8, pv_bits=pv, online=True)
    assert ((o.float() - fp_o).abs().amax(-1) <= o_bound + 2e-3).all()
