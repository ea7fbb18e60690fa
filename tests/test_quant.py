"""Quantized block-sparse attention (the "torch" backend's quantized path): exact when unquantized,
equal to its naive oracle, within its proved bounds, and with typical errors as documented
(tests/tolerances.py: QUANT_REL_L2)."""

import pytest
import torch

from diffattn.kernels import BlockSparseLayout, dense_masked_attention
from diffattn.kernels.naive_quant import naive_quantized_attention, quantization_error_bound
from diffattn.kernels.quant import quantize_blockwise, quantized_block_sparse_attention
from diffattn.patterns.synthetic import synthetic_qkv
from tests.tolerances import QUANT_REL_L2, assert_close, assert_quant_close

BITS = [(8, None), (8, 8), (8, 4), (4, 8)]


def _bits_id(bits):
    return f"qk{bits[0]}-pv{bits[1]}"


def _inputs(kind: str, b: int = 2, h: int = 3, n: int = 300, d: int = 64):
    if kind == "random":
        return tuple(torch.randn(b, h, n, d) for _ in range(3))
    # 3 x 10 x 10 = 300 tokens of DiT-like attention (one head of each kind, cycled).
    return synthetic_qkv((3, 10, 10), batch=b, heads=h, head_dim=d, seed=3)


def _layout(b, h, n, block=64, density=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = -(-n // block)
    mask = torch.rand(b, h, m, m, generator=g) < density
    mask |= torch.eye(m, dtype=torch.bool)  # the diagonal keeps every row non-empty
    return BlockSparseLayout.from_block_mask(mask, block, block)


@pytest.mark.parametrize("n,block", [(100, 16), (130, 32)], ids=["N100-b16", "N130-b32"])
def test_quantize_blockwise_matches_loop(n, block):
    x = torch.randn(2, 3, n, 24) * torch.linspace(0.1, 5, n)[:, None]
    vals, scales = quantize_blockwise(x, block, 8)
    for t in range(-(-n // block)):
        tile = x[:, :, t * block : (t + 1) * block]
        amax = tile.abs().amax(dim=(-1, -2))
        s = amax / 127
        torch.testing.assert_close(scales[:, :, t], s)
        expect = torch.round(tile / s[..., None, None])
        assert torch.equal(vals[:, :, t * block : (t + 1) * block], expect)
    assert vals.abs().max() <= 127


def test_unquantized_path_is_exact_with_partial_blocks_and_empty_rows():
    b, h, n, d = 2, 3, 111, 32
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    token_mask = torch.rand(b, h, n, n) < 0.3
    token_mask[:, :, :40] = False  # rows with nothing kept
    layout = BlockSparseLayout.from_token_mask(token_mask, 32, 32)
    assert layout.has_partial
    o, lse = quantized_block_sparse_attention(q, k, v, layout, scale=0.2, qk_bits=None, pv_bits=None)
    ref_o, ref_lse = dense_masked_attention(q, k, v, layout, scale=0.2)
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_lse, torch.float32, what="lse")
    assert torch.equal(o[:, :, :40], torch.zeros_like(o[:, :, :40]))
    assert torch.isneginf(lse[:, :, :40]).all()


def _quantized_and_exact(kind, bits):
    """Inputs, layout, the quantized result and the exact one on the same layout."""
    q, k, v = _inputs(kind)
    layout = _layout(*q.shape[:3])
    got = quantized_block_sparse_attention(q, k, v, layout, qk_bits=bits[0], pv_bits=bits[1])
    return (q, k, v, layout), got, dense_masked_attention(q, k, v, layout)


@pytest.mark.parametrize("bits", BITS, ids=_bits_id)
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_error_within_proved_bound(kind, bits):
    (q, k, v, layout), (o, lse), (ref_o, ref_lse) = _quantized_and_exact(kind, bits)
    o_bound, lse_bound = quantization_error_bound(q, k, v, layout, qk_bits=bits[0], pv_bits=bits[1])
    slack = 1e-4  # fp32 rounding of the two computations, far below any bound here
    err = (o - ref_o).abs().amax(-1)
    assert (err <= o_bound + slack).all(), f"worst row exceeds its bound by {(err - o_bound).max():.3g}"
    assert ((lse - ref_lse).abs() <= lse_bound + slack).all()
    # The bound is not vacuous: quantization does change the result.
    assert err.max() > 1e-5


@pytest.mark.parametrize("bits", BITS, ids=_bits_id)
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_typical_error_as_documented(kind, bits):
    _, (o, _), (ref_o, _) = _quantized_and_exact(kind, bits)
    rel = float((o - ref_o).norm() / ref_o.norm())
    assert rel <= QUANT_REL_L2[bits][kind], f"relative L2 error {rel:.4f}"


def test_fewer_p_bits_cost_accuracy():
    q, k, v = _inputs("structured")
    layout = _layout(*q.shape[:3])
    ref_o, _ = dense_masked_attention(q, k, v, layout)
    errs = {}
    for pv in (None, 8, 4):
        o, _ = quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=pv)
        errs[pv] = float((o - ref_o).norm())
    assert errs[None] < errs[8] < errs[4]


def test_key_smoothing_keeps_lse_exact_for_offset_keys():
    # A large common offset on the keys would eat the INT8 range without smoothing.
    q, k, v = _inputs("random", n=200)
    k = k + 20.0
    layout = _layout(*q.shape[:3])
    o, lse = quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=None)
    ref_o, ref_lse = dense_masked_attention(q, k, v, layout)
    assert float((o - ref_o).norm() / ref_o.norm()) <= QUANT_REL_L2[(8, None)]["random"]
    assert float((lse - ref_lse).abs().max()) < 0.05


@pytest.mark.parametrize("arg,value", [("qk_bits", 16), ("pv_bits", 2), ("pv_bits", "8")])
def test_bad_bits_are_rejected(arg, value):
    q = k = v = torch.randn(1, 1, 64, 16)
    layout = BlockSparseLayout.dense(1, 1, 64, 64)
    with pytest.raises(ValueError, match=arg):
        quantized_block_sparse_attention(q, k, v, layout, **{arg: value})


@pytest.mark.parametrize("bits", BITS, ids=_bits_id)
def test_equals_the_naive_oracle_on_odd_shapes_and_partial_blocks(bits):
    b, h, n, d = 2, 3, 111, 40
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    k = k + 3.0
    token_mask = torch.rand(b, h, n, n) < 0.5
    token_mask[:, :, :5] = False  # rows with nothing kept
    layout = BlockSparseLayout.from_token_mask(token_mask, 32, 32)
    o, lse = quantized_block_sparse_attention(q, k, v, layout, qk_bits=bits[0], pv_bits=bits[1])
    ref_o, ref_lse = naive_quantized_attention(q, k, v, layout, qk_bits=bits[0], pv_bits=bits[1])
    assert_quant_close(o, ref_o, v, token_mask, bits[1], lse, ref_lse)
    unquantized, _ = dense_masked_attention(q, k, v, layout)
    assert (o - unquantized).abs().max() > 1e-4  # the oracle is not plain attention
