"""A base install (``pip install -e ".[video]"``) imports and starts without the optional extras.

Each check runs in a fresh interpreter, so modules imported by other tests cannot hide an eager import.
Packages of an extra are made unimportable by a ``None`` entry in ``sys.modules`` (what Python does
for a package that is not installed: ``ModuleNotFoundError``).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers")
SUBCOMMANDS = ("methods", "generate", "demo", "bench", "draw")


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_imports_and_help_load_neither_diffusers_nor_transformers():
    # one interpreter for every step (each imports torch, seconds on a busy CPU); the report names
    # the first step after which a heavy module was loaded
    steps = ["import diffattn", "import diffattn.pipelines", "import diffattn.pipelines.generate",
             "import diffattn.cli"]
    steps += [f"help({argv!r})" for argv in [["--help"]] + [[c, "--help"] for c in SUBCOMMANDS]]
    proc = _python(f"""
        import contextlib, io, sys

        def help(argv):
            from diffattn.cli import main
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)

        for step in {steps!r}:
            exec(step)
            heavy = [m for m in {HEAVY!r} if m in sys.modules]
            if heavy:
                sys.exit(f"after {{step}}: {{heavy}} imported")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return _python("import sys\n" + block + textwrap.dedent(code))


def test_missing_edit_extra_is_one_line_naming_it():
    proc = _without(("transformers",), """
        import diffattn.pipelines
        try:
            diffattn.pipelines.FateZeroPipeline
        except ImportError as e:
            print(e)
    """)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and 'pip install "diffattn[edit]"' in line and "FateZeroPipeline" in line


def test_missing_plot_extra_is_one_line_from_draw():
    proc = _without(("matplotlib",), """
        import sys
        from diffattn.cli import main
        sys.exit(main(["draw", "tome", "--out", "x.png"]))
    """)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert 'pip install "diffattn[plot]"' in proc.stderr


def test_missing_demo_extra_is_one_line():
    proc = _without(("gradio",), """
        import sys
        from diffattn.cli import main
        sys.exit(main(["demo", "--port", "0"]))
    """)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert 'pip install "diffattn[demo]"' in proc.stderr


def test_missing_video_extra_is_one_line(tmp_path):
    proc = _without(("imageio", "imageio_ffmpeg"), f"""
        import numpy as np
        from diffattn.pipelines.video_io import write_video
        try:
            write_video({str(tmp_path / 'v.mp4')!r}, np.zeros((1, 8, 8, 3), np.float32))
        except ImportError as e:
            print(e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "diffattn[video]"' in proc.stdout and proc.stdout.strip().count("\n") == 0


def test_the_tiny_model_loads_in_one_line_without_transformers():
    proc = _without(("transformers",), """
        from diffattn.pipelines import load_pipeline; pipe = load_pipeline("tiny")
        print(type(pipe).__name__)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("TinyVideoPipeline")


def test_extras_cover_the_features():
    import tomllib

    from diffattn._extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    test = {r.split(">")[0].split("<")[0].split("=")[0] for r in extras["test"]}
    for name in EXTRAS:  # the test extra installs everything any feature needs
        assert {r.split(">")[0].split("<")[0].split("=")[0] for r in extras[name]} <= test, name
