"""``diffattn generate``: metrics, mp4 I/O, prompt files, argument errors, end-to-end runs, sharding."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattn.cli import main
from diffattn.pipelines import generate as gen
from diffattn.pipelines.generate import parse_config, read_prompts, slugify
from diffattn.pipelines.metrics import psnr, ssim, video_metrics
from diffattn.pipelines.video_io import read_video, write_video

from .video_reference import ssim_loop

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--frames", "2", "--height", "32", "--width", "32", "--steps", "1", "--no-progress"]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "report.jsonl").read_text().splitlines()]


def _visible(out):
    return sorted(p.name for p in Path(out).iterdir())


# ------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("shape", [(1, 11, 11, 3), (2, 14, 17, 3), (3, 13, 12, 1)], ids=lambda s: "x".join(map(str, s)))
def test_ssim_matches_window_loop(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
    assert ssim(x, y) == pytest.approx(ssim_loop(x, y), abs=1e-10)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_psnr_and_metric_errors():
    rng = np.random.default_rng(1)
    x = rng.random((2, 16, 16, 3)).astype(np.float32)
    y = x + 0.05
    assert psnr(x, y) == pytest.approx(10 * math.log10(1 / 0.05**2), rel=1e-4)
    assert psnr(x, x) == math.inf
    assert psnr((x * 255).astype(np.uint8), (x * 255).astype(np.uint8)) == math.inf
    m = video_metrics(x, y)
    assert set(m) == {"psnr", "ssim", "lpips"} and 0 < m["ssim"] < 1
    with pytest.raises(ValueError, match="differs from reference"):
        psnr(x, x[:1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :8, :8], x[:, :8, :8])


# ---------------------------------------------------------------------------------------- video I/O
@pytest.mark.parametrize("size", [(5, 64, 48), (3, 21, 35)], ids=["even", "odd"])
def test_mp4_round_trip(tmp_path, size):
    f, h, w = size
    t = np.linspace(0, 1, f)[:, None, None, None]
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    video = np.clip(np.stack([0.2 + 0.6 * xx + 0 * t[..., 0], 0.3 + 0.5 * yy + 0 * t[..., 0], 0.5 + 0.3 * t[..., 0] + 0 * xx], -1), 0, 1)
    path = write_video(tmp_path / "v.mp4", video)
    back = read_video(path)
    assert back.shape == (f, h, w, 3) and back.dtype == np.uint8
    assert np.abs(back / 255.0 - video).mean() < 0.02
    assert _visible(tmp_path) == ["v.mp4"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    real = imageio.get_writer

    class Boom:
        def __init__(self, *a, **k):
            self.w = real(*a, **k)

        def append_data(self, frame):
            raise KeyboardInterrupt

        def close(self):
            self.w.close()

    monkeypatch.setattr(imageio, "get_writer", Boom)
    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3)))
    assert _visible(tmp_path) == []


# ------------------------------------------------------------------------------------ prompt files
def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\na red circle\n  a blue square  \n")
    items = read_prompts(txt)
    assert [(i.index, i.prompt, i.line) for i in items] == [(0, "a red circle", 3), (1, "a blue square", 4)]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        "\n".join([
            json.dumps({"prompt": "ok", "seed": 5, "height": 32, "num_frames": 3, "guidance": 2}),
            "{not json",
            json.dumps({"seed": 1}),
            json.dumps({"prompt": "x", "colour": "red"}),
            json.dumps({"prompt": "y", "height": "tall"}),
            json.dumps(["prompt"]),
        ])
    )
    items = read_prompts(jl)
    assert len(items) == 6 and [i.index for i in items] == list(range(6))
    assert items[0].error is None and (items[0].seed, items[0].height, items[0].frames, items[0].guidance) == (5, 32, 3, 2.0)
    for item, words in zip(items[1:], ["line 2", "missing 'prompt'", "unknown key(s) ['colour']", "height must be an integer", "JSON object"]):
        assert item.error is not None and words in item.error, item.error
    for bad, msg in (("nope.txt", "no such file"), (str(jl.with_suffix(".csv")), "no such file")):
        with pytest.raises(FileNotFoundError, match=msg):
            read_prompts(tmp_path / bad)
    csv = tmp_path / "p.csv"
    csv.write_text("a\n")
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        read_prompts(csv)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_parse_config_and_slug(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "radial", "decay_factor": 0.5, "dense_steps": 3}))
    assert parse_config([str(f), "decay_factor=0.25", "backend=torch", "attention_sink=false"]) == {
        "method": "radial", "decay_factor": 0.25, "dense_steps": 3, "backend": "torch", "attention_sink": False,
    }
    with pytest.raises(ValueError, match="JSON file that exists or key=value"):
        parse_config(["missing.json"])
    with pytest.raises(ValueError, match="not a field name"):
        parse_config(["bad key=1"])
    assert slugify("A red circle, moving LEFT!") == "a-red-circle-moving-left"
    assert slugify("!!!") == "item"


# -------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--method", "nope"], "--method 'nope' is unknown"),
        (["--method", "radial", "--config", "nonsense=1"], "has no field(s) ['nonsense']"),
        (["--method", "radial", "--config", "decay_factor=abc"], "decay_factor"),
        (["--frames", "0"], "argument --frames: '0' must be a positive integer"),
        (["--guidance", "-1"], "argument --guidance: '-1' must be a finite number >= 0"),
        (["--dtype", "float8"], "--dtype: invalid choice"),
        (["--device", "toaster"], "--device 'toaster'"),
        (["--compare", "radial"], "--compare: invalid choice"),
        (["--prompts", "missing.txt"], "no such file"),
        (["--model", "/no/such/folder", "--prompt", "x"], "--model '/no/such/folder' is neither a folder nor a hub id"),
        (["--save-dense"], "--save-dense needs --compare dense"),
    ],
    ids=["method", "config-field", "config-type", "frames", "guidance", "dtype", "device", "compare", "prompts",
         "model", "save-dense"],
)
def test_bad_arguments_fail_clearly(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", *argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "diffattn generate: error:" in err and words in err, err


# ----------------------------------------------------------------------------------- end to end
def test_two_prompts_compare_dense_then_resume(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a blue background\na white triangle moving down on a green background\n")
    out = tmp_path / "out"
    argv = ["generate", "--prompts", str(prompts), "--method", "radial", "--compare", "dense", "--frames", "5",
            "--height", "64", "--width", "56", "--steps", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    names = ["0000-a-red-circle-moving-right-on-a-blue-background.mp4",
             "0001-a-white-triangle-moving-down-on-a-green-background.mp4"]
    assert _visible(out) == sorted(names + ["report.jsonl", "run.json", "summary.json"])
    for name in names:
        assert read_video(out / name).shape == (5, 64, 56, 3)
    rows = _rows(out)
    assert [r["index"] for r in rows] == [0, 1] and [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["status"] == "ok" and r["method"] == "radial" and r["model"] == "tiny"
        assert r["config"] == {} and r["steps"] == 3 and r["guidance"] == 4.0
        assert (r["frames"], r["height"], r["width"]) == (5, 64, 56)
        assert math.isfinite(r["psnr"]) and r["psnr"] > 10 and 0 < r["ssim"] <= 1
        assert 0 < r["density"] <= 1 and r["attention_calls"] > 0
        for key in ("total", "transformer", "attention"):
            assert math.isfinite(r["seconds"][key]) and r["seconds"][key] > 0
        assert r["seconds"]["transformer"] <= r["seconds"]["total"]
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert {"torch", "diffusers", "diffattn", "python"} <= set(r["versions"]) and r["device"].startswith("cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]))

    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    assert main(argv + ["--resume"]) == 0
    assert len(_rows(out)) == 2
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == stamps


def test_bad_items_are_reported_and_the_batch_goes_on(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": "a red circle moving left on a blue background"}),
        "{oops",
        json.dumps({"prompt": "a green square moving up on a white background", "height": 30}),
        json.dumps({"prompt": "a black circle moving up on a yellow background", "seed": 7}),
    ]))
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *SMALL, "--out", str(out)]) == 1
    rows = _rows(out)
    assert [(r["index"], r["status"]) for r in rows] == [(0, "ok"), (1, "error"), (2, "error"), (3, "ok")]
    assert "line 2" in rows[1]["error"]
    assert "height=30" in rows[2]["error"] and "multiple of 4" in rows[2]["error"]
    assert rows[3]["seed"] == 7
    assert [n for n in _visible(out) if n.endswith(".mp4")] == [
        "0000-a-red-circle-moving-left-on-a-blue-background.mp4",
        "0003-a-black-circle-moving-up-on-a-yellow-background.mp4",
    ]
    # a resumed run retries the failures only (they fail again) and keeps the successes
    assert main(["generate", "--prompts", str(prompts), *SMALL, "--out", str(out), "--resume"]) == 1
    assert [r["index"] for r in _rows(out)] == [0, 1, 2, 3, 1, 2]


def test_ctrl_c_leaves_no_partial_files(tmp_path, monkeypatch):
    real = gen._Runner._call
    calls = []

    def interrupt_second(self, item, seed):
        calls.append(item.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, item, seed)

    monkeypatch.setattr(gen._Runner, "_call", interrupt_second)
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red circle", "--prompt", "a blue square", *SMALL, "--out", str(out)]) == 130
    assert _visible(out) == ["0000-a-red-circle.mp4", "report.jsonl", "run.json"]
    assert [r["index"] for r in _rows(out)] == [0]


def _wan_folder(path):
    """A tiny random WanPipeline (T5 text encoder, Wan VAE) with a word-level tokenizer built offline."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "cat", "on", "blue", "background"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.save_pretrained(path)


