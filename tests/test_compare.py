"""The comparison service (dense vs a method on one pipeline) and the timing it reports.

Generations use the tiny Wan pipeline with random weights at 2 frames of 16x16 px and 1 step, well
under a second each on a CPU.
"""

import math

import numpy as np
import pytest
import torch

import diffattn
from diffattn.pipelines.compare import Comparer, environment, quality
from diffattn.pipelines.tiny import build_tiny_pipeline
from diffattn.processors.state import Span, Stats

from .video_reference import psnr_reference

PROMPT = "a red circle moving left on a blue background"
RADIAL = {"decay_factor": 0.5, "backend": "torch"}
CALL = dict(num_frames=2, height=16, width=16, num_inference_steps=1)


class _FakeEvent:
    """Stands in for ``torch.cuda.Event``: 'device time' is the order of the records, in ms."""

    clock = 0
    waited: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self, stream=None):
        assert stream == "stream of cuda"
        _FakeEvent.clock += 1
        self.at = _FakeEvent.clock

    def synchronize(self):
        _FakeEvent.waited.append(self)

    def elapsed_time(self, end):
        assert end in _FakeEvent.waited, "read before the end event was waited for"
        return float(end.at - self.at)


@pytest.fixture
def fake_cuda(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    _FakeEvent.waited = []
    return syncs


def test_a_gpu_span_is_timed_by_events_and_never_waits_while_it_runs(fake_cuda):
    stats = Stats()
    with Span("cuda") as span:
        _FakeEvent.clock += 4  # four more records (other work) inside the span
    stats.add({"layer": "a", "time_ms": span})
    assert fake_cuda == [] and _FakeEvent.waited == [], "recording the call must not wait on the device"
    assert stats.rows[0]["time_ms"] == 5.0 and isinstance(stats.rows[0]["time_ms"], float)
    assert stats.summary()["attention_ms"] == 5.0
    # sync=True: the host clock between two synchronisations (exact, a stall per span)
    with Span("cuda", sync=True) as span:
        pass
    assert len(fake_cuda) == 2 and span.ms >= 0.0


def test_a_cpu_span_is_host_time():
    with Span("cpu") as span:
        sum(range(10000))
    assert 0.0 < span.ms < 1000.0


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dense_then_method_from_the_same_seed(pipe):
    before = dict(pipe.transformer.attn_processors)
    comparer = Comparer(pipe)
    dense = comparer.sample(PROMPT, 3, **CALL)
    direct = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **CALL).frames[0]
    np.testing.assert_array_equal(dense.frames, direct)
    assert dense.seconds["attention"] is None and dense.summary == {} and dense.rows == []
    assert 0 < dense.seconds["transformer"] <= dense.seconds["total"]

    config = comparer.use("radial", RADIAL, min_tokens=0)
    assert config == diffattn.RadialConfig(**RADIAL)
    installed = dict(pipe.transformer.attn_processors)
    assert comparer.use("radial", RADIAL, min_tokens=0) is config
    assert all(installed[k] is v for k, v in pipe.transformer.attn_processors.items()), "same method: kept"
    sparse = comparer.sample(PROMPT, 3, **CALL)
    calls = 1 * 2 * 4  # steps x (cond, uncond) x layers
    assert sparse.summary["calls"] == calls and len(sparse.rows) == calls
    assert 0 < sparse.seconds["attention"] <= sparse.seconds["transformer"] <= sparse.seconds["total"]
    assert sparse.seconds["attention"] == pytest.approx(sum(r["time_ms"] for r in sparse.rows) / 1e3)
    assert len(diffattn.stats(pipe)) == 0, "a sample takes its rows with it"

    comparer.restore()
    after = dict(pipe.transformer.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    q = quality(sparse.frames, dense.frames, lpips=False)
    assert q["ssim"] is not None and 0 < q["ssim"] < 1 and math.isfinite(q["psnr"]) and not q["identical"]
    assert q["psnr"] == pytest.approx(psnr_reference(sparse.frames, dense.frames), rel=1e-9)


def test_quality_of_identical_and_tiny_frames():
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    q = quality(x, x.copy(), lpips=False)
    assert q == {"psnr": math.inf, "ssim": None, "lpips": None, "identical": True}


def test_environment_names_the_device_and_versions():
    env = environment("cpu")
    assert env["device"].startswith("cpu (") and {"python", "torch"} <= set(env["versions"])
