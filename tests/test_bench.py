"""CPU smoke runs of the benchmark suite at toy shapes: the JSON schema and plots, not the numbers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from diffattn import cli
from diffattn.bench import report

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = {"device", "device_type", "torch", "triton", "commit", "date"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_kernel_bench_rows(tmp_path):
    out = tmp_path / "k.jsonl"
    assert cli.main(["bench", "kernel", "--quick", "--shapes", "toy-1k", "--backends", "torch", "sdpa",
                     "--layouts", "random", "--densities", "0.5", "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    rows = _rows(out)
    assert {r["backend"] for r in rows} == {"torch", "sdpa"}
    for r in rows:
        assert ENV_KEYS <= set(r) and r["device_type"] == "cpu"
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and 0 < r["density"] <= 1


def test_kernel_bench_method_layouts(tmp_path):
    """Each method's real layout is replayed on the kernel; GNA carries its bound, AdaSpa its search cost."""
    out = tmp_path / "k.jsonl"
    assert cli.main(["bench", "kernel", "--quick", "--shapes", "toy-2k", "--backends", "torch", "sdpa",
                     "--layouts", "radial", "gna", "adaspa", "paro", "agent",
                     "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    rows = _rows(out)
    by = {(r["layout"], r["backend"]): r for r in rows}
    assert set(by) == {
        (m, "torch") for m in ("radial", "gna", "adaspa", "paro")
    } | {(m, "method") for m in ("radial", "gna", "adaspa", "paro", "agent")} | {("adaspa", "search")}
    for r in rows:
        assert ENV_KEYS <= set(r) and r["grid"] == [8, 16, 16] and r["ms"] > 0, r
        assert "error" not in r and r["density"] > 0
    for m in ("radial", "adaspa", "paro"):
        assert by[(m, "torch")]["kernel_calls"] >= 1 and by[(m, "torch")]["density"] < 1.0
    assert by[("paro", "torch")]["density"] == pytest.approx(0.5, abs=0.05)  # its default density
    assert by[("gna", "torch")]["simulated_speedup"] > 0
    assert by[("agent", "method")]["kernel_calls"] == 0


def test_e2e_bench_rows(tmp_path):
    out = tmp_path / "e.jsonl"
    assert cli.main(["bench", "e2e", "--quick", "--steps", "2", "--methods", "dense,radial",
                     "--config", "radial:dense_steps=0", "--config", "radial:dense_layers=0",
                     "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["dense", "radial"]
    for r in rows:
        assert ENV_KEYS <= set(r) and r["bench"] == "e2e" and r["steps"] == 2
        assert r["total_s"] > 0 and 0 < r["attention_share"] <= 1 and r["fallbacks"] == 0
    assert rows[0]["density"] == 1.0 and rows[1]["density"] < 1.0
    assert rows[1]["speedup_vs_dense"] > 0 and rows[1]["config"]["dense_steps"] == 0
    # Compilation and autotuning are paid in an untimed warm-up, reported apart.
    assert all(r["warmup_s"] > 0 and r["build_s"] >= 0 for r in rows)


def test_models_are_built_on_the_target_device_in_the_target_dtype():
    from diffattn.bench.common import build_model

    # The meta device allocates nothing: a parameter created on the host first would not be on it.
    model = build_model(lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)), "meta",
                        torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    assert not model.training and torch.get_default_dtype() == torch.float32


def test_report_renders_tables_and_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    quality = {"bench": "quality", "method": "adaspa", "config": {"sparsity": 0.8}, "density": 0.2,
               "recall": 0.8, "rel_l2": 0.19, "grid": [8, 16, 24], "heads": 8, "head_dim": 64, "drift": 0.01,
               "device": "cpu", "commit": "abc"}
    gpu_kernel = {"device": "NVIDIA H100", "device_type": "cuda", "shape": "wan", "dtype": "bf16", "backend": "triton",
                  "density": 0.2, "ms": 2.0, "tflops": 300.0}
    sdpa = {**gpu_kernel, "backend": "sdpa", "density": 1.0, "ms": 8.0}
    radial_kernel = {**gpu_kernel, "layout": "radial", "density": 0.34, "ms": 3.0, "tflops": 200.0}
    search = {**gpu_kernel, "layout": "adaspa", "backend": "search", "density": 0.2, "ms": 1.5, "tflops": None}
    tiny = [{"bench": "tiny", "label": "radial", "method": "radial", "config": {"decay_factor": 0.2},
             "frames": 9, "height": 64, "width": 64, "steps": 20, "density": 0.7, "psnr": p, "identical": False,
             "ssim": 0.99, "device": "cpu", "commit": "abc", "speed": v, "dense_speed": 3.0}
            for p, v in ((31.0, 2.5), (33.0, 3.0))]
    tiny.append({**tiny[0], "label": "gna", "method": "gna", "config": {}, "psnr": None, "identical": True,
                 "ssim": 1.0, "speed": None})  # rows without a speed (older rows) show "-"
    e2e = {"bench": "e2e", "device": "NVIDIA H100", "device_type": "cuda", "model": "wan", "method": "radial",
           "total_s": 10.0, "speedup_vs_dense": 1.8, "attention_share": 0.7, "density": 0.34}
    lines = (quality, gpu_kernel, sdpa, radial_kernel, search, *tiny, e2e)
    (results / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nold\n")
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| adaspa | sparsity=0.8 | 0.01 | 0.200 | 0.800 | 0.1900 |" in text
    assert "| NVIDIA H100 | wan | bf16 | random | triton | 0.20 | 2.00 | 300 |" in text
    assert "| NVIDIA H100 | wan | bf16 | radial | triton | 0.34 | 3.00 | 200 |" in text
    assert "| NVIDIA H100 | wan | bf16 | adaspa | search | 0.20 | 1.50 | - |" in text
    assert "| radial | defaults | 2 | 0.700 | 32.0 (31.0) | 0.9900 | 2.75 (3.00) |" in text
    assert "| gna | defaults | 1 | 0.700 | ∞ (identical) | 1.0000 | - |" in text
    assert "End-to-end" in text and "UNet speed" in text and "not yet measured on a GPU" in text
    assert (results / "plots" / "quality_vs_density.png").stat().st_size > 0
    assert (results / "plots" / "kernel_speedup.png").stat().st_size > 0
    assert (results / "plots" / "tiny_psnr_vs_density.png").stat().st_size > 0
    assert (results / "plots" / "pareto.png").stat().st_size > 0
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("0.1900", "0.0100"))
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1


def test_readme_results_match_committed_json(tmp_path):
    """The README's results section is exactly what the committed JSON rows render to."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert report.main(["--results", str(ROOT / "benchmarks" / "results"), "--readme", str(readme), "--check"]) == 0


def test_bench_all_plans_what_this_machine_can_run(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.main(["bench", "all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "skipping kernel, e2e, unet" in out
    assert "$ diffattn bench quality --drifts 0.0 0.01 --out benchmarks/results/" in out
    assert "$ diffattn bench tiny --out benchmarks/results/" in out and "bench e2e" not in out
    from diffattn.bench import all as bench_all

    jobs = bench_all.plan(["kernel", "e2e"], {"device": "NVIDIA H100", "date": "2026-11-23T00:00:00Z"})
    assert [name for name, _ in jobs] == ["kernel", "e2e", "e2e", "e2e"]
    assert [args[1] for name, args in jobs if name == "e2e"] == list(bench_all.E2E_MODELS)


def test_bench_rejects_unknown_benchmark():
    with pytest.raises(SystemExit):
        cli.main(["bench", "nope"])


def test_tiny_bench_rows(tmp_path):
    out = tmp_path / "tiny.jsonl"
    assert cli.main(["bench", "tiny", "--prompts", "1", "--frames", "5", "--size", "32", "--steps", "2",
                     "--methods", "radial", "gna", "agent", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["radial", "gna", "agent"]
    for r in rows:
        assert r["bench"] == "tiny" and r["device"] == "cpu" and isinstance(r["config"], dict)
        assert r["config"]["method"] == r["method"] and r["steps"] == 2
        assert -1.0 <= r["ssim"] <= 1.0 and r["seconds"] > 0
        assert r["density"] is not None and r["density"] > 0
        assert math.isfinite(r["speed"]) and math.isfinite(r["dense_speed"]) and math.isfinite(r["drift"])
    radial, gna, agent = rows
    assert math.isfinite(radial["psnr"]) and not radial["identical"]
    # GNA's default window covers the whole 5x8x8 grid: dense up to float rounding
    assert gna["identical"] or gna["psnr"] > 100.0


def test_cpu_bench_rows_and_report(tmp_path):
    """`bench cpu` times SDPA, compiled Flex and diffattn on the same layouts; the report renders them."""
    assert cli.main(["bench", "cpu", "--lengths", "700", "--densities", "1", "0.3", "--layouts", "--no-flex",
                     "--reps", "1", "--heads", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu.jsonl")
    rows = _rows(path)
    by = {(r["density_target"], r["provider"]): r for r in rows}
    assert set(by) == {(d, p) for d in (1.0, 0.3) for p in ("sdpa", "diffattn")}
    for r in rows:
        assert ENV_KEYS <= set(r) and r["bench"] == "cpu" and r["ms"] > 0 and r["N"] == 700 and r["H"] == 2
    assert by[(1.0, "diffattn")]["paths"] == ["dense"] and by[(1.0, "diffattn")]["density"] == 1.0
    assert by[(0.3, "diffattn")]["paths"] == ["kernel"] and 0.2 < by[(0.3, "diffattn")]["density"] < 0.4
    table = "\n".join(report._cpu_table(report.load_rows(tmp_path)))
    assert "`diffattn bench cpu --lengths 700 --densities 1 0.3 --layouts --no-flex --reps 1 --heads 2`" in table and "| 700 | 1×2×64 | random | 0.27 |" in table
