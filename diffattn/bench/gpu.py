"""The GPU check in one command (about 6 minutes on one H100/H200 from a cold Triton cache).

    diffattn bench gpu --out DIR            # on a CUDA machine
    diffattn bench gpu --smoke --out DIR    # the same code at toy shapes on CPU (Triton interpreter)

Phases, each row printed and appended to ``DIR/gpu.jsonl`` as it is measured (device, versions,
commit, phase, shape, config, status, time, memory, error):

1. ``precompile``: worker processes compile every kernel config the later phases launch into the
   Triton cache (:mod:`diffattn.kernels.aot` with the device's arch), so the phases below mostly load.
2. ``correct``: every Triton kernel in bf16 and fp16 with every autotune config forced one at a time,
   against fp32 references at the tolerances of :mod:`diffattn.kernels.tolerances`; outputs are
   poisoned with NaN first; partial blocks, sequence tails and empty rows included; then a
   120k-token fused-QKV strided case (row offsets past 2**31 bytes).
3. ``kernel``: median ``triton.testing.do_bench`` times at the Wan2.1-1.3B 480p and HunyuanVideo 720p
   shapes, dense (density 1) and each video method's own layout, against SDPA flash: effective
   TFLOP/s and the ratio to SDPA.
4. ``model``: one steady-state transformer step of a Wan2.1-1.3B-shape model (30 layers, random bf16
   weights built on the GPU), dense and each video method at its defaults, after warm-up, with peak
   memory.
5. ``kernel`` again for compiled FlexAttention on the same layouts (warmed, its compile time apart;
   a recompile past the limit raises instead of running eagerly).

A phase that would pass ``--budget`` seconds is skipped with a ``SKIP`` row; the exit code is 1 if any
row failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# --smoke: the same phases with fewer methods, so the CPU run stays within a minute or two.
SMOKE_KERNEL_METHODS = ("radial", "adaspa")
SMOKE_MODEL_METHODS = ("radial",)
# (name, B, H, N, D, latent grid F x H x W, text tokens)
SHAPES = {
    "wan2.1-1.3b-480p": (1, 12, 32760, 128, (21, 30, 52), 0),
    "hunyuanvideo-720p": (1, 24, 119056, 128, (33, 45, 80), 256),
}
SMOKE_SHAPES = {"toy": (1, 2, 96, 32, (2, 6, 8), 0)}


class Run:
    """Rows, the clock and the output file of one ``bench gpu`` run."""

    def __init__(self, out: Path, env: dict[str, Any], budget: float):
        self.out, self.env, self.budget = out, env, budget
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu.jsonl"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, phase: str, name: str, status: str, **fields) -> dict[str, Any]:
        from .common import write_rows

        row = {**self.env, "bench": "gpu", "phase": phase, "name": name, "status": status, **fields}
        row.setdefault("error", None)
        self.rows.append(row)
        write_rows([row], self.path)
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if k not in ("trace", "config") and v is not None)
        print(f"[{self.elapsed():6.1f}s] {phase:10s} {status:5s} {name} {extra}", flush=True)
        return row

    def failed(self, phase: str, name: str, e: BaseException, **fields) -> None:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        status = "OOR" if "OutOfResources" in type(e).__name__ else "ERROR"
        self.record(phase, name, status, error=msg, trace=traceback.format_exc()[-2000:], **fields)

    def over_budget(self, phase: str, name: str) -> bool:
        if self.elapsed() <= self.budget:
            return False
        self.record(phase, name, "SKIP", error=f"time budget of {self.budget:.0f} s spent")
        return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------ helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_ms(fn: Callable[[], Any], device, smoke: bool) -> float:
    if smoke:
        from .common import timed

        return timed(fn, device, warmup=1, repeat=1)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _tflops(b: int, h: int, nq: int, nk: int, d: int, density: float, ms: float) -> float:
    return 4.0 * b * h * nq * nk * d * density / (ms * 1e-3) / 1e12


def pruned_configs(tuner, launch: Callable[[], Any]) -> list:
    """The configs the autotuner would time for the shape ``launch()`` launches (nothing runs)."""
    found: list = []

    def discover(*args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        found.extend(tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs)
        tuner.nargs = None

    tuner.run = discover  # `kernel[grid](...)` calls self.run: the instance attribute wins
    try:
        launch()
    finally:
        del tuner.run
    return found


class forced_config:
    """Run an autotuned kernel with exactly one of its configs (no timing, no pruning)."""

    def __init__(self, tuner, cfg):
        self.tuner, self.cfg = tuner, cfg

    def __enter__(self):
        self.saved = self.tuner.configs
        self.tuner.configs = [self.cfg]

    def __exit__(self, *exc):
        self.tuner.configs = self.saved


def _tuners() -> dict[str, Any]:
    from diffattn.kernels import triton_attention, triton_block_mass, triton_quant

    return {"attn": triton_attention._block_sparse_fwd_kernel, "quant": triton_quant._quant_block_sparse_fwd_kernel,
            "mass": triton_block_mass._block_mass_kernel}


def _poison(shape, dtype, device) -> None:
    """Leave NaNs in the caching allocator's next free block of this size (outputs are torch.empty)."""
    import torch

    if device.type == "cuda":
        torch.full(shape, float("nan"), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ correct
# (tag, kernel, dtype, D, block_q, block_k, B, H, Nq, Nk, variant)
CORRECTNESS = [
    ("A1", "attn", "bf16", 128, 128, 64, 1, 2, 8190, 8100, "random+empty"),
    ("A2", "attn", "bf16", 128, 64, 64, 2, 2, 3000, 3000, "window+empty"),
    ("A3", "attn", "fp16", 128, 128, 64, 1, 2, 4097, 4097, "window+empty"),
    ("A4", "attn", "fp16", 64, 64, 64, 1, 4, 4088, 4088, "random+empty"),
    ("A5", "attn", "bf16", 64, 128, 64, 1, 2, 4088, 4088, "window+empty"),
    ("A6", "attn", "fp16", 128, 128, 128, 1, 2, 4097, 4097, "dense"),
    ("A7", "attn", "bf16", 80, 128, 64, 1, 2, 3000, 3000, "random+empty"),
    ("Q1", "quant8", "bf16", 128, 64, 64, 1, 2, 3000, 3000, "random+empty"),
    ("Q2", "quant8", "fp16", 64, 128, 64, 1, 2, 3000, 3000, "window+empty"),
    ("Q3", "quant4", "bf16", 128, 128, 64, 1, 2, 3000, 3000, "random+empty"),
    ("Q4", "quantNone", "fp16", 128, 64, 64, 1, 2, 3000, 3000, "random+empty"),
    ("M1", "mass", "bf16", 128, 128, 64, 1, 2, 5000, 4000, ""),
    ("M2", "mass", "fp16", 64, 64, 64, 1, 2, 4088, 4088, ""),
]
SMOKE_CORRECTNESS = [
    ("A1", "attn", "fp16", 64, 64, 32, 1, 2, 150, 140, "random+empty"),
    ("A2", "attn", "bf16", 64, 32, 32, 2, 2, 100, 100, "window+empty"),
    ("Q1", "quant8", "fp16", 64, 32, 32, 1, 2, 100, 100, "window+empty"),
    ("M1", "mass", "fp16", 64, 32, 32, 1, 2, 100, 80, ""),
]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _layout(variant: str, b, h, nq, nk, bq, bk, device, seed=0):
    """(layout, token mask or None): random blocks (a third kept), a token window (partial blocks),
    or dense; ``+empty`` leaves one query block (random) or the first rows of a head (window) with no key."""
    import torch

    from diffattn.kernels import BlockSparseLayout, cdiv

    mq, mk = cdiv(nq, bq), cdiv(nk, bk)
    if variant.startswith("random"):
        g = torch.Generator().manual_seed(seed)
        keep = max(1, round(0.3 * mk))
        order = torch.rand(1, h, mq, mk, generator=g).argsort(-1)[..., :keep]
        mask = torch.zeros(1, h, mq, mk, dtype=torch.bool).scatter_(-1, order, True)
        mask[..., mk - 1] = True  # the key tail block
        if "empty" in variant:
            mask[0, 0, mq // 2] = False
        return BlockSparseLayout.from_block_mask(mask, bq, bk, nq, nk).to(device), None
    if variant.startswith("window"):
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        tm = ((i - j).abs() <= 2 * bk + 7).expand(b, h, nq, nk).clone()
        if "empty" in variant:
            tm[0, h - 1, : bq + 5] = False  # a whole empty block and empty rows inside a partial one
        return BlockSparseLayout.from_token_mask(tm, bq, bk), tm
    return BlockSparseLayout.dense(1, 1, nq, nk, bq, bk, device=device), None


def _launch(kind: str, q, k, v, layout, lse=None, bq=64, bk=64):
    if kind == "attn":
        from diffattn.kernels.triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, layout)
    if kind.startswith("quant"):
        from diffattn.kernels.triton_quant import triton_quantized_block_sparse_attention

        pv = {"quant8": 8, "quant4": 4, "quantNone": None}[kind]
        return triton_quantized_block_sparse_attention(q, k, v, layout, qk_bits=8, pv_bits=pv)
    from diffattn.kernels.triton_block_mass import triton_block_mass

    return triton_block_mass(q, k, lse, bq, bk)


def check_attention(o, lse, ref_o, ref_lse, dtype, quantized: bool) -> dict[str, Any]:
    """Finite outputs, empty rows exactly (0, -inf), o and LSE within the project's tolerances."""
    import torch

    from diffattn.kernels.tolerances import LSE_TOL, OUTPUT_TOL, QUANT_LEVEL_FLIP_ROWS

    empty = torch.isneginf(ref_lse)
    finite = bool(torch.isfinite(o).all()) and not bool(torch.isnan(lse).any())
    empty_ok = bool(torch.equal(torch.isneginf(lse), empty)) and bool((o[empty] == 0).all())
    a, r = OUTPUT_TOL[dtype]
    la, lr = LSE_TOL[dtype if not quantized else torch.float32]
    bad = (o.float() - ref_o.float()).abs() > a + r * ref_o.float().abs()
    o_ok = float(bad.any(-1).float().mean()) <= QUANT_LEVEL_FLIP_ROWS if quantized else not bool(bad.any())
    keep = ~empty
    lerr = (lse[keep] - ref_lse[keep]).abs()
    lse_ok = bool((lerr <= la + lr * ref_lse[keep].abs()).all())
    rel = float((o.float() - ref_o.float()).norm() / ref_o.float().norm().clamp_min(1e-30))
    return {"ok": finite and empty_ok and o_ok and lse_ok, "finite": finite, "empty_rows_ok": empty_ok,
            "rel_l2": rel, "max_lse_err": float(lerr.max()) if lerr.numel() else 0.0}


def correctness(run: Run, device, smoke: bool) -> None:
    import torch

    from diffattn.kernels import dense_masked_attention
    from diffattn.kernels.naive_quant import online_quantized_attention
    from diffattn.kernels.naive import block_mass_reference
    from diffattn.kernels.tolerances import MASS_TOL

    for tag, kind, dt, d, bq, bk, b, h, nq, nk, variant in (SMOKE_CORRECTNESS if smoke else CORRECTNESS):
        dtype = getattr(torch, DTYPES[dt])
        base = f"{tag} {kind} {dt} D{d} {bq}x{bk} B{b}H{h} N{nq}x{nk} {variant}".strip()
        if run.over_budget("correct", base):
            continue
        try:
            g = torch.Generator().manual_seed(len(run.rows))
            q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for n in (nq, nk, nk))
            lse_in = layout = tm = None
            if kind == "mass":
                _, lse_in = dense_masked_attention(q.float(), k.float(), k.float())
                ref = block_mass_reference(q, k, lse_in, bq, bk)
            else:
                layout, tm = _layout(variant, b, h, nq, nk, bq, bk, device)
                if kind == "attn":
                    ref_o, ref_lse = dense_masked_attention(q.float(), k.float(), v.float(), layout, token_mask=tm)
                else:
                    pv = {"quant8": 8, "quant4": 4, "quantNone": None}[kind]
                    ref_o, ref_lse = online_quantized_attention(q, k, v, layout, qk_bits=8, pv_bits=pv)
        except Exception as e:  # noqa: BLE001 - a broken scenario is a row, not the end of the run
            run.failed("correct", base, e)
            continue
        tuner = _tuners()["attn" if kind == "attn" else ("mass" if kind == "mass" else "quant")]
        try:
            configs = pruned_configs(tuner, lambda: _launch(kind, q, k, v, layout, lse_in, bq, bk))
        except Exception as e:  # noqa: BLE001
            run.failed("correct", base, e)
            continue
        for cfg in tuner.configs:
            if cfg not in configs:
                run.record("correct", f"{base} w{cfg.num_warps}s{cfg.num_stages}", "PRUNED")
        for cfg in configs:
            name = f"{base} w{cfg.num_warps}s{cfg.num_stages}"
            try:
                _poison((b, h, nq, v.shape[-1]), dtype, device)
                with forced_config(tuner, cfg):
                    out = _launch(kind, q, k, v, layout, lse_in, bq, bk)
                _sync(device)
                if kind == "mass":
                    a, r = MASS_TOL[dtype]
                    err = (out - ref).abs()
                    ok = bool(torch.isfinite(out).all()) and bool((err <= a + r * ref.abs()).all())
                    run.record("correct", name, "PASS" if ok else "FAIL", max_abs=float(err.max()))
                    continue
                facts = check_attention(*out, ref_o, ref_lse, dtype, quantized=kind != "attn")
                ok = facts.pop("ok")
                run.record("correct", name, "PASS" if ok else "FAIL", **facts)
            except Exception as e:  # noqa: BLE001
                run.failed("correct", name, e)
    large_offsets(run, device, smoke)


