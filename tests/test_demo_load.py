"""The demo under load: 20 concurrent API requests against a queue of 4.

Each request either completes or is refused at once with Gradio's queue-full message; two are
cancelled while they wait. Afterwards no file of any finished, refused or cancelled run is left (a
session's result lives ``result_ttl`` seconds) and the process's memory is back near its baseline.
All traffic stays on 127.0.0.1; the loop is bounded (20 requests, a deadline per phase).
"""

import gc
import threading
import time

import pytest

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'diffattn[demo]'")
psutil = pytest.importorskip("psutil")

from diffattn.apps import demo as D  # noqa: E402
from diffattn.pipelines.tiny import build_tiny_pipeline  # noqa: E402

TINY = dict(seed=0, frames=1, height=16, width=16, steps=1)
REQUESTS, QUEUE, TTL = 20, 4, 3
MEMORY_SLACK = 100 * 2**20  # bytes of RSS growth allowed after the load (allocator caches, imported code)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_twenty_concurrent_requests_against_a_queue_of_four(tmp_path):
    from gradio_client import Client

    app = D.launch(pipe=build_tiny_pipeline(0), port=0, block=False, max_queue=QUEUE, result_ttl=TTL)
    runner = app.diffattn_runner
    try:
        warm = Client(app.local_url, verbose=False, download_files=str(tmp_path / "warm"))
        warm.predict(prompt="a red circle", method="radial", **TINY, api_name="/generate")
        deadline = time.monotonic() + 60
        while _files(runner.root) and time.monotonic() < deadline:  # the warm-up result expires too
            time.sleep(0.5)
        baseline = _rss()

        outcomes = [None] * REQUESTS
        client = Client(app.local_url, verbose=False, download_files=str(tmp_path / "load"))
        start = threading.Barrier(REQUESTS, timeout=60)

        def one(i):
            start.wait()
            t0 = time.monotonic()
            job = client.submit(prompt=f"a red circle {i}", method="radial", **TINY, api_name="/generate")
            if i in (5, 6):  # two are cancelled while they wait or run
                time.sleep(0.2)
                job.cancel()
            try:
                job.result(timeout=300)
                outcomes[i] = ("ok", time.monotonic() - t0, "")
            except Exception as e:  # noqa: BLE001  (gradio_client raises several kinds)
                outcomes[i] = ("cancelled" if i in (5, 6) else "refused", time.monotonic() - t0, str(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=400)
        assert all(o is not None for o in outcomes), outcomes

        ok = [o for o in outcomes if o[0] == "ok"]
        refused = [o for o in outcomes if o[0] == "refused"]
        assert ok and refused, outcomes  # 20 at once against a queue of 4: some of each
        for _, seconds, message in refused:
            assert "queue is full" in message.lower(), message
            assert seconds < 10, f"a refusal took {seconds:.1f} s"
        assert len(ok) <= QUEUE + 1 + 2, outcomes  # the queue, the one running, slots freed by cancels

        deadline = time.monotonic() + TTL + 30
        while _files(runner.root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _files(runner.root) == [], "files of finished or cancelled runs were left behind"
        for c in (client, warm):
            c.close()
        del client, warm
        free = runner._lock.acquire(timeout=30)
        assert free, "a run is still going"
        runner._lock.release()
        grown = _rss() - baseline
        print(f"load: {len(ok)} ok, {len(refused)} refused; RSS {baseline / 2**20:.0f} MiB -> "
              f"{(baseline + grown) / 2**20:.0f} MiB")
        assert grown < MEMORY_SLACK, f"memory grew by {grown / 2**20:.0f} MiB"
    finally:
        app.close()
        runner.close()
    assert not runner.root.exists()
