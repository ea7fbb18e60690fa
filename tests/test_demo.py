"""The Gradio demo: controls from config dataclasses, validation, generation, cancellation, and the served app.

Generations use the tiny Wan pipeline with random weights at 5 frames of 32x32 px and 2 steps (320
video tokens), so each takes about a second on a CPU.
"""

import dataclasses
import threading
import time
import types

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'diffattn[demo]'")

from diffattn.apps import demo as D  # noqa: E402
from diffattn.methods import get_method_class  # noqa: E402
from diffattn.pipelines.tiny import build_tiny_pipeline  # noqa: E402
from diffattn.pipelines.video_io import read_video  # noqa: E402
from diffattn.processors.sparse import SparseAttnProcessor  # noqa: E402

from .video_reference import psnr_reference, ssim_loop  # noqa: E402

PROMPT = "a red circle moving left on a blue background"
SMALL = dict(seed=0, frames=5, height=32, width=32, steps=2)
# AdaSpa searches at step 0 (its fused search computes dense attention, so that step's mask is full)
# and runs sparse at step 1; 16-token blocks give a 20x20 block grid over the 320 video tokens.
ADASPA = {"warmup_steps": 0, "search_steps": "0", "block_size": 16, "sparsity": 0.8, "head_adaptive": False}


def _processors(pipe):
    return dict(pipe.transformer.attn_processors)


def _same_processors(pipe, before):
    after = _processors(pipe)
    return after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def runner(pipe):
    r = D.DemoRunner(pipe)
    yield r
    r.close()
    assert not r.root.exists()


@pytest.fixture(scope="module")
def result(runner, pipe):
    before = _processors(pipe)
    req = runner.request(PROMPT, "adaspa", ADASPA, **SMALL)
    seen = []
    res = runner.generate(req, progress=lambda f, text: seen.append((f, text)))
    assert _same_processors(pipe, before), "generate must restore the model's own processors"
    res.progress_seen = seen
    return res


# ------------------------------------------------------------------------------------------ controls
class _Documented:
    """A class to parse.

    Attributes:
        alpha: first line
            continued here.
        beta, gamma: shared text.
        delta: ``code`` stays readable.

    Notes:
        epsilon: not an attribute.
    """


def test_field_docs_reads_the_attributes_section():
    assert D.field_docs(_Documented) == {
        "alpha": "first line continued here.",
        "beta": "shared text.",
        "gamma": "shared text.",
        "delta": "code stays readable.",
    }


@pytest.mark.parametrize("method", D.demo_methods())
def test_controls_start_at_the_config_defaults(method):
    cls = get_method_class(method).config_cls
    specs, hidden = D.method_fields(method)
    names = {f.name for f in dataclasses.fields(cls)}
    assert {s.name for s in specs} | set(hidden) == names
    for s in specs:
        assert s.info, f"{method}.{s.name} has no description in the config docstring"
    # the controls' initial values parse back into exactly the default config
    assert D.parse_controls(method, {s.name: s.default for s in specs}) == cls()


def test_free_text_fields_are_not_offered():
    # PARO's calibration is a file path: the browser must not name files on the server
    assert D.method_fields("paro")[1] == ["calibration"]
    with pytest.raises(ValueError, match="calibration"):
        D.parse_controls("paro", {"calibration": "/etc/passwd"})


def test_demo_methods_are_the_sparse_video_methods():
    # a new sparse video method joins the demo by registering; the UNet methods and dense never do
    assert {"radial", "gna", "adaspa", "paro"} <= set(D.demo_methods())
    assert not {"dense", "tome", "agent"} & set(D.demo_methods())


def test_descriptions_come_from_the_docstrings():
    info = {s.name: s.info for s in D.method_fields("adaspa")[0]}
    assert info["sparsity"].startswith("base fraction of key blocks each query-block row drops")
    assert "Paper: 0.8 (keep 20%)" in info["sparsity"]


