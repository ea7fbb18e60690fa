"""Compile every Triton kernel config for a CUDA target ahead of time, without a GPU, and report
registers, spills and shared memory per config.

A stand-in Triton driver reports a CUDA target (sm_90a or sm_80); the package's own launchers are
called with CPU tensors, and the autotuner compiles each config it would time (after the per-shape
pruning of :mod:`._tuning`) instead of launching it, so every constexpr and integer specialisation is
the one a GPU run produces. ptxas (shipped with Triton) reports registers and spills. Worker processes
compile in parallel into a fresh Triton cache.

    python -m diffattn.kernels.aot [--arch 90 80] [--jobs N] [--scope ci|full] [--json FILE]

Exit code 1 when a config fails to compile, a config exceeds the target's shared memory, or a gated
config (one the autotuner may pick for bf16/fp16 at head dim 64/128 with 64x64 or 128x64 blocks on
sm_90a) spills registers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

from ._tuning import SHARED_MEMORY

N_TOKENS = 1000  # like 32,760 and 118,800 + 256: not a multiple of 16


@dataclasses.dataclass(frozen=True)
class Scenario:
    kernel: str  # "attn", "quant" or "mass"
    dtype: str
    d: int
    block_q: int
    block_k: int
    partial: bool = False
    pv_bits: int | None = None
    gated: bool = False
    n: int = N_TOKENS
    heads: int = 2

    @property
    def name(self) -> str:
        extra = ("-partial" if self.partial else "") + (f"-pv{self.pv_bits}" if self.kernel == "quant" else "")
        size = "" if (self.n, self.heads) == (N_TOKENS, 2) else f"-H{self.heads}N{self.n}"
        return f"{self.kernel}-{self.dtype}-D{self.d}-{self.block_q}x{self.block_k}{extra}{size}"


def scenarios(arch: int, scope: str = "ci") -> list[Scenario]:
    """What the launchers produce for the package's dtypes, head dims and layouts.

    ``ci`` (about 180 compiles, ~3 minutes on 2 free cores), gated on sm_90a: attention in bf16 at head dim
    64/128 with 64x64 and 128x64 blocks, full and partial blocks, and in fp16 with full blocks; the
    int8 kernel with P on 8 bits (bf16 and fp16 V) and unrounded; block mass. Compiled and reported
    besides: head dims 40/80/160/256 (SD UNets; 256 the kernels' limit), fp32, 128x128 and 16/32-token
    blocks, the INT4 P grid, partial blocks in the int8 kernel; on sm_80 bf16 attention (full and
    partial), the int8 kernel and block mass at head dim 128.
    ``full`` (about 500 compiles) gates the whole bf16 x fp16 x D 64/128 x 64x64/128x64 x partial x
    P-grid product and adds fp16/fp32 to every extra head dim and block shape, and the gated set on sm_80.
    """
    full = scope == "full"
    out: list[Scenario] = []
    if arch == 80:
        out += [Scenario("attn", "bf16", 128, 64, 64), Scenario("attn", "bf16", 128, 128, 64),
                Scenario("attn", "bf16", 128, 128, 64, partial=True), Scenario("quant", "bf16", 128, 64, 64, pv_bits=8),
                Scenario("mass", "bf16", 128, 64, 64)]
        if full:
            out += [dataclasses.replace(s, gated=False) for s in scenarios(90, "full") if s.gated]
        return list(dict.fromkeys(out))
    blocks = ((64, 64), (128, 64))
    for dt in ("bf16", "fp16"):
        for d in (64, 128):
            for bq, bk in blocks:
                partials = (False, True) if dt == "bf16" or full else (False,)
                out += [Scenario("attn", dt, d, bq, bk, partial=p, gated=True) for p in partials]
                if dt == "bf16" or full or (d, bq) == (64, 64):
                    out.append(Scenario("quant", dt, d, bq, bk, pv_bits=8, gated=True))
                    out.append(Scenario("mass", dt, d, bq, bk, gated=True))
                if full:
                    out.append(Scenario("quant", dt, d, bq, bk, pv_bits=None, gated=True))
                    out.append(Scenario("quant", dt, d, bq, bk, pv_bits=4, gated=True))
    out.append(Scenario("quant", "bf16", 128, 64, 64, pv_bits=None, gated=True))
    for dt in ("bf16", "fp16", "fp32") if full else ("bf16",):
        out += [Scenario("attn", dt, d, 128, 64) for d in (40, 80, 160, 256)]
        out += [Scenario("attn", dt, 128, 128, 128), Scenario("attn", dt, 64, 16, 16),
                Scenario("attn", dt, 64, 32, 32, partial=True)]
    out += [Scenario("attn", "fp32", 128, 128, 64), Scenario("quant", "bf16", 128, 128, 64, pv_bits=4),
            Scenario("quant", "bf16", 128, 64, 64, partial=True, pv_bits=8), Scenario("mass", "fp32", 64, 64, 64)]
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------ workers
class _FakeDriver:
    """Just enough of a Triton driver for compiling (``warmup=True``) without a device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("ahead-of-time compilation does not benchmark")

    def map_python_to_cpp_type(self, ty):
        return ty


_ARCH = 90
_ROWS: list[dict] = []


def _ptxas_facts(log: str) -> dict:
    m = re.search(r"Used (\d+) registers", log)
    facts = {"regs": int(m.group(1)) if m else None}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    facts["stack"], facts["spill_stores"], facts["spill_loads"] = map(int, m.groups()) if m else (None,) * 3
    return facts


def _ptxas_log(ptx: str) -> str:
    """ptxas -v on the kernel's PTX, for a kernel that came from a cache (no log of its own)."""
    from triton.backends.nvidia.compiler import get_ptxas

    sm = f"sm_{_ARCH}a" if _ARCH >= 90 else f"sm_{_ARCH}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([get_ptxas(_ARCH).path, "-v", f"--gpu-name={sm}", src, "-o", src + ".cubin"],
                           capture_output=True, text=True)
    return p.stdout + p.stderr


