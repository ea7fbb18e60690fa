"""Every command README.md shows is run: here, by the test named for it, or by CI's README stage.

``COMMANDS`` says where each one runs; a command added to the README without an entry fails
``test_every_readme_command_is_run_somewhere``. Commands marked ``HERE`` run below as written (from a
temporary folder), those marked ``SMALLER`` run with fewer prompts, frames and steps appended.
"""

import ast
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from diffattn import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
HERE, SMALLER, CI = "here", "here, smaller", "ci"
_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "scripts" / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_commands)

COMMANDS = {
    # the set-up block, literally, in a bare virtual environment (.ci/run stage 1), then the test install
    'pip install torch==2.13.0 && pip install -e ".[video]"': CI,
    "diffattn generate --out outputs/": CI,
    'pip install -e ".[test]" && python -m pytest': CI,
    'pip install -e ".[demo]"': CI,
    'pip install -e ".[plot]"': CI,
    "diffattn generate --method adaspa --compare dense --out outputs/": SMALLER,
    "diffattn generate --model /path/to/Wan2.1-T2V-1.3B-Diffusers --method radial --config decay_factor=0.2 "
    "--prompts prompts.txt --frames 81 --height 480 --width 832 --steps 50 --compare dense --out outputs/":
        "tests/test_generate.py::test_diffusers_folder_loads_offline",  # a saved Wan folder, offline
    "accelerate launch --num_processes 8 -m diffattn generate ...":
        "tests/test_generate.py::test_two_process_shards_cover_every_prompt_once",
    "diffattn demo": "tests/test_demo_browser.py::test_page_generates_and_shows_videos_and_mask",
    "python demo/app.py": "tests/test_demo.py::test_demo_script_serves_the_same_app",
    "diffattn demo --model /path/to/Wan2.1-T2V-1.3B-Diffusers --port 8000":
        "tests/test_demo.py::test_gradio_environment_chooses_the_address_when_options_do_not",
    "python scripts/demo_screenshot.py": "tests/test_demo_browser.py::test_page_generates_and_shows_videos_and_mask",
    "diffattn methods": HERE,
    "diffattn draw radial --help": HERE,
    "diffattn draw radial --frames 21 --tokens-per-frame 1560 --out radial.png": HERE,
    "diffattn draw radial|gna|adaspa|paro|tome --out pattern.png": HERE,
    "diffattn draw gna --out gna.png": HERE,
    "diffattn draw adaspa --out adaspa.png": HERE,
    "diffattn draw paro --out paro.png": HERE,
    "diffattn draw tome --out tome.png": HERE,
    "diffattn bench quality": "tests/test_bench.py::test_report_renders_tables_and_plots",
    "diffattn bench tiny": "tests/test_bench.py::test_tiny_bench_rows",
    "diffattn bench kernel": "tests/test_bench.py::test_kernel_bench_rows",
    "diffattn bench e2e": "tests/test_bench.py::test_e2e_bench_rows",
    "diffattn bench unet": "tests/test_bench.py::test_bench_all_plans_what_this_machine_can_run",
    "diffattn bench report": "tests/test_bench.py::test_readme_results_match_committed_json",
    "diffattn bench cpu": "tests/test_bench.py::test_cpu_bench_rows_and_report",
    "diffattn bench cpu --lengths 8192 --densities --heads 2": "tests/test_bench.py::test_cpu_bench_rows_and_report",
    "diffattn bench cpu --lengths 8192 --densities 1 0.2 --layouts --heads 4 --head-dim 128 --batch 2 --reps 2":
        "tests/test_bench.py::test_cpu_bench_rows_and_report",
    "diffattn bench cpu --lengths 8192 32760 --layouts": "tests/test_bench.py::test_cpu_bench_rows_and_report",
    "diffattn bench gpu --out DIR": "tests/test_bench_gpu.py::test_bench_gpu_smoke_runs_every_phase",
    "python -m diffattn.kernels.aot":
        "tests/test_compile_gate.py::test_every_kernel_config_compiles_for_sm90a_and_sm80_without_spills",
    'diffattn generate --method gna --compare dense --frames 32 --height 64 --width 128 --steps 10 '
    '--prompt "a red circle moving left on a blue background" --out out/': SMALLER,
    # names of commands in headings and prose, not invocations
    "diffattn generate": "name",
    "diffattn draw": "name",
}


