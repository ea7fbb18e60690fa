"""Regenerate ``docs/demo.png``: the demo as it is today, after one generation with its defaults.

Starts the demo on the embedded tiny model (on 127.0.0.1, a free port), drives Debian's headless
Chromium through Playwright (``executable_path``; no browser download), presses Generate with the
page's default prompt, method and sizes, waits for both videos and the block mask, and saves a
full-page screenshot::

    python scripts/demo_screenshot.py                    # writes docs/demo.png
    python scripts/demo_screenshot.py --out /tmp/demo.png --steps 4

Needs the demo and test extras (``pip install -e ".[test]"``) and ``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo.png"), help="PNG to write (default docs/demo.png)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the page's)")
    ap.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium", help="Chromium binary")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the generation")
    args = ap.parse_args(argv)
    if not Path(args.browser).exists():
        raise SystemExit(f"no Chromium at {args.browser!r}: apt-get install chromium, or give --browser")

    from playwright.sync_api import expect, sync_playwright

    from diffattn.apps.demo import launch
    from diffattn.pipelines.tiny import load_pipeline

    app = launch(pipe=load_pipeline("tiny"), port=0, block=False)
    runner = app.diffattn_runner
    try:
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=args.browser, headless=True, args=FLAGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = browser.new_page()
                page.goto(app.local_url, wait_until="domcontentloaded")
                expect(page.locator("#generate")).to_be_visible(timeout=60_000)
                if args.steps is not None:
                    box = page.locator("#steps input[type=number]")
                    box.fill(str(args.steps))
                    box.press("Enter")
                page.locator("#generate").click()
                print("generating with the page's defaults ...", flush=True)
                for sel in ("#dense-video video", "#sparse-video video", "#mask-image img"):
                    expect(page.locator(sel)).to_be_visible(timeout=args.timeout * 1000)
                expect(page.locator("#summary")).to_contain_text("speedup", timeout=30_000)
                for sel in ("#dense-video video", "#sparse-video video"):  # a decoded frame, not a blank box
                    page.locator(sel).evaluate(
                        "v => new Promise(ok => { if (v.readyState >= 2) ok();"
                        " v.addEventListener('loadeddata', ok); setTimeout(ok, 20000); })"
                    )
                page.wait_for_timeout(1000)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
        runner.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