def _compile_all(self, *args, **kwargs):
    """Autotuner.run in the workers: compile each config the pruning keeps, record its resources."""
    self.nargs = dict(zip(self.arg_names, args))
    kwargs = dict(kwargs, warmup=True)
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    for cfg in configs:
        row = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        t0 = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = self.fn.run(*args, **kwargs, **cfg.all_kwargs())
            text = log.getvalue()
            if "registers" not in text:
                text = _ptxas_log(kernel.asm["ptx"])
            row.update(ok=True, shared=int(kernel.metadata.shared), **_ptxas_facts(text))
        except Exception as e:  # noqa: BLE001 - the gate reports every compile error
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500], trace=traceback.format_exc()[-1500:])
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        _ROWS.append(row)
    self.nargs = None


def _init_worker(arch: int) -> None:
    global _ARCH
    _ARCH = arch
    import torch
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    from . import _tuning

    torch.set_num_threads(1)
    driver.set_active(_FakeDriver(arch))
    _tuning.set_target_shared_memory(SHARED_MEMORY[arch])
    Autotuner.run = _compile_all


def _inputs(sc: Scenario):
    import torch

    from .layout import BlockSparseLayout, cdiv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sc.dtype]
    h, n = sc.heads, sc.n
    # Only shapes, strides and dtypes matter for compiling.
    q, k, v = (torch.zeros(1, h, n, sc.d, dtype=dtype) for _ in range(3))
    if sc.partial:
        i = torch.arange(n)[:, None]
        keep = ((i - i.T).abs() <= 2 * sc.block_k + 7).expand(1, h, n, n)
        layout = BlockSparseLayout.from_token_mask(keep, sc.block_q, sc.block_k)
    else:
        mq, mk = cdiv(n, sc.block_q), cdiv(n, sc.block_k)
        mask = torch.rand(1, h, mq, mk, generator=torch.Generator().manual_seed(1)) < 0.5
        mask[..., 0] = True
        layout = BlockSparseLayout.from_block_mask(mask, sc.block_q, sc.block_k, n, n)
    return q, k, v, layout


