"""torch.compile of a patched denoiser: one full graph, the same output and statistics as eager
diffattn at every step of a schedule (warm-up, searches, calibration, layout reuse), no recompilation
as the steps advance, and the compiled-then-patched orders."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo

import diffattn

from . import tiny_models as T

STEPS = 5
GRID = (3, 4, 6)

# Fields that make each method's events happen within STEPS steps on the tiny grid.
METHODS = {
    "dense": {},
    "radial": dict(dense_layers=0, dense_steps=12, decay_factor=0.5, pattern_block=16, block_size=16, backend="torch"),
    "gna": dict(kernel_size=(1, 3, 3), stride=(1, 1, 2), tile_shape=(2, 2, 4), block_size=16, backend="torch"),
    "adaspa": dict(sparsity=0.6, block_size=16, backend="torch", warmup_steps=10, search_steps=(10, 30)),
    "paro": dict(density=0.4, block_size=16, backend="torch", calibration_steps=(10, 30)),
}
# Radial needs enough frames for its decay bands to drop blocks.
GRIDS = {"radial": (8, 4, 6)}
# Row fields that tell which event a call was; compiled and eager rows must agree on them.
EVENT_FIELDS = ("layer", "step", "branch", "density", "search", "cache_hit", "warmup", "fallback", "calibrate")


class _Graphs:
    """A Dynamo backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self, name: str) -> int:
        return sum(str(n.target).startswith(f"diffattn.{name}") for g in self.graphs for n in g.graph.nodes)


def _schedule(model, kw, steps=STEPS, branches=("cond", "uncond"), no_recompile=False):
    """Run a CFG-style schedule the way diffusers pipelines do (cache_context per call); with
    ``no_recompile`` every call after the first must reuse the compiled code."""
    outs = []
    for i in range(steps):
        t = torch.full_like(kw["timestep"], 1000.0 * (steps - i) / steps)
        for name in branches:
            strict = no_recompile and bool(outs)
            with torch._dynamo.config.patch(error_on_recompile=strict):
                # UNets publish no cache context: their steps come from the timestep.
                context = (
                    model.cache_context(name, step_index=i, num_inference_steps=steps)
                    if hasattr(model, "cache_context") else contextlib.nullcontext()
                )
                with context:
                    outs.append(T.run(model, {**kw, "timestep": t}))
    return outs


def _events(rows):
    return [{k: r.get(k) for k in EVENT_FIELDS} for r in rows]


@contextlib.contextmanager
def _fresh_dynamo():
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def _clear_process_caches():
    # Radial's layout cache is process-wide and its hits appear in the rows: start both runs cold.
    from diffattn.patterns import radial

    radial._radial_layout_cached.cache_clear()


def _compare(family, method, fields, batch=1):
    kw = T.inputs(family, GRIDS.get(method, GRID), batch=batch)
    eager = T.build(family)
    diffattn.apply(eager, method, min_tokens=0, **fields)
    _clear_process_caches()
    ref = _schedule(eager, kw)
    model = T.build(family)
    diffattn.apply(model, method, min_tokens=0, **fields)
    _clear_process_caches()
    graphs = _Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with _fresh_dynamo():
        # Every call after the first (other branch, later steps, searches, calibration) reuses the code.
        outs = _schedule(compiled, kw, no_recompile=True)
    layers = len({r["layer"] for r in diffattn.stats(eager).rows})
    # One frame for the denoiser's pre-hook (diffattn::begin_forward), one for its forward.
    assert len(graphs.graphs) == 2 and graphs.ops("begin_forward") == 1
    assert graphs.ops("attend") == layers, "every patched layer must be one diffattn::attend in the graph"
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    rows_c = diffattn.stats(model).rows
    rows_e = diffattn.stats(eager).rows
    assert _events(rows_c) == _events(rows_e), "the compiled model must run the same method events"
    return rows_c


@pytest.mark.parametrize("method", list(METHODS))
def test_fullgraph_compile_matches_eager_over_a_schedule_wan(method):
    rows = _compare("wan", method, METHODS[method])
    steps = sorted({r["step"] for r in rows})
    assert steps == list(range(STEPS)) and {r["branch"] for r in rows} == {0, 1}
    if method != "dense":
        assert any(r["density"] < 1.0 for r in rows), "the sparse method must really run compiled"
    if method in ("radial", "adaspa"):
        assert any(r.get("warmup") or r["density"] == 1.0 for r in rows if r["step"] == 0), "warm-up step"
    if method == "adaspa":
        searched = sorted({r["step"] for r in rows if r.get("search")})
        assert len(searched) == 2, f"two searches expected, got steps {searched}"
        assert any(r.get("cache_hit") for r in rows), "layout reuse steps expected"
    if method == "paro":
        assert any(r.get("search") for r in rows) and any(r.get("cache_hit") for r in rows)


@pytest.mark.parametrize("family,method", [("hunyuanvideo", "radial"), ("cogvideox", "adaspa")])
def test_fullgraph_compile_matches_eager_other_families(family, method):
    rows = _compare(family, method, METHODS[method], batch=2)
    assert any(r["density"] < 1.0 for r in rows)


def _eager_adaspa_wan():
    """Inputs, the eager AdaSpa Wan model and its three-step cond-only schedule: the reference of the
    compiled runs below."""
    kw = T.inputs("wan", GRID, batch=1)
    eager = T.build("wan")
    diffattn.apply(eager, "adaspa", min_tokens=0, **METHODS["adaspa"])
    return kw, eager, _schedule(eager, kw, steps=3, branches=("cond",))


