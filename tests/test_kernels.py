"""Every attention backend against the dense fp32 reference, at the tolerances of tests/tolerances.py.

Without CUDA the Triton kernels run in the interpreter (~10 ms per tile iteration), so the Triton
cases are a chosen subset that still covers every length, head dim, dtype and density; the PyTorch
backend also runs every head dim at every density. Tests marked ``gpu`` run the kernels at full size on CUDA.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffattn.kernels import (
    BlockSparseLayout,
    block_mass,
    block_mass_reference,
    block_sparse_attention,
    cdiv,
    dense_masked_attention,
    merge_attention,
)
from diffattn.kernels import api as kernel_api
from diffattn.kernels.api import can_run
from tests.tolerances import assert_close

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# "torch" lets the torch backend choose its path (dense / masked / kernel by size and density);
# "torch-kernel" and "torch-gathered" force the C++ kernel and the plain-PyTorch gather (see _torch_paths),
# so every CPU path is checked against the reference.
FORCED_PATHS = {"torch-kernel": "kernel", "torch-gathered": "gathered"}
CPU_BACKENDS = ["torch", *FORCED_PATHS, "triton", "flex"]


def _b(backend):
    return "torch" if backend in FORCED_PATHS else backend


@pytest.fixture(autouse=True)
def _torch_paths(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        return
    for key in ("backend", "path"):
        if callspec.params.get(key) in FORCED_PATHS:
            forced = FORCED_PATHS[callspec.params[key]]
            monkeypatch.setattr(kernel_api, "cpu_path", lambda *a: forced)


def _qkv(b, h, nq, nk, d, dtype, device="cpu", dv=None):
    q = torch.randn(b, h, nq, d, device=device).to(dtype)
    k = torch.randn(b, h, nk, d, device=device).to(dtype)
    v = torch.randn(b, h, nk, dv or d, device=device).to(dtype)
    return q, k, v


def _device(backend):
    """Triton and Flex run on CUDA when there is one; without it Triton runs in the interpreter."""
    return "cuda" if backend in ("triton", "flex") and torch.cuda.is_available() else "cpu"


def _ref(q, k, v, layout=None, token_mask=None):
    layout = layout.to(q.device) if layout is not None else None
    token_mask = token_mask.to(q.device) if token_mask is not None else None
    return dense_masked_attention(q, k, v, layout, token_mask=token_mask)


def _random_layout(lb, lh, nq, nk, bq, bk, density, device="cpu"):
    mq, mk = cdiv(nq, bq), cdiv(nk, bk)
    mask = torch.rand(lb, lh, mq, mk, device=device) < density
    return BlockSparseLayout.from_block_mask(mask, bq, bk, nq, nk)


def _check(o, lse, ref_o, ref_lse, dtype):
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, ref_o, dtype)
    # -inf rows must agree exactly; assert_close treats equal infinities as equal.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(lse, ref_lse, dtype, what="lse")


def _case_id(b, h, nq, nk, d, dt, density, bq, bk):
    n = f"N{nq}" if nq == nk else f"N{nq}x{nk}"
    return f"B{b}-H{h}-{n}-D{d}-{dt}-d{density}-bs{bq}x{bk}"


# ---------------------------------------------------------------- main matrix
# (B, H, Nq, Nk, D, dtype, density, block_q, block_k). Chosen so the interpreter stays fast: every
# length (1000, 777, Nq != Nk), head dim (40, 64, 128, 80, 160), dtype and density appears.
CASES = [
    (2, 3, 1000, 1000, 64, "fp16", 0.1, 64, 64),
    (2, 3, 777, 1000, 40, "fp32", 0.1, 64, 64),
    (2, 3, 777, 300, 40, "bf16", 0.5, 64, 64),
    (2, 3, 1000, 777, 128, "fp16", 0.1, 128, 128),
    (2, 3, 300, 250, 64, "fp32", 1.0, 64, 64),
    (2, 3, 300, 200, 80, "fp16", 0.5, 64, 32),
    (2, 3, 130, 100, 160, "fp32", 0.5, 32, 32),
]


# Eager FlexAttention on CPU evaluates mask_mod on every token pair: it skips the 1000 x 1000 case.
_MATRIX = [
    pytest.param(backend, case, id=f"{_case_id(*case)}-{backend}")
    for case in CASES
    for backend in CPU_BACKENDS
    if not (backend == "flex" and case[2] * case[3] >= 10**6)
]


@pytest.mark.parametrize("backend,case", _MATRIX)
def test_backend_matches_reference(backend, case):
    b, h, nq, nk, d, dt, density, bq, bk = case
    dtype = DTYPES[dt]
    q, k, v = _qkv(b, h, nq, nk, d, dtype, _device(backend))
    layout = _random_layout(b, h, nq, nk, bq, bk, density)
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    ref_o, ref_lse = dense_masked_attention(q, k, v, layout)
    _check(o, lse, ref_o, ref_lse, dtype)


# Every head dim at every density for the PyTorch backend, cycling lengths and dtypes.
FULL_GRID = [
    (lengths, d, dt, density)
    for (d, density), lengths, dt in zip(
        itertools.product([40, 64, 128], [1.0, 0.5, 0.1]),
        itertools.cycle([(1000, 1000), (777, 777), (1000, 777), (777, 1000)]),
        itertools.cycle(["fp16", "fp32"]),
    )
]


@pytest.mark.parametrize(
    "lengths,d,dt,density",
    FULL_GRID,
    ids=[_case_id(2, 3, n[0], n[1], d, dt, den, 64, 64) for n, d, dt, den in FULL_GRID],
)
@pytest.mark.parametrize("path", ["torch", *FORCED_PATHS])
def test_torch_backend_full_grid(lengths, d, dt, density, path):
    nq, nk = lengths
    dtype = DTYPES[dt]
    q, k, v = _qkv(2, 3, nq, nk, d, dtype, "cpu")
    layout = _random_layout(2, 3, nq, nk, 64, 64, density)
    o, lse = block_sparse_attention(q, k, v, layout, backend="torch")
    _check(o, lse, *_ref(q, k, v, layout), dtype)


def test_torch_backend_picks_its_path_by_size_and_density(monkeypatch):
    """Full layouts run dense SDPA; small dense-ish problems the masked shortcut; the rest the C++ kernel;
    without the kernel, large problems gather. Each choice is checked against the reference."""
    from diffattn.kernels import cpu as cpu_module

    calls = []
    real = kernel_api.cpu_path
    monkeypatch.setattr(kernel_api, "cpu_path", lambda *a: calls.append(real(*a)) or calls[-1])

    def run(q, k, v, layout):
        o, lse = block_sparse_attention(q, k, v, layout, backend="torch")
        _check(o, lse, *_ref(q, k, v, layout), q.dtype)

    q, k, v = _qkv(2, 3, 300, 250, 64, torch.float32)
    sparse = _random_layout(1, 3, 300, 250, 64, 64, 0.3)
    dense_ish = BlockSparseLayout.from_block_mask(torch.ones(1, 3, 5, 4, dtype=torch.bool).tril(1), 64, 64)
    run(q, k, v, BlockSparseLayout.dense(1, 1, 300, 250))
    run(q, k, v, dense_ish)  # density 0.7 > CPU_KERNEL_MAX_DENSITY_SMALL
    run(q, k, v, sparse)
    run(q, k, torch.randn(2, 3, 250, 32), BlockSparseLayout.dense(1, 1, 300, 250))  # Dv != D: no fused kernel
    monkeypatch.setattr(kernel_api, "CPU_MASKED_MAX_ELEMENTS", 3 * 300 * 250 - 1)  # now "large"
    run(q, k, v, dense_ish)
    monkeypatch.setattr(kernel_api, "cpu_kernel", lambda: None)  # no compiler
    run(q, k, v, dense_ish)
    monkeypatch.setattr(kernel_api, "CPU_MASKED_MAX_ELEMENTS", 1 << 25)
    run(q, k, v, sparse)
    assert calls == ["dense", "masked", "kernel", "kernel", "kernel", "gathered", "masked"]
    assert cpu_module.cpu_kernel() is not None, "the C++ CPU kernel did not build here; see the log"


def test_cpu_kernel_build_failure_is_logged_once_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension

    from diffattn.kernels import cpu as cpu_module

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_module, "_state", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    q, k, v = _qkv(1, 2, 200, 200, 32, torch.float32)
    layout = _random_layout(1, 1, 200, 200, 64, 64, 0.3)
    monkeypatch.setattr(kernel_api, "CPU_MASKED_MAX_ELEMENTS", 0)
    with caplog.at_level("WARNING", logger="diffattn"):
        for _ in range(2):
            o, lse = block_sparse_attention(q, k, v, layout, backend="torch")
            _check(o, lse, *_ref(q, k, v, layout), torch.float32)
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    assert kernel_api.cpu_path(q, k, v, layout) == "gathered"


# ---------------------------------------------------------------- full density = SDPA / logsumexp
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_full_density_equals_sdpa(backend, dt):
    dtype = DTYPES[dt]
    b, h, nq, nk, d = 2, 3, 200, 150, 64
    q, k, v = _qkv(b, h, nq, nk, d, dtype, _device(backend))
    layout = BlockSparseLayout.dense(1, 1, nq, nk, 64, 64)
    scale = 0.3
    o, lse = block_sparse_attention(q, k, v, layout, scale=scale, backend=_b(backend))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    assert_close(o, ref, dtype)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    assert_close(lse, torch.logsumexp(scores, dim=-1), dtype, what="lse")


# ---------------------------------------------------------------- empty rows, partial blocks
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows_give_zeros_and_neg_inf(backend):
    b, h, nq, nk, d, bq, bk = 2, 3, 150, 100, 40, 32, 32
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32, _device(backend))
    tm = torch.rand(b, h, nq, nk) < 0.3
    tm[0, 1, :40] = False  # whole query blocks with no key: no listed block at all
    tm[1, 0, 70:75] = False  # single rows inside a partial block: every key masked
    tm[:, 2, :, :64] = False
    layout = BlockSparseLayout.from_token_mask(tm, bq, bk)
    assert int(layout.kv_counts[0, 1, 0]) == 0 and layout.has_partial
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    empty = ~tm.any(-1).to(o.device)
    assert bool(torch.isneginf(lse[empty]).all()) and bool((o[empty] == 0).all())
    _check(o, lse, *_ref(q, k, v, token_mask=tm), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_partial_blocks_are_token_exact(backend, dt):
    # A sliding window (crossing block borders) with a padded key tail: mostly partial blocks.
    dtype = DTYPES[dt]
    b, h, nq, nk, d = 2, 3, 130, 100, 64
    q, k, v = _qkv(b, h, nq, nk, d, dtype, _device(backend))
    i = torch.arange(nq)[:, None].float() * nk / nq
    j = torch.arange(nk)[None, :].float()
    window = (i - j).abs() <= torch.tensor([7.0, 18.0, 30.0])[:, None, None]
    key_valid = torch.ones(b, nk, dtype=torch.bool)
    key_valid[1, 81:] = False
    tm = window[None] & key_valid[:, None, None, :]
    layout = BlockSparseLayout.from_token_mask(tm, 32, 32)
    assert layout.has_partial
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    _check(o, lse, *_ref(q, k, v, token_mask=tm), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_padding_layout(backend):
    b, h, nq, nk, d = 2, 3, 100, 140, 40
    q, k, v = _qkv(b, h, nq, nk, d, torch.float16, _device(backend))
    key_valid = torch.ones(b, nk, dtype=torch.bool)
    key_valid[0, 90:] = False
    key_valid[1, 5:40] = False
    layout = BlockSparseLayout.from_key_padding(key_valid, nq, 64, 64)
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    tm = key_valid[:, None, None, :].expand(b, h, nq, nk)
    _check(o, lse, *_ref(q, k, v, token_mask=tm), torch.float16)


# ---------------------------------------------------------------- broadcasting and strides
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lb,lh", [(1, 1), (1, 3), (2, 1)], ids=["L1x1", "L1x3", "L2x1"])
def test_broadcast_layouts(backend, lb, lh):
    b, h, nq, nk, d = 2, 3, 160, 130, 64
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32, _device(backend))
    layout = _random_layout(lb, lh, nq, nk, 32, 64, 0.5)
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    # Reference with an explicitly expanded (non-broadcast) layout.
    full = BlockSparseLayout.from_block_mask(layout.to_block_mask().expand(b, h, -1, -1).contiguous(), 32, 64)
    _check(o, lse, *_ref(q, k, v, full), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    b, h, nq, nk, d = 2, 3, 150, 120, 40
    dev = _device(backend)
    q = torch.randn(b, nq, h, d, device=dev).half().transpose(1, 2)  # [B, N, H, D] as diffusers projects it
    kv = torch.randn(b, h, nk, 2 * d + 8, device=dev).half()
    k, v = kv[..., :d], kv[..., d + 8 :]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    layout = _random_layout(b, 1, nq, nk, 64, 32, 0.6)
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    ref = _ref(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    _check(o, lse, *ref, torch.float16)


@pytest.mark.parametrize(
    "bq,bk,block_m", [(64, 32, 32), (256, 32, None)], ids=["bq64-split-32", "bq256-split-128"]
)
def test_triton_query_block_split(bq, bk, block_m):
    # A layout query block served by several programs: partial-block rows must line up.
    from diffattn.kernels.triton_attention import triton_block_sparse_attention

    b, h, nq, nk, d = 1, 2, 300, 100, 40
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32, _device("triton"))
    i = torch.arange(nq)[:, None] // 3
    j = torch.arange(nk)[None, :]
    tm = ((i - j).abs() <= 12).expand(b, h, nq, nk).clone()
    tm[0, 1, 100:140] = False
    layout = BlockSparseLayout.from_token_mask(tm, bq, bk)
    o, lse = triton_block_sparse_attention(q, k, v, layout, block_m=block_m)
    _check(o, lse, *_ref(q, k, v, token_mask=tm), torch.float32)
    with pytest.raises(ValueError, match="block_m"):
        triton_block_sparse_attention(q, k, v, layout, block_m=bq * 2)


# ---------------------------------------------------------------- merge_attention
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_of_disjoint_block_sets_equals_full(backend):
    b, h, nq, nk, d, bs = 2, 3, 150, 190, 64, 32
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32, _device(backend))
    mask = torch.rand(b, h, cdiv(nq, bs), cdiv(nk, bs)) < 0.6
    mask[0, 0, 0] = False  # a row empty in both halves
    split = torch.rand(mask.shape) < 0.5
    mask[1, 1, 1] &= split[1, 1, 1]  # a row whose blocks all fall into the first half
    part1 = BlockSparseLayout.from_block_mask(mask & split, bs, bs)
    part2 = BlockSparseLayout.from_block_mask(mask & ~split, bs, bs)
    o1, l1 = block_sparse_attention(q, k, v, part1, backend=_b(backend))
    o2, l2 = block_sparse_attention(q, k, v, part2, backend=_b(backend))
    o, lse = merge_attention(o1, l1, o2, l2)
    _check(o, lse, *_ref(q, k, v, BlockSparseLayout.from_block_mask(mask, bs, bs)), torch.float32)


def test_merge_of_key_ranges_equals_full_attention():
    # Text/video style: the keys split into two tensors of different lengths.
    q, k, v = _qkv(2, 3, 70, 90, 40, torch.float32)
    o1, l1 = dense_masked_attention(q, k[:, :, :25], v[:, :, :25])
    o2, l2 = dense_masked_attention(q, k[:, :, 25:], v[:, :, 25:])
    o, lse = merge_attention(o1, l1, o2, l2)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert_close(o, ref, torch.float32)
    assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(40), -1), torch.float32, "lse")


def test_merge_rejects_mismatched_shapes():
    o = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="matching shapes"):
        merge_attention(o, torch.zeros(1, 2, 5), o[:, :, :4], torch.zeros(1, 2, 4))


# ---------------------------------------------------------------- block mass
def _explicit_mass(q, k, lse, bq, bk, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None])
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(p), p)
    nq, nk = p.shape[-2:]
    mq, mk = cdiv(nq, bq), cdiv(nk, bk)
    p = F.pad(p, (0, mk * bk - nk, 0, mq * bq - nq))
    return p.view(*p.shape[:2], mq, bq, mk, bk).sum(dim=(3, 5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "nq,nk,d,dt,bq,bk",
    [(150, 190, 40, "fp32", 64, 32), (130, 100, 64, "fp16", 32, 64), (100, 70, 80, "bf16", 32, 32)],
    ids=["N150x190-D40-fp32-bs64x32", "N130x100-D64-fp16-bs32x64", "N100x70-D80-bf16-bs32x32"],
)
def test_block_mass(backend, nq, nk, d, dt, bq, bk):
    dtype = DTYPES[dt]
    q, k, _ = _qkv(2, 3, nq, nk, d, dtype, _device(backend))
    scale = d**-0.5
    _, lse = dense_masked_attention(q, k, k)
    lse[0, 1, 3] = float("-inf")
    lse[1, 2, nq - 1] = float("-inf")
    mass = block_mass(q, k, lse, bq, bk, scale, backend=_b(backend))
    assert mass.dtype == torch.float32 and mass.shape == (2, 3, cdiv(nq, bq), cdiv(nk, bk))
    assert_close(mass, _explicit_mass(q, k, lse, bq, bk, scale), dtype, what="mass")
    assert_close(mass, block_mass_reference(q, k, lse, bq, bk, scale), dtype, what="mass")
    # With the true LSE every query row distributes mass 1 over the keys.
    rows = (~torch.isneginf(lse)).float()
    rows = F.pad(rows, (0, cdiv(nq, bq) * bq - nq)).view(2, 3, -1, bq).sum(-1)
    assert_close(mass.sum(-1), rows, dtype, what="mass")


# ---------------------------------------------------------------- rejection of bad inputs
def _layout(nq=100, nk=100):
    return BlockSparseLayout.dense(1, 1, nq, nk, 64, 64)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        pytest.param(lambda: (torch.randn(2, 100, 64), torch.randn(2, 1, 100, 64), torch.randn(2, 1, 100, 64)), ValueError, "q must be", id="q-3d"),
        pytest.param(lambda: (torch.randn(1, 2, 100, 64), torch.randn(1, 3, 100, 64), torch.randn(1, 3, 100, 64)), ValueError, "batch and heads", id="heads-differ"),
        pytest.param(lambda: (torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 90, 64)), ValueError, "same length", id="kv-length"),
        pytest.param(lambda: (torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 64)), ValueError, "head dims differ", id="qk-dim"),
        pytest.param(lambda: (torch.randn(1, 1, 100, 320),) * 3, ValueError, "<= 256", id="dim-320"),
        pytest.param(lambda: (torch.randn(1, 1, 100, 64).double(),) * 3, ValueError, "float64", id="fp64"),
        pytest.param(lambda: (torch.randn(1, 1, 100, 64), torch.randn(1, 1, 100, 64).half(), torch.randn(1, 1, 100, 64)), ValueError, "share a dtype", id="mixed-dtype"),
        pytest.param(lambda: (torch.randn(1, 1, 100, 64), torch.randn(1, 1, 100, 64, device="meta"), torch.randn(1, 1, 100, 64)), ValueError, "one device", id="mixed-device"),
        pytest.param(lambda: (torch.randn(1, 1, 300, 64),) * 3, ValueError, "rebuild the layout", id="wrong-length"),
        pytest.param(lambda: ([[1.0]], torch.randn(1, 1, 100, 64), torch.randn(1, 1, 100, 64)), TypeError, "q must be a torch.Tensor", id="q-list"),
    ],
)
def test_bad_inputs_rejected(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, _layout(), backend="torch")


def test_bad_backend_and_layout_rejected(monkeypatch):
    q = torch.randn(1, 1, 100, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, q, q, _layout(), backend="cuda")
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), backend="torch")
    big = BlockSparseLayout.dense(1, 1, 100, 100, 64, 256)
    with pytest.raises(RuntimeError, match="at most 128, got 256"):
        block_sparse_attention(q, q, q, big, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not can_run("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block_sparse_attention(q, q, q, _layout(), backend="triton")


def test_each_backend_says_whether_it_can_serve_the_call(monkeypatch):
    q = torch.randn(1, 2, 100, 32)
    small, big = _layout(), BlockSparseLayout.dense(1, 1, 100, 100, 64, 256)
    pick = kernel_api.select_backend
    assert pick("auto", q, q, q, small).name == "torch"
    assert pick("auto", q, q, q, small, qk_bits=8, pv_bits=4).name == "torch-quant"
    assert pick("torch", q, q, q, small, pv_bits=8).name == "torch-quant"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pick("triton", q, q, q, small).name == "triton"
    assert pick("triton", q, q, q, small, qk_bits=8).name == "triton-quant"
    with pytest.raises(RuntimeError, match="qk_bits=8 or 4.*'torch'"):
        pick("triton", q, q, q, small, pv_bits=8)
    with pytest.raises(RuntimeError, match="at most 128"):
        pick("triton", q, q, q, big, qk_bits=8)
    with pytest.raises(RuntimeError, match="no quantized path; use backend='triton'"):
        pick("flex", q, q, q, small, qk_bits=8)
    with pytest.raises(ValueError, match="pv_bits must be 8, 4 or None"):
        block_sparse_attention(q, q, q, small, pv_bits=2)


def test_auto_logs_its_fallback_once(monkeypatch, caplog):
    q = torch.randn(1, 2, 100, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernel_api, "_auto_families", lambda device: ("triton", "torch"))
    monkeypatch.setattr(kernel_api, "_logged", set())
    with caplog.at_level("INFO", logger="diffattn"):
        for _ in range(2):
            assert kernel_api.select_backend("auto", q, q, q, _layout(), qk_bits=8).name == "torch-quant"
    said = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(said) == 1 and "triton-quant cannot run it" in said[0] and "CUDA" in said[0]


def test_quantized_call_goes_through_the_one_entry_point():
    from diffattn.kernels.naive_quant import naive_quantized_attention
    from tests.tolerances import assert_quant_close

    q, k, v = _qkv(2, 3, 150, 150, 40, torch.float32)
    layout = _random_layout(2, 1, 150, 150, 32, 32, 0.5)
    o, lse = block_sparse_attention(q, k, v, layout, backend="torch", qk_bits=8, pv_bits=8)
    ref_o, ref_lse = naive_quantized_attention(q, k, v, layout, qk_bits=8, pv_bits=8)
    assert_quant_close(o, ref_o, v, layout.to_token_mask(), 8, lse, ref_lse)


def test_flex_block_mask_is_built_once_per_layout(monkeypatch):
    from diffattn.kernels import flex

    built = []
    real = flex.layout_to_flex_block_mask
    monkeypatch.setattr(flex, "layout_to_flex_block_mask", lambda *a: built.append(a[1:]) or real(*a))
    q, k, v = _qkv(1, 2, 70, 70, 16, torch.float32)
    layout = _random_layout(1, 1, 70, 70, 16, 16, 0.5)
    first = block_sparse_attention(q, k, v, layout, backend="flex")
    again = block_sparse_attention(q, k, v, layout, backend="flex")
    assert built == [(1, 2, 70, 70)] and torch.equal(first[0], again[0])
    block_sparse_attention(q[:, :1], k[:, :1], v[:, :1], layout, backend="flex")
    assert built[-1] == (1, 1, 70, 70)  # another shape gets its own BlockMask


def test_block_mass_rejects_bad_inputs():
    q = torch.randn(1, 2, 100, 64)
    with pytest.raises(ValueError, match="lse must be"):
        block_mass(q, q, torch.zeros(1, 2, 99), backend="torch")
    with pytest.raises(ValueError, match="block_q"):
        block_mass(q, q, torch.zeros(1, 2, 100), block_q=48, backend="torch")


# ---------------------------------------------------------------- GPU (full size, bf16)
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("d", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
def test_gpu_large_matches_reference(backend, d, dt):
    dtype = DTYPES[dt]
    b, h, nq, nk = 1, 2, 8190, 8100
    q, k, v = _qkv(b, h, nq, nk, d, dtype, device="cuda")
    layout = _random_layout(b, h, nq, nk, 128, 64, 0.3, device="cuda")
    o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
    _check(o, lse, *_ref(q, k, v, layout), dtype)


@gpu
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_gpu_dense_matches_sdpa(dt):
    dtype = DTYPES[dt]
    q, k, v = _qkv(1, 4, 4097, 4097, 128, dtype, device="cuda")
    layout = BlockSparseLayout.dense(1, 1, 4097, 4097, 128, 128, device="cuda")
    o, lse = block_sparse_attention(q, k, v, layout, backend="triton")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close(o, ref, dtype)
    # The Triton kernel is the default on CUDA.
    o_auto = block_sparse_attention(q, k, v, layout, return_lse=False)
    assert torch.equal(o_auto, o)


@gpu
def test_gpu_partial_blocks_and_empty_rows_bf16():
    b, h, n, d = 2, 2, 3000, 128
    q, k, v = _qkv(b, h, n, n, d, torch.bfloat16, device="cuda")
    i = torch.arange(n, device="cuda")[:, None]
    j = torch.arange(n, device="cuda")[None, :]
    tm = ((i - j).abs() <= 200).expand(b, h, n, n).clone()
    tm[0, 1, :500] = False
    layout = BlockSparseLayout.from_token_mask(tm, 64, 64)
    for backend in ("triton", "flex"):
        o, lse = block_sparse_attention(q, k, v, layout, backend=_b(backend))
        _check(o, lse, *_ref(q, k, v, token_mask=tm), torch.bfloat16)


@gpu
def test_gpu_block_mass():
    q, k, _ = _qkv(1, 2, 5000, 4000, 128, torch.bfloat16, device="cuda")
    _, lse = dense_masked_attention(q, k, k)
    mass = block_mass(q, k, lse, 128, 64, backend="triton")
    assert_close(mass, block_mass_reference(q, k, lse, 128, 64), torch.bfloat16, what="mass")