def test_parse_controls_reads_control_values():
    cfg = D.parse_controls("gna", {"kernel_size": "3, 4,4", "stride": "1,2, 2", "is_causal": "true, false, no",
                                "dense_steps": 2.0})
    assert cfg.kernel_size == (3, 4, 4) and cfg.is_causal == (True, False, False) and cfg.dense_steps == 2
    cfg = D.parse_controls("paro", {"qk_bits": "8", "pv_bits": "", "orders": "FHW, HWF"})
    assert cfg.qk_bits == 8 and cfg.pv_bits is None and cfg.orders == ("FHW", "HWF")
    assert D.parse_controls("adaspa", {"search_steps": "(3, 7)"}).search_steps == (3, 7)


@pytest.mark.parametrize(
    "method, values, message",
    [
        ("adaspa", {"sparsity": 1.5}, "sparsity"),
        ("adaspa", {"block_size": 48}, "power of two"),
        ("adaspa", {"mode": "fast"}, "mode"),
        ("gna", {"kernel_size": "3, 3"}, "kernel_size.*3 comma-separated"),
        ("radial", {"dense_layers": 1.5}, "dense_layers.*whole number"),
        ("radial", {"decay_factor": ""}, "decay_factor is empty"),
        ("radial", {"decay_factor": float("nan")}, "decay_factor.*finite"),
        ("adaspa", {"search_steps": "a, b"}, "search_steps.*not a whole number"),
        ("radial", {"no_such_field": 1}, "no_such_field"),
        ("nope", {}, "unknown"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_parse_controls_rejects_bad_values_with_a_clear_message(method, values, message):
    with pytest.raises(ValueError, match=message):
        D.parse_controls(method, values)


# -------------------------------------------------------------------------------------------- limits
def test_tiny_limits_follow_the_patch_size(pipe):
    lim = D.limits_for(pipe)
    assert lim.size_multiple == 4 and lim.frame_step == 1 and lim.token_stride == (1, 4, 4)
    assert lim.check(9, 64.0, 64, 20) == (9, 64, 64, 20)
    assert lim.tokens(9, 64, 64) == 9 * 16 * 16


def test_tiny_presets_fit_the_tiny_limits(pipe):
    lim = D.limits_for(pipe)
    for name, p in D.TINY_PRESETS.items():
        assert p["method"] in D.demo_methods(), name
        assert lim.check(p["frames"], p["height"], p["width"], p["steps"]) == (
            p["frames"], p["height"], p["width"], p["steps"])
    cpu = D.TINY_PRESETS["CPU speed-up"]
    assert lim.tokens(cpu["frames"], cpu["height"], cpu["width"]) == lim.max_tokens  # attention-bound


def test_video_pipeline_limits_follow_vae_and_patch():
    fake = types.SimpleNamespace(
        transformer=types.SimpleNamespace(config=types.SimpleNamespace(patch_size=(1, 2, 2))),
        vae_scale_factor_spatial=8, vae_scale_factor_temporal=4,
    )
    lim = D.limits_for(fake, max_tokens=20_000)
    assert lim.size_multiple == 16 and lim.frame_step == 4
    assert lim.tokens(33, 480, 832) == 9 * 30 * 52
    lim.check(33, 480, 832, 50)
    with pytest.raises(ValueError, match="frames=32.*multiple of 4"):
        lim.check(32, 480, 832, 50)
    with pytest.raises(ValueError, match="more than this demo.s limit of 20000"):
        lim.check(81, 480, 832, 50)


@pytest.mark.parametrize(
    "frames, height, width, steps, message",
    [
        (9, 30, 64, 10, "height=30.*multiple of 4 between 16 and 128"),
        (9, 64, 256, 10, "width=256"),
        (9, 8, 64, 10, "height=8"),
        (0, 64, 64, 10, "frames=0"),
        (40, 64, 64, 10, "frames=40"),
        (9, 64, 64, 0, "steps=0"),
        (9, 64, 64, 2.5, "steps=2.5 must be a whole number"),
        (17, 128, 128, 10, "17408 video tokens.*limit of 16384"),
    ],
    ids=["height-multiple", "width-max", "height-min", "no-frames", "too-many-frames", "no-steps",
         "fractional-steps", "too-many-tokens"],
)
def test_limits_reject_with_what_is_allowed(pipe, frames, height, width, steps, message):
    with pytest.raises(ValueError, match=message):
        D.limits_for(pipe).check(frames, height, width, steps)


@pytest.mark.parametrize(
    "prompt, method, seed, message",
    [("  ", "adaspa", 0, "prompt is empty"), (PROMPT, "dense", 0, "method='dense'"),
     (PROMPT, "adaspa", -1, "seed=-1"), (PROMPT, "adaspa", 0.5, "seed=0.5")],
    ids=["empty-prompt", "dense-is-not-a-choice", "negative-seed", "fractional-seed"],
)
def test_request_validation(runner, prompt, method, seed, message):
    with pytest.raises(ValueError, match=message):
        runner.request(prompt, method, {}, seed, 5, 32, 32, 2)


# ---------------------------------------------------------------------------------------- generation
def test_generation_dense_side_is_the_models_own_attention(result, pipe):
    out = pipe(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).frames[0]
    np.testing.assert_array_equal(result.dense_frames, out)


def test_generation_sparse_side_is_the_method(result, pipe, runner):
    import diffattn

    diffattn.apply(pipe, runner.request(PROMPT, "adaspa", ADASPA, **SMALL).config, min_tokens=0)
    try:
        out = pipe(PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0)).frames[0]
    finally:
        diffattn.remove(pipe)
    np.testing.assert_array_equal(result.sparse_frames, out)


def test_generation_outputs(result):
    for path in (result.dense_video, result.sparse_video):
        assert path.parent == result.dir
        video = read_video(path)
        assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    # the metrics compare the method's video with the dense one (by definition, not by the same code)
    assert not np.array_equal(result.sparse_frames, result.dense_frames)
    assert result.psnr == pytest.approx(psnr_reference(result.sparse_frames, result.dense_frames), rel=1e-9)
    assert result.ssim == pytest.approx(ssim_loop(result.sparse_frames, result.dense_frames), abs=1e-9)
    assert 0 < result.ssim < 1 and 0 < result.psnr < 100
    m = result.metrics()
    for key in ("dense_s", "sparse_s", "speedup", "psnr", "ssim", "density"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), (key, m[key])
    # progress: monotone, ends at 1, covers both runs
    fractions = [f for f, _ in result.progress_seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(t.startswith("dense") for _, t in result.progress_seen)
    assert any(t.startswith("adaspa") for _, t in result.progress_seen)


def test_generation_masks_and_table(result):
    assert result.layers == [f"blocks.{i}.attn1" for i in range(4)]
    assert result.mask_steps() == [0, 1]
    rows = {r[0]: r for r in result.table()}
    assert list(rows) == result.layers
    for layer in result.layers:
        assert bool(result.masks[(layer, 0)].all()), "the fused search step computes dense attention"
        mask = result.masks[(layer, 1)]
        assert mask.dtype == torch.bool and mask.shape[-2:] == (20, 20)
        # the table's density is the mean over the calls: the dense search step and the sparse step
        expected = (1.0 + float(mask.float().mean())) / 2
        assert float(rows[layer][2]) == pytest.approx(expected, abs=1e-3)
        for head in range(result.num_heads):
            counts = result.mask(layer, 1, head).sum(-1)
            assert bool((counts == counts[0]).all()), "top-k keeps the same count in every row of a head"
            assert 0 < int(counts[0]) < 20
        assert rows[layer][3] != "n/a", "AdaSpa reports recall at its search"


def test_render_mask(result, runner):
    img = D.render_mask(result, "blocks.2.attn1", 1, 1, runner.root)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    full = D.render_mask(result, "blocks.2.attn1", 1, 0, runner.root)
    assert full.shape == img.shape and not np.array_equal(full, img)
    # a call with no captured mask (a dense layer or warm-up step) is drawn as a full mask
    masks = {k: v for k, v in result.masks.items() if k != ("blocks.2.attn1", 0)}
    no_mask = dataclasses.replace(result, masks=masks)
    assert no_mask.mask("blocks.2.attn1", 0, 1) is None
    dense = D.render_mask(no_mask, "blocks.2.attn1", 1, 0, runner.root)
    assert dense.shape == img.shape and not np.array_equal(dense, img)
    assert not list(runner.root.glob("*.png")), "drawing leaves no files behind"
    for bad, message in [(("blocks.9.attn1", 0, 1), "layer"), (("blocks.0.attn1", 2, 1), "head=2"),
                         (("blocks.0.attn1", 0, 5), "step=5")]:
        with pytest.raises(ValueError, match=message):
            D.render_mask(result, *bad, runner.root)


def test_another_method_on_the_same_video_reuses_the_dense_run(result, runner, monkeypatch):
    calls = []
    sample = runner.comparer.sample
    monkeypatch.setattr(runner.comparer, "sample", lambda *a, **kw: calls.append(runner.comparer.config) or sample(*a, **kw))
    kept = []
    try:
        # the module's first generation (``result``, cold) was not kept: this one runs dense again, warm
        warm = runner.generate(runner.request(PROMPT, "radial", {}, **SMALL))
        kept.append(warm)
        assert not result.dense_reused and not warm.dense_reused
        np.testing.assert_array_equal(warm.dense_frames, result.dense_frames)
        seen = []
        again = runner.generate(runner.request(PROMPT, "gna", {}, **SMALL), progress=lambda f, t: seen.append((f, t)))
        kept.append(again)
        assert again.dense_reused and [c is None for c in calls] == [True, False, False], "only gna ran"
        np.testing.assert_array_equal(again.dense_frames, result.dense_frames)
        assert again.dense_s == warm.dense_s and "earlier run" in again.markdown()
        assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][0] == 1.0
        assert all(t.startswith("gna") for _, t in seen)
        other = runner.generate(runner.request(PROMPT, "gna", {}, **{**SMALL, "seed": 1}))
        kept.append(other)
        assert not other.dense_reused and [c is None for c in calls][3:] == [True, False]
    finally:
        for r in kept:
            runner.discard(r)


@pytest.mark.parametrize("at", [0.25, 0.75], ids=["during-dense", "during-sparse"])
def test_cancel_leaves_nothing_behind(runner, pipe, at):
    before = _processors(pipe)
    existing = set(runner.root.iterdir())
    cancel = threading.Event()

    def progress(fraction, text):
        if fraction >= at:
            cancel.set()

    # one frame of 16x16 px (16 tokens): only the cancellation is under test here
    req = runner.request(PROMPT, "adaspa", ADASPA, seed=0, frames=1, height=16, width=16, steps=2)
    runner._dense.clear()  # a dense run kept by another case would leave no dense phase to cancel
    seen = []
    with pytest.raises(D.Cancelled):
        runner.generate(req, progress=lambda f, t: (seen.append(t), progress(f, t)), cancel=cancel)
    assert seen[-1].startswith("dense" if at < 0.5 else "adaspa")
    assert set(runner.root.iterdir()) == existing
    assert _same_processors(pipe, before)
    assert not any(isinstance(p, SparseAttnProcessor) for p in _processors(pipe).values())
    assert runner._lock.acquire(blocking=False)
    runner._lock.release()


def test_old_results_are_removed(result, runner, tmp_path):
    r = D.DemoRunner(runner.pipe, keep_runs=2)
    try:
        copies = []
        for i in range(3):
            d = r.root / f"run-{i}"
            d.mkdir()
            copies.append(dataclasses.replace(result, dir=d))
            r._keep(copies[-1])
        assert [p.exists() for p in (c.dir for c in copies)] == [False, True, True]
        r.discard(copies[1])
        assert not copies[1].dir.exists() and copies[2].dir.exists()
    finally:
        r.close()
    assert not r.root.exists()


# ---------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(pipe):
    app = D.launch(pipe=pipe, port=0, block=False)
    yield app
    app.close()
    app.diffattn_runner.close()
    assert not app.diffattn_runner.root.exists()


@pytest.fixture()
def client(server, tmp_path):
    from gradio_client import Client

    return Client(server.local_url, verbose=False, download_files=str(tmp_path))


def _adaspa_kwargs():
    return {f"adaspa_{k}": v for k, v in ADASPA.items()}


def test_server_binds_to_localhost(server):
    assert server.local_url.startswith("http://127.0.0.1:")


def test_server_generation_returns_two_videos_and_finite_metrics(server, client):
    out = client.predict(prompt=PROMPT, method="adaspa", **SMALL, **_adaspa_kwargs(), api_name="/generate")
    dense_path, sparse_path, summary, metrics, table, _, _, step, image = out
    dense_path = dense_path["video"] if isinstance(dense_path, dict) else dense_path
    sparse_path = sparse_path["video"] if isinstance(sparse_path, dict) else sparse_path
    dense, sparse = read_video(dense_path), read_video(sparse_path)
    assert dense.shape == sparse.shape == (5, 32, 32, 3)
    for key in ("dense_s", "sparse_s", "speedup", "psnr", "ssim", "density"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), (key, metrics[key])
    assert "speedup" in summary and "PSNR" in summary
    assert [row[0] for row in table["data"]] == [f"blocks.{i}.attn1" for i in range(4)]
    assert image.endswith(".png")
    # what the server wrote, including Gradio's copies, lives in the runner's folder
    runner = server.diffattn_runner
    assert any((runner.root / "gradio").rglob("*.mp4"))
    assert len(runner._runs) >= 1


def test_server_reports_bad_input(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="height=30.*multiple of 4"):
        client.predict(prompt=PROMPT, method="adaspa", seed=0, frames=5, height=30, width=32, steps=2,
                       api_name="/generate")
    with pytest.raises(AppError, match="sparsity"):
        client.predict(prompt=PROMPT, method="adaspa", **SMALL, adaspa_sparsity=2.0, api_name="/generate")


def test_server_cancel_restores_the_pipeline(server, client, pipe):
    runner = server.diffattn_runner
    before = _processors(pipe)
    runs_before = {p for p in runner.root.iterdir() if p.name.startswith("run-")}
    job = client.submit(prompt=PROMPT, method="adaspa", **{**SMALL, "steps": 50}, **_adaspa_kwargs(),
                        api_name="/generate")
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("run-") and p not in runs_before for p in runner.root.iterdir()):
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.05)
    job.cancel()
    deadline = time.monotonic() + 60
    while True:
        runs = {p for p in runner.root.iterdir() if p.name.startswith("run-")}
        free = runner._lock.acquire(blocking=False)
        if free:
            runner._lock.release()
        if runs == runs_before and free:
            break
        assert time.monotonic() < deadline, "the cancelled run did not stop"
        time.sleep(0.1)
    assert _same_processors(pipe, before)


