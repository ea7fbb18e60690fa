"""diffattn under diffusers context parallelism: two CPU ranks over gloo give the single-process
output with the sparse method running on each rank's heads; what cannot run exactly refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import diffattn

from . import tiny_models as T
from .tolerances import MODEL_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ulysses_and_ring_match_one_process_in_either_order(tmp_path):
    # The ranks run on the CPU over gloo, also on a machine with a GPU.
    env = dict(os.environ, DIFFATTN_CP_OUT=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "parallel_worker.py")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    uneven = [ranks[r].pop("uneven") for r in (0, 1)]
    for r in (0, 1):
        assert [m for m in uneven[r]["log"] if "pads the 3 attention heads" in m] == [
            "diffattn: context parallelism pads the 3 attention heads to 4 with zero heads (33% more attention "
            "work); a degree that divides 3 needs none"
        ], uneven[r]["log"]
        refused = uneven[r]["adaspa-adaptive"]["refused"]
        assert "cannot run on padded heads" in refused and "head_adaptive=False" in refused
        for method in ("radial", "adaspa", "paro"):
            got = uneven[r][method]
            assert got["diff"] <= MODEL_TOL[0], f"3 heads over 2 ranks, {method}: rank {r} is {got['diff']:.2e} off"
            want = {"method": method, "heads": [[0, 2], [2, 3]][r], "padded_heads": [None, 1][r]}
            assert len(got["rows"]) == len(got["ref_rows"]) == 4, got["rows"]
            assert all({k: row[k] for k in want} == want for row in got["rows"]), got["rows"]
            assert any(row["density"] < 1.0 for row in got["rows"]), f"{method} must run sparse on padded heads"
    one = [uneven[r]["radial-1-head"] for r in (0, 1)]
    assert one[0]["diff"] <= MODEL_TOL[0] and one[1]["diff"] <= MODEL_TOL[0], one
    assert [row["heads"] for row in one[0]["rows"]] == [[0, 1]] * 4 and one[1]["rows"] == [], "rank 1 has no model head"
    # The statistics are the model's heads': rank 0's two heads and rank 1's one make the one-process values
    # (a zero head counted on rank 1 would move them).
    for method in ("radial", "adaspa", "paro"):
        ref_rows = uneven[0][method]["ref_rows"]
        for i, ref in enumerate(ref_rows):
            a, b = (uneven[r][method]["rows"][i] for r in (0, 1))
            for key in ("density", "recall", "planned_density"):
                if ref[key] is None:
                    assert a[key] is None and b[key] is None, (method, i, key)
                else:
                    assert (2 * a[key] + b[key]) / 3 == pytest.approx(ref[key], abs=1e-6), (method, i, key, a, b, ref)
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == 9
    for case in ranks[0]:
        method, mode, _ = case.split("/")
        per_rank = [ranks[r][case] for r in (0, 1)]
        for r, got in enumerate(per_rank):
            assert got["diff"] <= MODEL_TOL[0], f"{case}: rank {r} is {got['diff']:.2e} from one process"
            rows = got["rows"]
            assert len(rows) == len(got["ref_rows"]) == 8, case  # 2 layers x 4 steps
            assert all(row["method"] == method and "fallback" not in row for row in rows), case
            assert all(row["parallel"] == f"{mode}2" and row["heads"] == [r, r + 1] for row in rows), case
            if method != "dense":
                assert any(row["density"] < 1.0 for row in rows), f"{case}: rank {r} never ran sparse"
        # Each rank reports its own head; their mean is the one-process layout's density.
        for a, b, ref in zip(per_rank[0]["rows"], per_rank[1]["rows"], per_rank[0]["ref_rows"]):
            assert a["step"] == b["step"] == ref["step"]
            assert (a["density"] + b["density"]) / 2 == pytest.approx(ref["density"], abs=1e-6), case
    adaspa = [row["density"] for r in (0, 1) for row in ranks[r]["adaspa/ring/parallel-first"]["rows"][-2:]]
    assert len(set(adaspa)) > 1, "the head-adaptive rule must move sparsity between the ranks' heads"


def _parallel(**degrees):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))


@pytest.mark.parametrize("order", ["apply-first", "parallel-first", "processor-route"])
def test_context_parallelism_refuses_what_it_cannot_serve_exactly(order):
    model = T.build("wan")
    if order == "apply-first":
        diffattn.apply(model, "radial", min_tokens=0)
        with pytest.raises(NotImplementedError, match="radial.*ulysses2.*_anything"):
            model.blocks[0].attn1.processor._parallel_config = _parallel(ulysses_degree=2, ulysses_anything=True)
        return
    model._parallel_config = _parallel(ring_degree=2)
    if order == "parallel-first":
        with pytest.raises(NotImplementedError, match="'tome'.*ring2.*UNet block input"):
            diffattn.apply(model, "tome")
        with pytest.raises(NotImplementedError, match="'agent'.*ring2.*layout='dit'"):
            diffattn.apply(model, "agent")
        return
    model.set_attn_processor(diffattn.SparseAttnProcessor("tome", min_tokens=0))
    with pytest.raises(NotImplementedError, match="'tome'.*ring2"):
        T.run(model, T.inputs("wan", (3, 4, 6)))


def test_paro_calibrated_on_one_rank_s_heads_is_not_saved_as_a_whole():
    method = diffattn.processors.sparse.get_method_class("paro")(
        diffattn.PAROConfig(block_size=16, density=0.5, calibration_steps=(0,), backend="torch")
    )
    from diffattn.methods import AttnContext

    q = torch.randn(1, 1, 2 * 4 * 8, 16)
    method.attend(q, q, q, AttnContext(layer="l0", grid=(2, 4, 8), step=0, num_steps=4, heads=(1, 2, 2)))
    with pytest.raises(ValueError, match="only this rank's heads"):
        method.save_calibration("unused.pt")


@pytest.mark.parametrize("layout", ["key-2d", "key-4d", "rows-local", "keys-local", "whole", "both-local"])
def test_a_ranks_mask_becomes_the_whole_sequences(layout):
    from diffattn.processors.parallel import whole_sequence_mask

    world, s, b = 3, 4, 2
    n = world * s
    g = torch.Generator().manual_seed(0)
    keys = torch.rand(b, n, generator=g) > 0.3
    full = torch.rand(b, 1, n, n, generator=g) > 0.3
    shard = lambda r: slice(r * s, (r + 1) * s)  # noqa: E731 - rank r's tokens
    local, expected = {
        "key-2d": (lambda r: keys[:, shard(r)], keys[:, None, None]),
        "key-4d": (lambda r: keys[:, None, None, shard(r)], keys[:, None, None]),
        "rows-local": (lambda r: full[:, :, shard(r)], full),
        "keys-local": (lambda r: full[..., shard(r)], full),
        "whole": (lambda r: full, full),
        "both-local": (lambda r: full[:, :, shard(r), shard(r)], None),
    }[layout]

    def gather(t, dim):  # all_gather over the simulated ranks, each contributing its own shard
        return torch.cat([local(r) for r in range(world)], dim=dim)

    for rank in range(world):
        if expected is None:
            with pytest.raises(NotImplementedError, match="other ranks' keys are missing"):
                whole_sequence_mask(local(rank), s, world, gather)
        else:
            assert torch.equal(whole_sequence_mask(local(rank), s, world, gather), expected)
    with pytest.raises(ValueError, match="attention masks"):
        whole_sequence_mask(torch.ones(b, n + 1, dtype=torch.bool), s, world, gather)
    # the heads are re-sharded over the ranks: a mask with a head axis cannot follow them
    with pytest.raises(NotImplementedError, match="per-head attention mask"):
        whole_sequence_mask(torch.ones(b, 2, 1, s, dtype=torch.bool), s, world, gather)
