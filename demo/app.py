"""Gradio demo: dense vs sparse attention side by side (same as ``diffattn demo``).

    python demo/app.py                      # the embedded tiny model on http://127.0.0.1:7860
    python demo/app.py --model /path/to/a/diffusers/folder --port 8000
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from diffattn.apps.demo import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