# ------------------------------------------------------------------------------------ address and port
def _demo_args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    D.add_arguments(parser)
    return parser.parse_args(list(argv))


def _record_launch(monkeypatch):
    seen = {}

    def fake_launch(model, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(D, "launch", fake_launch)
    return seen


def test_gradio_environment_chooses_the_address_when_options_do_not(monkeypatch, capsys):
    seen = _record_launch(monkeypatch)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.2")
    assert D.run_from_args(_demo_args()) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.2", 7999)
    assert D.run_from_args(_demo_args("--port", "8001", "--host", "127.0.0.1")) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8001)
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert D.run_from_args(_demo_args()) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 7860)
    assert capsys.readouterr().err == ""  # loopback: no warning


def test_binding_beyond_loopback_warns(monkeypatch, capsys):
    seen = _record_launch(monkeypatch)
    assert D.run_from_args(_demo_args("--host", "0.0.0.0", "--port", "0")) == 0
    assert seen["host"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert err.startswith("warning: serving on 0.0.0.0") and "--host 127.0.0.1" in err


def test_a_busy_port_is_one_line_naming_port_before_the_model_loads(monkeypatch, capsys):
    import socket

    from diffattn import cli
    from diffattn.pipelines import tiny

    monkeypatch.setattr(tiny, "load_pipeline", lambda *a, **k: pytest.fail("model loaded for a busy port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--port", str(port)])
    message = str(exc.value.code)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "--port" in message
    assert "GRADIO_SERVER_PORT" not in message


def test_demo_script_serves_the_same_app():
    """``python demo/app.py`` takes the command's options and goes through the same launch (a busy port
    is refused by the same one-line check, before any model loads)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(root / "demo" / "app.py"), "--port", str(port)], cwd=root,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 1 and f"127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr, proc.stderr