def test_diffusers_folder_loads_offline(tmp_path, monkeypatch):
    folder = tmp_path / "wan-tiny"
    _wan_folder(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(folder), "--prompt", "a red cat on a blue background", "--frames", "5",
            "--height", "32", "--width", "32", "--steps", "2", "--guidance", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    row = _rows(out)[0]
    assert row["status"] == "ok" and row["model"] == str(folder)
    assert read_video(out / row["file"]).shape == (5, 32, 32, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_shards_cover_every_prompt_once(tmp_path):
    """The environment ``accelerate launch``/``torchrun`` give each of 2 CPU processes."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(5)))
    out = tmp_path / "out"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "diffattn", "generate", "--prompts", str(prompts), *SMALL, "--device", "cpu",
               "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rows = _rows(out)
    assert sorted(r["index"] for r in rows) == list(range(5))
    assert {r["index"]: r["process"] for r in rows} == {i: i % 2 for i in range(5)}
    assert not list(out.glob("report.shard-*"))
    assert len(list(out.glob("*.mp4"))) == 5
    assert "5/5 ok" in logs[0]


# ------------------------------------------------------------------------------------ output folder
def _no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the folder should have been refused")

    monkeypatch.setattr(gen._Runner, "__init__", refuse)


def test_a_folder_holding_another_run_is_refused_then_overwritten(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = ["generate", "--prompt", "a red circle", *SMALL, "--out", str(out)]
    assert main(first) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert json.loads((out / "run.json").read_text())["method"] == "dense"
    capsys.readouterr()

    with monkeypatch.context() as m:
        _no_model(m)
        second = ["generate", "--prompt", "a blue square", "--method", "radial", *SMALL, "--out", str(out)]
        assert main(second) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(out) in err and "already holds a run" in err
        assert "--resume" in err and "--method dense" in err and "--overwrite" in err and "new --out" in err
        # --resume with another method (or config, or size) is refused the same way
        assert main(second + ["--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "method 'dense' -> 'radial'" in err and "--overwrite" in err
        assert main(first + ["--resume", "--config", "backend=torch"]) == 2
        assert "config" in capsys.readouterr().err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    assert main(second + ["--overwrite"]) == 0
    assert _visible(out) == ["0000-a-blue-square.mp4", "report.jsonl", "run.json", "summary.json"]
    assert [(r["method"], r["prompt"]) for r in _rows(out)] == [("radial", "a blue square")]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["prompt"] for r in summary["rows"]] == ["a blue square"]


def test_an_unwritable_folder_fails_at_once_with_path_and_reason(tmp_path, monkeypatch, capsys):
    import time

    _no_model(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "out", blocker):
        start = time.perf_counter()
        assert main(["generate", *SMALL, "--out", str(out)]) == 2
        assert time.perf_counter() - start < 1.0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(out) in err and "not writable" in err
        assert ("Not a directory" in err) or ("File exists" in err)


def test_summary_counts_every_timed_run_and_says_what_speedup_means():
    long_prompt = "a red circle moving right on a blue background while a second, larger square drifts upwards"
    rows = [
        {"index": 0, "status": "ok", "prompt": long_prompt, "device": "cpu (x86_64, 2 threads)", "density": 0.5,
         "seconds": {"total": 10.0}, "dense_seconds": {"total": 5.0}, "speedup": 0.5, "psnr": 30.0, "ssim": 0.9},
        {"index": 1, "status": "ok", "prompt": "b", "device": "cpu (x86_64, 2 threads)", "density": 0.5,
         "seconds": {"total": 2.0}, "dense_seconds": {"total": 3.0}, "speedup": 1.5, "psnr": 20.0, "ssim": 0.8},
        {"index": 2, "status": "error", "prompt": "c", "error": "ValueError: height=30 must be a multiple of 4; "
         "give a height that the model's patch and VAE divide, such as 32"},
    ]
    summary = gen.summarize(rows)
    assert summary["seconds"] == pytest.approx(20.0)  # 12 s with the method + 8 s of dense comparison
    assert summary["speedup"] == pytest.approx(8 / 12) and summary["speedup_mean"] == pytest.approx(1.0)
    text = gen.format_table(summary)
    assert "20.0 s (12.0 method + 8.0 dense)" in text
    assert "0.67x overall" in text and "mean 1.00x (0.50x to 1.50x)" in text
    assert "dense seconds / method seconds" in text
    assert "noisy" in text and "shared CPU" in text
    assert long_prompt in text and rows[2]["error"] in text
    assert "-x" not in text
