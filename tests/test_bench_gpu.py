"""``diffattn bench gpu --smoke``: the GPU check's own code at toy shapes on CPU (Triton interpreter).
Every phase runs and writes complete rows; every kernel config passes its correctness check."""

import json

from diffattn.bench import gpu


def test_bench_gpu_smoke_runs_every_phase(tmp_path, capsys):
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    for r in rows:
        for key in ("device", "torch", "triton", "commit", "phase", "name", "status", "error"):
            assert key in r, (key, r["name"])
    by_phase = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r)
    assert set(by_phase) == {"env", "correct", "kernel", "model"}
    bad = [r for r in by_phase["correct"] if r["status"] not in ("PASS", "PRUNED")]
    assert not bad, bad
    tags = {r["name"].split()[0] for r in by_phase["correct"]}
    assert {t for t, *_ in gpu.SMOKE_CORRECTNESS} | {"fused-qkv"} <= tags
    kernel = {(r.get("layout"), r.get("backend")) for r in by_phase["kernel"] if r["status"] == "OK"}
    for layout in ("dense", *gpu.SMOKE_KERNEL_METHODS):
        assert {(layout, "triton"), (layout, "flex")} <= kernel, kernel
    assert (None, "sdpa-flash") in kernel
    model = {r.get("method") for r in by_phase["model"] if r["status"] == "OK"}
    assert {"dense", *gpu.SMOKE_MODEL_METHODS} <= model
    assert all(r["ms"] > 0 for r in by_phase["kernel"] + by_phase["model"] if r.get("ms") is not None)
    assert "summary" in capsys.readouterr().out