def large_offsets(run: Run, device, smoke: bool) -> None:
    """Attention on fused-QKV views ``[B, N, 3, H, D]`` (token stride 3*H*D): at 120k tokens and 40
    heads the last key row sits 1.8e9 elements (3.7e9 bytes) past the base; first and last query blocks
    of the first and last (batch, head) against an fp32 gather of their listed blocks."""
    import torch

    from diffattn.kernels import BlockSparseLayout, cdiv
    from diffattn.kernels.triton_attention import triton_block_sparse_attention

    b, h, n, d, bs = (1, 2, 300, 64, 64) if smoke else (2, 40, 120_000, 128, 64)
    name = f"fused-qkv B{b} H{h} N{n} D{d} bf16 max_row_offset={(n - 1) * 3 * h * d:.3g}"
    if run.over_budget("correct", name):
        return
    try:
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=torch.bfloat16, generator=g)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        m = cdiv(n, bs)
        order = torch.rand(1, h, m, m, device=device, generator=g).argsort(-1)[..., : max(1, m // 50)]
        mask = torch.zeros(1, h, m, m, dtype=torch.bool, device=device).scatter_(-1, order, True)
        mask[..., m - 1] = True
        layout = BlockSparseLayout.from_block_mask(mask, bs, bs, n, n)
        o, lse = triton_block_sparse_attention(q, k, v, layout)
        _sync(device)
        worst = 0.0
        for bi, hi in ((0, 0), (b - 1, h - 1)):
            for qb in (0, m - 1):
                blocks = layout.kv_indices[0, hi, qb, : int(layout.kv_counts[0, hi, qb])].tolist()
                cols = torch.cat([torch.arange(j * bs, min(n, (j + 1) * bs), device=device) for j in blocks])
                rows = torch.arange(qb * bs, min(n, (qb + 1) * bs), device=device)
                s = q[bi, hi, rows].float() @ k[bi, hi, cols].float().T * d**-0.5
                ref_o = torch.softmax(s, -1) @ v[bi, hi, cols].float()
                worst = max(worst, float((o[bi, hi, rows].float() - ref_o).abs().max()),
                            float((lse[bi, hi, rows] - torch.logsumexp(s, -1)).abs().max()))
        from diffattn.kernels.tolerances import OUTPUT_TOL

        ok = math.isfinite(worst) and worst <= 4 * OUTPUT_TOL[torch.bfloat16][0]
        run.record("correct", name, "PASS" if ok else "FAIL", max_abs=worst)
    except Exception as e:  # noqa: BLE001
        run.failed("correct", name, e)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ kernel
def kernel_timings(run: Run, device, smoke: bool, backends: tuple[str, ...]) -> None:
    """SDPA flash (with the Triton pass) and ``backends`` on the dense and the methods' layouts."""
    import torch
    import torch.nn.functional as F

    from diffattn.kernels import BlockSparseLayout

    from .kernel import _sparse_call

    for shape, (b, h, n, d, grid, text) in (SMOKE_SHAPES if smoke else SHAPES).items():
        dtype = torch.float16 if smoke else torch.bfloat16
        if run.over_budget("kernel", shape):
            continue
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
        common = {"shape": shape, "B": b, "H": h, "N": n, "D": d, "dtype": str(dtype).replace("torch.", "")}

        def sdpa():
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

        dense_ms = next((r["ms"] for r in run.rows if r.get("backend") == "sdpa-flash" and r.get("shape") == shape
                         and r["status"] == "OK"), None)
        if dense_ms is None:
            try:
                dense_ms = _bench_ms(sdpa, device, smoke)
                run.record("kernel", f"{shape} sdpa-flash dense", "OK", **common, backend="sdpa-flash", density=1.0,
                           ms=dense_ms, tflops=_tflops(b, h, n, n, d, 1.0, dense_ms), ratio_to_dense=1.0)
            except Exception as e:  # noqa: BLE001
                run.failed("kernel", f"{shape} sdpa-flash dense", e, **common)
        layouts: list[tuple[str, float, list]] = []
        dense = BlockSparseLayout.dense(1, 1, n, n, 128 if not smoke else 64, 64, device=device)
        layouts.append(("dense", 1.0, [(q, k, v, dense, None)]))
        for method in SMOKE_KERNEL_METHODS if smoke else _video_methods():
            if run.over_budget("kernel", f"{shape} {method} layout"):
                break
            try:
                calls = _captured_calls(method, grid, b, h, d, dtype, device)
                work = sum(c[3].density * c[0].shape[0] * c[0].shape[1] * c[0].shape[2] * c[1].shape[2] for c in calls)
                nv = calls[0][0].shape[2] if calls else n
                layouts.append((method, work / (b * h * nv * nv), calls))
            except Exception as e:  # noqa: BLE001
                run.failed("kernel", f"{shape} {method} layout", e, **common)
        for lname, density, calls in layouts:
            for backend in backends:
                name = f"{shape} {lname} {backend}"
                if run.over_budget("kernel", name):
                    break
                try:
                    t0 = time.perf_counter()
                    fns = [_sparse_call(backend, cq, ck, cv, cl, cs) for cq, ck, cv, cl, cs in calls]

                    def fn(fns=fns):
                        return [f() for f in fns]

                    fn()
                    _sync(device)
                    first_s = time.perf_counter() - t0
                    ms = _bench_ms(fn, device, smoke)
                    blocks, nv = calls[0][3], calls[0][0].shape[2]
                    run.record("kernel", name, "OK", **{**common, "N": nv}, backend=backend, layout=lname,
                               density=density, config=f"{blocks.block_q}x{blocks.block_k}", calls=len(calls), ms=ms,
                               first_call_s=first_s, tflops=_tflops(b, h, nv, nv, d, density, ms),
                               ratio_to_dense=(dense_ms / ms) if dense_ms else None,
                               best_config=str(getattr(_tuners()["attn"], "best_config", None))
                               if backend == "triton" else None)
                except Exception as e:  # noqa: BLE001
                    run.failed("kernel", name, e, **common, backend=backend, layout=lname)
        del q, k, v, layouts
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _video_methods() -> list[str]:
    """The video methods whose block-sparse kernel calls are replayed (read from the registry when the
    check runs: importing it at the top would load torch before a missing one could be reported)."""
    from diffattn.methods import method_names

    return method_names(family="video", benchmark="kernel")


def _captured_calls(method: str, grid, b, h, d, dtype, device) -> list:
    """The (q, k, v, layout, scale) kernel calls ``method`` makes at its steady step on synthetic inputs."""
    from .kernel import run_method

    backend = "triton" if device.type == "cuda" else "torch"
    run = run_method(method, grid, b, h, d, dtype, device, backend)
    return [(c.q, c.k, c.v, c.layout, c.scale) for c in run.calls]


# ------------------------------------------------------------------------------------------ model
def model_step(run: Run, device, smoke: bool) -> None:
    """One steady-state step (both CFG calls) of a Wan2.1-1.3B-shape transformer per method."""
    import torch

    import diffattn

    from .common import build_model
    from .e2e import PRESETS, _toy_wan, _Schedule

    name = "toy-wan" if smoke else "wan1.3b-480p"
    preset = PRESETS[name]
    dtype = torch.float32 if smoke else torch.bfloat16
    if run.over_budget("model", name):
        return
    t0 = time.perf_counter()
    model = build_model(_toy_wan if smoke else preset.build, device, dtype)
    inputs = preset.inputs(device, dtype)
    run.record("model", f"{name} build", "OK", model=name, seconds=time.perf_counter() - t0,
               params_b=sum(p.numel() for p in model.parameters()) / 1e9)
    dense_ms = None
    steps = 50
    for method in ("dense", *(SMOKE_MODEL_METHODS if smoke else _video_methods())):
        if run.over_budget("model", f"{name} {method}"):
            break
        applied = False
        try:
            diffattn.apply(model, method, min_tokens=0)
            applied = True
            from diffattn.processors.sparse import state_of

            schedule = _Schedule(torch.linspace(999, 0, steps))
            state_of(model).tracker.scheduler = schedule
            times = []
            t_warm = time.perf_counter()
            # Warm-up at a dense early step and at the searched/planned steps, then time late steps.
            warm = [0] if smoke else [0, 5, 10, 25, 30]
            timed_steps = [40, 41] if not smoke else [40]
            with torch.no_grad():
                for s in warm + timed_steps:
                    schedule.step_index = None if s == 0 else s
                    inputs["timestep"] = torch.full_like(inputs["timestep"], float(schedule.timesteps[s]))
                    if s == timed_steps[0]:
                        _sync(device)
                        warm_s = time.perf_counter() - t_warm
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                    t = time.perf_counter()
                    for _ in range(preset.cfg_calls):
                        model(**inputs, return_dict=False)
                    _sync(device)
                    if s in timed_steps:
                        times.append((time.perf_counter() - t) * 1e3)
            step_ms = sorted(times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            density = diffattn.stats(model).summary().get("density")
            dense_ms = step_ms if method == "dense" else dense_ms
            run.record("model", f"{name} {method}", "OK", model=name, method=method, ms=step_ms,
                       warmup_s=warm_s, peak_mem_gib=peak, density=density,
                       speedup_vs_dense=(dense_ms / step_ms) if dense_ms else None)
        except Exception as e:  # noqa: BLE001
            run.failed("model", f"{name} {method}", e, model=name, method=method)
        finally:
            if applied:
                diffattn.remove(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ precompile
def precompile_scenarios(smoke: bool) -> list:
    """The kernel specialisations the correctness and timing phases launch (same dtypes, head dims,
    blocks and divisibility of sizes), every config of each."""
    from diffattn.kernels.aot import Scenario

    out = []
    for _tag, kind, dt, d, bq, bk, _b, h, nq, _nk, variant in (SMOKE_CORRECTNESS if smoke else CORRECTNESS):
        partial = variant.startswith("window")
        k = "attn" if kind == "attn" else ("mass" if kind == "mass" else "quant")
        pv = {"quant8": 8, "quant4": 4, "quantNone": None}.get(kind)
        out.append(Scenario(k, dt, d, bq, bk, partial=partial, pv_bits=pv, n=min(nq, 4096), heads=h))
    for _shape, (_b, h, n, d, _grid, _text) in (SMOKE_SHAPES if smoke else SHAPES).items():
        out += [Scenario("attn", "bf16", d, 128, 64, n=n, heads=h), Scenario("attn", "bf16", d, 64, 64, n=n, heads=h),
                Scenario("mass", "bf16", d, 64, 64, n=n, heads=h),
                Scenario("quant", "bf16", d, 64, 64, pv_bits=8, n=n, heads=h)]
    return list(dict.fromkeys(out))


def precompile(run: Run, device, workers: int) -> None:
    import torch

    from diffattn.kernels.aot import compile_all

    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor if major * 10 + minor in (80, 90) else (90 if major >= 9 else 80)
    t0 = time.perf_counter()
    cache = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    try:
        rows = compile_all((arch,), jobs=workers, todo=precompile_scenarios(False), cache_dir=cache)
        bad = [r for r in rows if not r.get("ok")]
        run.record("precompile", f"sm_{arch} {len(rows)} configs, {workers} workers", "OK" if not bad else "FAIL",
                   seconds=time.perf_counter() - t0, error=(bad[0].get("error") if bad else None))
    except Exception as e:  # noqa: BLE001
        run.failed("precompile", f"sm_{arch}", e)


# ------------------------------------------------------------------------------------------ main
def summary(run: Run) -> int:
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    print(f"{'phase':10s} {'status':6s} {'name':60s} {'ms':>9s} {'TFLOP/s':>8s} {'x dense':>7s} {'GiB':>6s}")
    counts: dict[tuple[str, str], int] = {}
    for r in run.rows:
        counts[(r["phase"], r["status"])] = counts.get((r["phase"], r["status"]), 0) + 1
        if r["phase"] == "correct" and r["status"] == "PASS":
            continue
        ms, tf, ratio, mem = (r.get(k) for k in ("ms", "tflops", "ratio_to_dense", "peak_mem_gib"))
        ratio = ratio if ratio is not None else r.get("speedup_vs_dense")
        print(f"{r['phase']:10s} {r['status']:6s} {r['name'][:60]:60s} "
              f"{'' if ms is None else f'{ms:9.3f}':>9s} {'' if tf is None else f'{tf:8.1f}':>8s} "
              f"{'' if ratio is None else f'{ratio:7.2f}':>7s} {'' if mem is None else f'{mem:6.1f}':>6s}"
              + (f"  {r['error'][:100]}" if r.get("error") else ""))
    print("counts:", ", ".join(f"{p}/{s}: {c}" for (p, s), c in sorted(counts.items())))
    print(f"total {run.elapsed():.0f} s; rows in {run.path}")
    failed = [r for r in run.rows if r["status"] in ("FAIL", "ERROR")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="folder for gpu.jsonl (appended to)")
    p.add_argument("--smoke", action="store_true", help="toy shapes on CPU in the Triton interpreter (a CI test)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds after which phases are skipped (default 330)")
    p.add_argument("--workers", type=int, default=None, help="precompile processes (default: CPU count, at most 16)")
    p.add_argument("--skip", nargs="*", default=[], choices=["precompile", "correct", "kernel", "model"])
    a = p.parse_args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if a.smoke and not interpreting:
        # triton.jit picks the interpreter when a kernel module is imported: run in a fresh process.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        args = argv if argv is not None else sys.argv[1:]
        return subprocess.run([sys.executable, "-m", "diffattn.bench.gpu", *args], env=env).returncode
    if not a.smoke and interpreting:
        p.error("TRITON_INTERPRET is set: unset it for the GPU run, or pass --smoke")
    import torch

    from .common import environment

    if a.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        p.error("no CUDA device: `diffattn bench gpu` measures a GPU; --smoke runs it at toy shapes on CPU")
    else:
        device = torch.device("cuda")
    env = environment(device)
    run = Run(Path(a.out), env, a.budget if not a.smoke else float("inf"))
    run.record("env", "environment", "OK", smoke=a.smoke)
    try:
        if device.type == "cuda" and "precompile" not in a.skip:
            precompile(run, device, a.workers or min(16, os.cpu_count() or 1))
        if "correct" not in a.skip:
            correctness(run, device, a.smoke)
        # FlexAttention compiles once per shape and layout: it comes last so the budget cuts it first.
        if "kernel" not in a.skip:
            kernel_timings(run, device, a.smoke, ("triton",))
        if "model" not in a.skip:
            model_step(run, device, a.smoke)
        if "kernel" not in a.skip:
            kernel_timings(run, device, a.smoke, ("flex",))
    finally:
        code = summary(run)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
