"""The shell commands of README.md, so CI runs the README's set-up exactly as written.

``python3 scripts/readme_commands.py setup`` prints the two lines of the first fenced ``bash`` block
under "## Set up" (the install line, then the first run), comments removed; ``all`` prints every command
of every fenced ``bash`` block (continuation lines joined). Standard library only: CI calls it
before any virtual environment exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _strip_comment(line: str) -> str:
    # a comment starts at a '#' that follows whitespace (URLs and quoted '#' never do in the README)
    return re.split(r"\s#", line, maxsplit=1)[0].rstrip()


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """``(section heading, commands)`` for every fenced bash block."""
    blocks, heading, fence, current = [], "", None, []
    for line in text.splitlines():
        if fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip().startswith("```"):
            if fence == "bash":
                blocks.append((heading, current))
                current = []
            fence = None if fence is not None else line.strip()[3:]
            continue
        if fence == "bash":
            command = _strip_comment(line)
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1].rstrip() + " " + command.strip()
            elif command:
                current.append(command)
    return blocks


def setup_commands(text: str) -> list[str]:
    found = [cmds for heading, cmds in bash_blocks(text) if heading == "Set up"]
    if not found or len(found[0]) != 2:
        raise SystemExit("README.md: '## Set up' must open with a ```bash block of two lines (install, run)")
    return found[0]


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    if argv == ["setup"]:
        print("\n".join(setup_commands(text)))
    elif argv == ["all"]:
        print("\n".join(c for _, cmds in bash_blocks(text) for c in cmds))
    else:
        raise SystemExit("usage: readme_commands.py setup|all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
