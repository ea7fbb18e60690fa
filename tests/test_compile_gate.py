"""CUDA compile gate without a GPU: every Triton kernel config the launchers produce compiles for
sm_90a and sm_80, fits the target's shared memory, and none the autotuner may pick for bf16/fp16 at
head dim 64/128 with 64x64 or 128x64 blocks spills (``python -m diffattn.kernels.aot``, which prints
the registers / spills / shared memory table; coverage in ``diffattn.kernels.aot.scenarios``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_config_compiles_for_sm90a_and_sm80_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="the CUDA backend of Triton (Linux wheels)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    p = subprocess.run(
        [sys.executable, "-m", "diffattn.kernels.aot", "--arch", "90", "80", "--json", str(tmp_path / "aot.json")],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
