"""One rank of the context-parallel check (``tests/test_parallel.py`` launches two over gloo).

Every case runs the tiny Wan model for a 4-step schedule (warm-up, search/calibration and reuse
steps) once in this process without parallelism and once sharded, in the order the case names, and
writes each rank's largest difference and stats rows to ``$DIFFATTN_CP_OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffattn  # noqa: E402
from tests import tiny_models as T  # noqa: E402

STEPS = 4
GRID = (8, 2, 8)  # 128 tokens, 64 per rank; radial and GNA are sparse on it


def cases(calibration: str):
    from diffusers import ContextParallelConfig

    b = dict(block_size=16, backend="torch")
    methods = {
        "dense": diffattn.DenseConfig(**b),
        "radial": diffattn.RadialConfig(dense_layers=0, pattern_block=16, **b),
        "gna": diffattn.GNAConfig(kernel_size=(3, 3, 3), stride=(1, 1, 1), tile_shape=(1, 4, 4), **b),
        # With every head counted easy, the head-adaptive rule moves sparsity from one of the two heads
        # to the other, and they sit on different ranks: it must see both heads' recall.
        "adaspa": diffattn.AdaSpaConfig(sparsity=0.5, recall_threshold=0.0, **b),
        "paro": diffattn.PAROConfig(density=0.5, **b),
        "agent": diffattn.AgentConfig(layout="dit", agent_steps=50, num_agents=8),
    }
    # The exchange is the same in every mode: each method runs in one mode, the modes and the two
    # orders alternate over the methods, so one short launch covers them all.
    modes = {"ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2)}
    for i, (name, cfg) in enumerate(methods.items()):
        mode = ("ulysses", "ring")[i % 2]
        order = ("apply-first", "apply-first", "parallel-first", "parallel-first")[i % 4]
        yield f"{name}/{mode}/{order}", cfg, lambda d=modes[mode]: ContextParallelConfig(**d), order, "wan"
    yield "radial/ulysses/processor-route", methods["radial"], lambda: ContextParallelConfig(ulysses_degree=2), "processor", "wan"
    # Flux's joint sequence: each rank holds text and image tokens, gathered rank by rank.
    flux = diffattn.GNAConfig(kernel_size=(1, 3, 3), stride=(1, 1, 1), tile_shape=(1, 2, 8), **b)
    yield "gna/ring/flux", flux, lambda: ContextParallelConfig(ring_degree=2), "apply-first", "flux"
    # A calibration file holds every head; each rank uses its own heads' orders and masks.
    loaded = methods["paro"].replace(calibration=calibration)
    yield "paro/ring/calibration-file", loaded, lambda: ContextParallelConfig(ring_degree=2), "parallel-first", "wan"


def family_inputs(family: str) -> dict:
    torch.manual_seed(1)
    if family == "flux":
        return T.TINY["flux"].inputs((1, 6, 8), batch=2, text=6)  # 48 image + 6 text tokens
    return T.inputs("wan", GRID)


def schedule(model, kw):
    outs = []
    for step in range(STEPS):
        with model.cache_context("cond", step_index=step, num_inference_steps=STEPS):
            outs.append(T.run(model, {**kw, "timestep": torch.full((2,), 900.0 - 200 * step)}))
    return outs


def uneven_heads(kw) -> dict:
    """Three heads over two ranks, padded with a zero head: radial, AdaSpa (per-head rule) and PARO
    (online calibration) give the one-process output on both ranks (rank 1 holds head 2 and the zero
    head) over a 4-step schedule, and their statistics are those of the model's heads; AdaSpa's
    head-adaptive rule, which ranks every head, raises on every rank before any exchange."""
    from diffusers import ContextParallelConfig

    b = dict(block_size=16, backend="torch")
    methods = {
        "radial": diffattn.RadialConfig(dense_layers=0, dense_steps=0, pattern_block=16, **b),
        "adaspa": diffattn.AdaSpaConfig(sparsity=0.5, warmup_steps=0, search_steps=(0, 25), head_adaptive=False, **b),
        "paro": diffattn.PAROConfig(density=0.5, **b),
        "adaspa-adaptive": diffattn.AdaSpaConfig(sparsity=0.5, warmup_steps=0, **b),
        # one head over two ranks: rank 1 holds only a zero head and computes nothing
        "radial-1-head": diffattn.RadialConfig(dense_layers=0, dense_steps=0, pattern_block=16, **b),
    }
    report: dict = {"log": []}
    handler = logging.Handler()
    handler.emit = lambda record: report["log"].append(record.getMessage())
    logging.getLogger("diffattn").addHandler(handler)
    keep = ("method", "step", "heads", "padded_heads", "density", "recall", "planned_density")
    for name, cfg in methods.items():
        heads = 1 if name.endswith("1-head") else 3
        torch.manual_seed(0)
        ref = T.wan_model(heads=heads, layers=1).eval()
        torch.manual_seed(0)
        model = T.wan_model(heads=heads, layers=1).eval()
        diffattn.apply(ref, cfg, min_tokens=0)
        want = schedule(ref, kw)
        diffattn.apply(model, cfg, min_tokens=0)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        try:
            got = schedule(model, kw)
        except ValueError as e:
            report[name] = {"refused": str(e)}
            continue
        report[name] = {
            "diff": max(float((g - w_).abs().max()) for g, w_ in zip(got, want)),
            "rows": [{k: r.get(k) for k in keep} for r in diffattn.stats(model).rows],
            "ref_rows": [{k: r.get(k) for k in keep} for r in diffattn.stats(ref).rows],
        }
    logging.getLogger("diffattn").removeHandler(handler)
    return report


def main() -> None:
    # diffusers places rank r on device `r % torch.accelerator.device_count()`, which divides by zero
    # on a machine without an accelerator; one "device" (the CPU) is what this check runs on.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    calibration = os.path.join(os.environ["DIFFATTN_CP_OUT"], f"paro-rank{rank}.pt")
    refs = {}
    for name, cfg, parallel, order, family in cases(calibration):
        kw = family_inputs(family)
        if (cfg, family) not in refs:
            ref = T.build(family)
            diffattn.apply(ref, cfg, min_tokens=0)
            refs[cfg, family] = (
                schedule(ref, kw), [{"step": r["step"], "density": r["density"]} for r in diffattn.stats(ref).rows]
            )
            if cfg.method == "paro" and cfg.calibration is None:
                diffattn.method_of(ref).save_calibration(calibration)  # for the calibration-file case
        want, ref_rows = refs[cfg, family]
        model = T.build(family)
        if order == "apply-first":
            diffattn.apply(model, cfg, min_tokens=0)
            model.enable_parallelism(config=parallel())
        elif order == "parallel-first":
            model.enable_parallelism(config=parallel())
            diffattn.apply(model, cfg, min_tokens=0)
        else:
            model.enable_parallelism(config=parallel())
            model.set_attn_processor(diffattn.SparseAttnProcessor(cfg, min_tokens=0))
        got = schedule(model, kw)
        rows = [
            {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool, tuple, list)) and k != "time_ms"}
            for r in diffattn.stats(model).rows
        ]
        report[name] = {
            "diff": max(float((g - w).abs().max()) for g, w in zip(got, want)),
            "rows": rows,
            "ref_rows": ref_rows,
        }
    report["uneven"] = uneven_heads(family_inputs("wan"))
    with open(os.path.join(os.environ["DIFFATTN_CP_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
