"""The demo in a real browser: headless Chromium loads the page, runs a generation with the tiny model,
and shows both videos (decodable by the browser) and the block-mask heatmap.

Needs Debian's ``chromium`` package (``.ci/run`` installs it) and Playwright's Python package, which
drives that browser through ``executable_path`` (no browser download).
"""

import shutil

import pytest

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'diffattn[demo]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run does this)"
)

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_page_generates_and_shows_videos_and_mask(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from diffattn.apps.demo import launch
    from diffattn.pipelines.tiny import load_pipeline

    app = launch(pipe=load_pipeline("tiny"), port=0, block=False)
    runner = app.diffattn_runner
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh --user-data-dir
                executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 1100},
            )
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(app.local_url, wait_until="domcontentloaded")
                expect(page.locator("#generate")).to_be_visible(timeout=60_000)
                # small enough to be quick on a CPU: 5 frames of 32x32 px, 4 steps
                for elem_id, value in (("frames", 5), ("height", 32), ("width", 32), ("steps", 4)):
                    _set_number(page, elem_id, value)
                # every progress text the page shows while the run goes on ("dense: step 2/4", ...)
                page.evaluate(
                    "() => { window.progressSeen = new Set();"
                    " const look = () => (document.body.innerText.match(/\\w+: step \\d+\\/\\d+/g) || [])"
                    "   .forEach(t => window.progressSeen.add(t));"
                    " new MutationObserver(look).observe(document.body,"
                    "   {subtree: true, childList: true, characterData: true}); }"
                )
                page.locator("#generate").click()

                dense = page.locator("#dense-video video")
                sparse = page.locator("#sparse-video video")
                mask = page.locator("#mask-image img")
                for loc in (dense, sparse, mask):
                    expect(loc).to_be_visible(timeout=240_000)
                seen = page.evaluate("() => [...window.progressSeen]")
                assert len(seen) >= 2, f"the progress never moved: {seen}"  # per-step progress reached the page
                # both videos decode in the browser: frames of the requested size are available
                for loc in (dense, sparse):
                    loc.evaluate(
                        "v => new Promise((ok, bad) => { if (v.readyState >= 2) ok(); "
                        "v.addEventListener('loadeddata', ok); v.addEventListener('error', bad); })"
                    )
                    assert loc.evaluate("v => [v.videoWidth, v.videoHeight]") == [32, 32]
                    assert loc.evaluate("v => v.error") is None
                assert mask.evaluate("img => img.complete && img.naturalWidth") > 100
                expect(page.locator("#summary")).to_contain_text("speedup")
                expect(page.locator("#summary")).to_contain_text("PSNR")
                page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
                assert (tmp_path / "demo.png").stat().st_size > 10_000
                assert not errors, errors
            finally:
                browser.close()
    finally:
        app.close()
        runner.close()
    assert not runner.root.exists()
