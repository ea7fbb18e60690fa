"""Row offsets past 2**31 elements: every Triton kernel reads fused-QKV views whose token stride times
token index overflows int32, and matches the fp32 reference.

The views live in a sparse memory-mapped file (only the touched rows get pages), so the interpreter
reads real addresses past 2**31 elements while the test touches a few hundred KB. The kernels run in
a child process: with int32 offsets the kernel reads wrapped (negative) addresses and the process
segfaults, which must fail this test, not end the test session.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    sys.path.insert(0, {tests!r})
    from diffattn.kernels import BlockSparseLayout, block_mass_reference, dense_masked_attention
    from diffattn.kernels.naive_quant import online_quantized_attention
    from tolerances import assert_close

    path = sys.argv[1]
    n, h, d = 40, 2, 16
    stride = 2**26  # (n - 1) * stride = 2.6e9 > 2**31
    with open(path, "wb") as f:
        f.truncate(n * stride * 4)
    buf = torch.from_file(path, shared=True, size=n * stride, dtype=torch.float32)
    views = [buf.as_strided((1, h, n, d), (0, d, stride, 1), i * h * d) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(1, h, n, d, generator=g) for _ in range(3)]
    for view, x in zip(views, dense):
        view.copy_(x)
    q, k, v = views
    mask = torch.ones(1, h, 3, 3, dtype=torch.bool)
    mask[0, 1, 0, 2] = False
    layout = BlockSparseLayout.from_block_mask(mask, 16, 16, n, n)  # a 8-token tail block
    from diffattn.kernels.triton_attention import triton_block_sparse_attention
    from diffattn.kernels.triton_block_mass import triton_block_mass
    from diffattn.kernels.triton_quant import triton_quantized_block_sparse_attention

    o, lse = triton_block_sparse_attention(q, k, v, layout)
    ref_o, ref_lse = dense_masked_attention(*dense, layout)
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_lse, torch.float32, what="lse")
    print("attention ok", flush=True)

    o, lse = triton_quantized_block_sparse_attention(q, k, v, layout, pv_bits=None)
    # The host pre-pass quantizes the views themselves (its key mean sums in stride order).
    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, qk_bits=8, pv_bits=None)
    assert_close(o, ref_o, torch.float32)
    assert_close(lse, ref_lse, torch.float32, what="lse")
    print("quantized attention ok", flush=True)

    _, lse = dense_masked_attention(*dense)
    mass = triton_block_mass(q, k, lse, 16, 16)
    assert_close(mass, block_mass_reference(dense[0], dense[1], lse, 16, 16), torch.float32, what="mass")
    print("block mass ok", flush=True)
    """
)


def test_row_offsets_past_2_31_elements(tmp_path):
    code = CHILD.format(tests=str(Path(__file__).parent))
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "qkv.bin")], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0 and p.stdout.strip().endswith("block mass ok"), (
        f"kernels on views with row offsets > 2**31: exit code {p.returncode}; passed before it: "
        f"{p.stdout.split()!r}\n{p.stderr[-3000:]}"
    )