def _compile_scenario(sc: Scenario) -> list[dict]:
    import torch

    from .triton_attention import triton_block_sparse_attention
    from .triton_block_mass import triton_block_mass
    from .triton_quant import triton_quantized_block_sparse_attention

    _ROWS.clear()
    q, k, v, layout = _inputs(sc)
    try:
        if sc.kernel == "attn":
            triton_block_sparse_attention(q, k, v, layout)
        elif sc.kernel == "quant":
            triton_quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=sc.pv_bits)
        else:
            triton_block_mass(q, k, torch.zeros(q.shape[:3]), sc.block_q, sc.block_k)
    except Exception as e:  # noqa: BLE001
        _ROWS.append({"ok": False, "error": f"launcher: {type(e).__name__}: {e}"[:1500]})
    base = dataclasses.asdict(sc) | {"scenario": sc.name, "arch": f"sm_{_ARCH}a" if _ARCH >= 90 else f"sm_{_ARCH}"}
    limit = SHARED_MEMORY[_ARCH]
    rows = []
    for r in _ROWS:
        r = base | r
        r["fits"] = r.get("shared") is not None and r["shared"] <= limit
        r["spills"] = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------ driver
def problems(rows: list[dict]) -> list[str]:
    """Why the gate fails: compile errors, shared-memory overflows, spills of gated configs."""
    out = []
    for r in rows:
        cfg = f"{r['arch']} {r['scenario']} w{r.get('num_warps')}s{r.get('num_stages')}"
        if not r.get("ok"):
            out.append(f"{cfg}: compile error: {r.get('error', '?').splitlines()[0][:300]}")
        elif not r["fits"]:
            limit = SHARED_MEMORY[int(r["arch"][3:5])]
            out.append(f"{cfg}: {r['shared']} bytes of shared memory exceed the target's {limit}")
        elif r.get("regs") is None:
            out.append(f"{cfg}: no ptxas register report")
        elif r["gated"] and r["spills"]:
            out.append(f"{cfg}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded "
                       f"at {r['regs']} registers")
    return out


def table(rows: list[dict]) -> str:
    head = f"{'arch':7s} {'scenario':34s} {'cfg':6s} {'regs':>4s} {'spill':>6s} {'smem':>7s} {'gate':4s} {'s':>5s}"
    lines = [head]
    for r in rows:
        cfg = f"w{r.get('num_warps')}s{r.get('num_stages')}"
        if not r.get("ok"):
            lines.append(f"{r['arch']:7s} {r['scenario']:34s} {cfg:6s} ERROR {r.get('error', '')[:80]}")
            continue
        lines.append(f"{r['arch']:7s} {r['scenario']:34s} {cfg:6s} {r['regs'] or 0:4d} {r['spills']:6d} "
                     f"{r['shared']:7d} {'yes' if r['gated'] else '':4s} {r['compile_s']:5.1f}")
    return "\n".join(lines)


def compile_all(
    archs=(90, 80), scope: str = "ci", jobs: int | None = None, match: str = "",
    todo: list[Scenario] | None = None, cache_dir: str | None = None,
) -> list[dict]:
    """Compile every scenario (``todo``, default :func:`scenarios`) for every arch in worker processes,
    into ``cache_dir`` (default: a fresh temporary Triton cache); one row per (scenario, config)."""
    env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR")}
    rows: list[dict] = []
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        with tempfile.TemporaryDirectory(prefix="diffattn-aot-") as tmp:
            os.environ["TRITON_CACHE_DIR"] = cache_dir or tmp
            rows = _compile_in_pool(archs, scope, jobs or os.cpu_count() or 1, match, todo)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


def _compile_in_pool(archs, scope, jobs, match, todo) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict] = []
    for arch in archs:
        work = [s for s in (todo if todo is not None else scenarios(arch, scope)) if match in s.name]
        # The costliest compiles (128-row tiles, large head dims) first, so the pool ends together.
        work.sort(key=lambda s: -(s.block_q * s.d * (2 if s.kernel == "attn" else 1)))
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(arch,)) as pool:
            for part in pool.map(_compile_scenario, work):
                rows += part
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffattn.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY))
    ap.add_argument("--scope", choices=["ci", "full"], default="ci")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--match", default="", help="only scenarios whose name contains this")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = compile_all(tuple(args.arch), args.scope, args.jobs, args.match)
    print(table(rows))
    bad = problems(rows)
    print(f"{len(rows)} configs compiled for {', '.join(f'sm_{a}' for a in args.arch)} in "
          f"{time.perf_counter() - t0:.0f} s; {len(bad)} problems")
    for line in bad:
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