def _inline_commands() -> set[str]:
    return {m.strip() for m in re.findall(r"`((?:diffattn|python|pip|accelerate) [^`]+)`", README)}


def _all_commands() -> set[str]:
    fenced = {c for _, cmds in readme_commands.bash_blocks(README) for c in cmds}
    # prose mentions like `pip install -e ".[demo]"` (the Gradio demo) keep their closing words out
    inline = {c for c in _inline_commands() if not c.startswith("python -m pytest")}
    # "or: python demo/app.py" inside a fenced comment
    inline |= {m for m in re.findall(r"or: (python demo/app\.py)", README)}
    return fenced | inline


def test_every_readme_command_is_run_somewhere():
    unlisted = sorted(c for c in _all_commands() if c not in COMMANDS)
    assert not unlisted, f"README commands that nothing runs (add them to COMMANDS): {unlisted}"
    for command, where in COMMANDS.items():
        if "::" in where:
            path, name = where.split("::")
            tree = ast.parse((ROOT / path).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{command!r} is said to run in {where}, which does not exist"


def test_ci_runs_the_readme_setup_block_literally():
    install, run = readme_commands.setup_commands(README)
    assert COMMANDS[install] == CI and COMMANDS[run] == CI
    ci = (ROOT / ".ci" / "run").read_text()
    stage1, _, stage2 = ci.partition("stage 2")
    assert "scripts/readme_commands.py setup" in stage1 and '"${SETUP[0]}"' in stage1 and '"${SETUP[1]}"' in stage1
    assert "python3 -m venv .venv-readme" in stage1 and "report.jsonl" in stage1
    assert "pytest" in stage2


def _run_here(command: str, cwd: Path, extra: list[str] = ()) -> str:
    argv = shlex.split(command)
    assert argv[0] == "diffattn", command
    out = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv[1:] + list(extra))
        except SystemExit as e:  # --help
            code = e.code
    assert code == 0, (command, out.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("command", sorted(c for c, w in COMMANDS.items() if w == HERE))
def test_readme_command_runs(command, tmp_path):
    for one in ([command.replace("radial|gna|adaspa|paro|tome", w) for w in ("radial", "gna", "adaspa", "paro", "tome")]
                if "|" in command else [command]):
        text = _run_here(one, tmp_path)
        if "--out" in one:
            image = tmp_path / shlex.split(one)[-1]
            assert image.read_bytes()[:4] == b"\x89PNG", one
        elif one == "diffattn methods":
            assert "radial" in text.split()


@pytest.mark.parametrize("command", sorted(c for c, w in COMMANDS.items() if w == SMALLER))
def test_readme_generate_command_runs_smaller(command, tmp_path):
    argv = shlex.split(command)
    prompt = [] if "--prompt" in argv else ["--prompt", "a red circle moving left on a blue background"]
    _run_here(command, tmp_path, [*prompt, "--frames", "2", "--height", "32", "--width", "32", "--steps", "2",
                                  "--no-progress"])
    out_dir = argv[argv.index("--out") + 1]
    rows = (tmp_path / out_dir / "report.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"status": "ok"' in rows[0] and '"speedup"' in rows[0]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_runs_on_the_tiny_model():
    """The opening example and the Python API block, on the tiny model loaded the README's way."""
    blocks = _python_blocks()
    load = next(b for b in blocks if "load_pipeline" in b)
    assert load.strip().count("\n") == 0, "loading the tiny model is one line"
    opening, api = blocks[0], next(b for b in blocks if "diffattn.methods()" in b)
    namespace = {"prompt": "a red circle moving left on a blue background"}
    exec(load, namespace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # 50 steps as written; 2 keep the test quick (the step count changes nothing else)
        exec(opening.replace("num_inference_steps=50", "num_inference_steps=2"), namespace)
    table = out.getvalue()
    assert table.splitlines()[0].split()[:3] == ["layer", "calls", "density"]
    assert "all layers" in table and "blocks.0.attn1" in table
    namespace["pipe"]("a red circle", num_inference_steps=1, num_frames=1, height=16, width=16)
    exec(api.replace("diffattn.stats(pipe).rows", "rows = diffattn.stats(pipe).rows"), namespace)