def test_inductor_compile_matches_eager():
    kw, eager, ref = _eager_adaspa_wan()
    fields = METHODS["adaspa"]
    model = T.build("wan")
    diffattn.apply(model, "adaspa", min_tokens=0, **fields)
    with _fresh_dynamo():
        compiled = torch.compile(model, fullgraph=True)
        outs = _schedule(compiled, kw, steps=3, branches=("cond",))
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert _events(diffattn.stats(model).rows) == _events(diffattn.stats(eager).rows)


def test_compile_then_apply_runs_the_method_compiled():
    kw = T.inputs("wan", GRIDS["radial"], batch=1)
    fields = METHODS["radial"]
    eager = T.build("wan")
    diffattn.apply(eager, "radial", min_tokens=0, **fields)
    _clear_process_caches()
    ref = _schedule(eager, kw, steps=3, branches=("cond",))
    graphs = _Graphs()
    compiled = torch.compile(T.build("wan"), fullgraph=True, backend=graphs)
    diffattn.apply(compiled, "radial", min_tokens=0, **fields)
    _clear_process_caches()
    with _fresh_dynamo():
        outs = _schedule(compiled, kw, steps=3, branches=("cond",))
    assert graphs.ops("attend") == 2
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    rows = diffattn.stats(compiled).rows
    assert _events(rows) == _events(diffattn.stats(eager).rows)
    assert any(r["density"] < 1.0 for r in rows)


def test_apply_to_a_pipeline_with_a_compiled_transformer():
    fields = METHODS["adaspa"]
    pipe = T.wan_pipeline()
    eager_pipe = T.wan_pipeline()
    graphs = _Graphs()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=graphs)
    diffattn.apply(pipe, "adaspa", min_tokens=0, **fields)
    diffattn.apply(eager_pipe, "adaspa", min_tokens=0, **fields)
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    args = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds * 0.5, height=64, width=96, num_frames=9,
                num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    with _fresh_dynamo():
        out = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    ref = eager_pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    assert graphs.ops("attend") == 2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    rows = diffattn.stats(pipe).rows
    assert _events(rows) == _events(diffattn.stats(eager_pipe).rows)
    assert sum(bool(r.get("search")) for r in rows) > 0 and any(r["density"] < 1.0 for r in rows)


@pytest.mark.parametrize("method,fields", [("tome", {}), ("agent", dict(agent_steps=2))])
def test_fullgraph_compile_matches_eager_on_a_unet(method, fields):
    """ToMe and AgentSD match tokens on the block input (kept by a block pre-hook, traced with the
    forward); AgentSD switches phase at step 2 of 3."""
    kw = T.inputs("unet", (1, 16, 16), batch=2)
    eager = T.build("unet")
    diffattn.apply(eager, method, min_tokens=0, **fields)
    ref = _schedule(eager, kw, steps=3, branches=("cond",))
    model = T.build("unet")
    diffattn.apply(model, method, min_tokens=0, **fields)
    graphs = _Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with _fresh_dynamo():
        outs = _schedule(compiled, kw, steps=3, branches=("cond",), no_recompile=True)
    assert len(graphs.graphs) == 2 and graphs.ops("attend") == 4
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    rows = diffattn.stats(model).rows
    assert [(r["step"], r.get("phase"), r["density"]) for r in rows] == [
        (r["step"], r.get("phase"), r["density"]) for r in diffattn.stats(eager).rows
    ]
    assert any(r["density"] < 1.0 for r in rows)
    if method == "agent":
        assert {r["phase"] for r in rows if r["step"] == 2} != {"agent"}, "the phase switch must happen"


def test_set_attn_processor_route_runs_compiled():
    """A shared processor set with set_attn_processor on a model compiled before its first forward: the
    model is adopted before the compiled frame starts, so the first forward already runs the method."""
    kw, eager, ref = _eager_adaspa_wan()
    fields = METHODS["adaspa"]
    model = T.build("wan")
    model.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.make_config("adaspa", **fields), min_tokens=0))
    graphs = _Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    with _fresh_dynamo():
        outs = _schedule(compiled, kw, steps=3, branches=("cond",), no_recompile=True)
    assert graphs.ops("attend") == 2
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    rows = diffattn.stats(compiled).rows
    assert _events(rows) == _events(diffattn.stats(eager).rows)
    assert any(r["density"] < 1.0 for r in rows) and any(r.get("search") for r in rows)
    diffattn.remove(compiled)


def test_module_compile_after_apply():
    """``model.compile()`` traces the module's hooks with its forward; the schedule still advances at
    run time (PARO calibrates, reuses its orders, calibrates again)."""
    kw = T.inputs("wan", GRID, batch=1)
    fields = METHODS["paro"]
    eager = T.build("wan")
    diffattn.apply(eager, "paro", min_tokens=0, **fields)
    ref = _schedule(eager, kw, branches=("cond",))
    model = T.build("wan")
    diffattn.apply(model, "paro", min_tokens=0, **fields)
    graphs = _Graphs()
    model.compile(fullgraph=True, backend=graphs)
    with _fresh_dynamo():
        outs = _schedule(model, kw, branches=("cond",), no_recompile=True)
    assert graphs.ops("attend") == 2 and graphs.ops("begin_forward") == 1
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    rows = diffattn.stats(model).rows
    assert _events(rows) == _events(diffattn.stats(eager).rows)
    assert any(r.get("search") for r in rows) and any(r.get("cache_hit") for r in rows)
