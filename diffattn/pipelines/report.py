"""What ``diffattn generate`` leaves in ``--out``: the report, its shards, the run's identity, the summary.

``report.jsonl`` holds one JSON line per item (appended whole, so an interrupt never leaves half a
line); under several processes each appends to its own ``report.shard-<i>-of-<n>.jsonl`` and
:func:`merge_reports` folds them in. ``run.json`` names the options that change a video, so
``--resume`` continues only the same run; ``summary.json`` holds the totals of :func:`summarize`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = ["REPORT", "SUMMARY", "RUN", "OutputFolderError", "shard_name", "append_jsonl", "read_jsonl", "merge_reports",
           "item_key", "completed", "check_out", "clear_run", "write_run", "summarize", "format_table"]

REPORT = "report.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"  # what the videos in the folder were generated with (see _run_identity)
_VIDEO = re.compile(r"^\d{4}-.+\.mp4$")
# what --resume must keep equal: every option that changes a video (prompts are per row in the report)
_IDENTITY = ("model", "method", "config", "frames", "height", "width", "steps", "guidance",
             "negative_prompt", "seed", "dtype")


def shard_name(index: int, count: int) -> str:
    return f"report.shard-{index:03d}-of-{count:03d}.jsonl"


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # one write() of one whole line on an O_APPEND descriptor: an interrupt never leaves half a line
    data = (json.dumps(row, default=str, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed process: that item simply runs again
            if isinstance(row, dict):
                rows.append(row)
    return rows


def merge_reports(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Fold every ``report.shard-*.jsonl`` of ``out`` into ``report.jsonl`` (atomically), return all rows.

    Rows are ordered by item index; shards are deleted once merged.
    """
    out = Path(out)
    report = out / REPORT
    shards = sorted(out.glob("report.shard-*.jsonl"))
    rows = read_jsonl(report)
    if not shards:
        return rows
    for shard in shards:
        rows.extend(read_jsonl(shard))
    rows.sort(key=lambda r: (r.get("index", -1), r.get("time", "")))
    tmp = out / f".{REPORT}.{os.getpid()}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str, allow_nan=False) + "\n")
        os.replace(tmp, report)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for shard in shards:
        shard.unlink(missing_ok=True)
    return rows


def item_key(index: int, prompt: str | None, method: str, config: dict[str, Any]) -> str:
    return json.dumps([index, prompt, method, config], sort_keys=True, default=str)


def completed(out: Path, rows: Iterable[dict[str, Any]]) -> set[str]:
    done = set()
    for r in rows:
        if r.get("status") == "ok" and r.get("file") and (out / r["file"]).is_file():
            done.add(item_key(r.get("index"), r.get("prompt"), r.get("method"), r.get("config") or {}))
    return done



# ------------------------------------------------------------------------------------ output folder
class OutputFolderError(ValueError):
    """``--out`` cannot be used as asked; the message says why and what to do (one line)."""


def _run_identity(opts: Any) -> dict[str, Any]:
    return {name: getattr(opts, name) for name in _IDENTITY}


def _previous_run(out: Path) -> tuple[dict[str, Any] | None, bool]:
    """``(identity of the run in out or None, whether out holds any run's files)``."""
    try:
        identity = json.loads((out / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if isinstance(identity, dict):
        return identity, True
    rows = read_jsonl(out / REPORT)
    for shard in sorted(out.glob("report.shard-*.jsonl")):
        rows += read_jsonl(shard)
    if rows:  # a report without run.json: what its rows name
        first = rows[0]
        return {k: first.get(k) if k != "config" else (first.get("config") or {}) for k in ("model", "method", "config")}, True
    held = (out / SUMMARY).exists() or any(_VIDEO.match(p.name) for p in out.iterdir())
    return None, held


def _describe(identity: dict[str, Any]) -> str:
    config = identity.get("config") or {}
    text = f"--method {identity.get('method')}"
    if config:
        text += " --config " + " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    return text


def check_out(out: Path, opts: Any) -> None:
    """Refuse, before any model is loaded, an ``--out`` that cannot be written or holds another run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}.partial"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputFolderError(f"--out {str(out)!r} is not writable: {reason}; give a folder you can write to") from None
    previous, held = _previous_run(out)
    if not held or opts.overwrite:
        return
    fix = (f"use a new --out folder, --overwrite to replace that run, or --resume with the same options "
           f"({_describe(previous)}) to continue it" if previous else
           "use a new --out folder or --overwrite to replace it")
    if not opts.resume:
        raise OutputFolderError(f"--out {str(out)!r} already holds a run: {fix}")
    mine = _run_identity(opts)
    if previous is None:
        raise OutputFolderError(f"--out {str(out)!r} holds videos but no report to resume from: {fix}")
    differ = [k for k in previous if k in mine and json.dumps(previous[k], sort_keys=True, default=str)
              != json.dumps(mine[k], sort_keys=True, default=str)]
    if differ:
        changes = ", ".join(f"{k} {previous[k]!r} -> {mine[k]!r}" for k in differ)
        raise OutputFolderError(
            f"--resume: --out {str(out)!r} holds a run with other options ({changes}); --resume continues "
            f"a run only with the same method, config and sizes: {fix}"
        )


def clear_run(out: Path) -> None:
    """``--overwrite``: remove the files of the run in ``out`` (and nothing else in the folder)."""
    rows = read_jsonl(out / REPORT)
    shards = sorted(out.glob("report.shard-*.jsonl"))
    for shard in shards:
        rows += read_jsonl(shard)
    names = {r.get(k) for r in rows for k in ("file", "dense_file") if isinstance(r.get(k), str)}
    names |= {p.name for p in out.iterdir() if _VIDEO.match(p.name)}
    for name in sorted(names):
        if "/" not in name and name not in ("", ".", ".."):
            (out / name).unlink(missing_ok=True)
    for path in [out / REPORT, out / SUMMARY, out / RUN, *shards]:
        path.unlink(missing_ok=True)


def write_run(out: Path, opts: Any) -> None:
    tmp = out / f".{RUN}.partial"
    tmp.write_text(json.dumps(_run_identity(opts), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, out / RUN)


# ----------------------------------------------------------------------------------------- summary
def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


SPEEDUP_DEFINITION = (
    "speedup = dense seconds / method seconds for the same prompt and seed (whole pipeline call); "
    "the overall figure divides the sums over the compared items"
)
CPU_NOTE = ("timings on a shared CPU are noisy (identical runs can differ several-fold); "
            "compare speed on an idle machine or a GPU")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the latest row of every item: counts, seconds of every timed run, speedup, quality."""
    ok = [r for r in rows if r.get("status") == "ok"]
    compared = [r for r in ok if r.get("dense_seconds")]
    method_seconds = sum(r["seconds"]["total"] for r in ok)
    dense_seconds = sum(r["dense_seconds"]["total"] for r in compared)
    compared_method = sum(r["seconds"]["total"] for r in compared)
    speedups = [r["speedup"] for r in compared if r.get("speedup") is not None]
    devices = sorted({str(r.get("device", "")).split(" ")[0] for r in ok})
    return {
        "items": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "seconds": method_seconds + dense_seconds,  # every timed pipeline call, dense comparisons included
        "method_seconds": method_seconds,
        "dense_seconds": dense_seconds,
        "speedup": (dense_seconds / compared_method) if compared and compared_method > 0 else None,
        "speedup_mean": _mean(speedups),
        "speedup_min": min(speedups) if speedups else None,
        "speedup_max": max(speedups) if speedups else None,
        "speedup_definition": SPEEDUP_DEFINITION if compared else None,
        "devices": devices,
        "note": CPU_NOTE if compared and any(d.startswith("cpu") for d in devices) else None,
        "density": _mean([r.get("density") for r in ok]),
        "psnr": _mean([r.get("psnr") for r in compared]),
        "ssim": _mean([r.get("ssim") for r in compared]),
        "lpips": _mean([r.get("lpips") for r in compared]),
        "rows": rows,
    }


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def format_table(summary: dict[str, Any]) -> str:
    """The summary printed at the end of a batch: a row per item (prompts and errors in full), totals,
    the speedup's definition and, on a CPU, the timing caveat."""
    head = f"{'#':>4}  {'status':6}  {'sec':>7}  {'dense s':>7}  {'speedup':>7}  {'density':>7}  {'PSNR':>6}  {'SSIM':>6}  prompt"
    lines = [head, "-" * len(head)]
    errors = []
    for r in summary["rows"]:
        secs = (r.get("seconds") or {}).get("total")
        dense = (r.get("dense_seconds") or {}).get("total")
        psnr = "same" if r.get("identical_to_dense") else _fmt(r.get("psnr"), ".2f")
        lines.append(
            f"{r.get('index', '?'):>4}  {r.get('status', '?'):6}  {_fmt(secs, '.2f'):>7}  {_fmt(dense, '.2f'):>7}"
            f"  {_fmt(r.get('speedup'), '.2f', 'x'):>7}  {_fmt(r.get('density'), '.3f'):>7}  {psnr:>6}"
            f"  {_fmt(r.get('ssim'), '.4f'):>6}  {r.get('prompt') or ''}"
        )
        if r.get("status") != "ok":
            errors.append(f"item {r.get('index', '?')} failed: {r.get('error') or 'unknown error'}")
    lines.append("-" * len(head))
    lines.extend(errors)
    seconds = f"{summary['seconds']:.1f} s"
    if summary.get("dense_seconds"):
        seconds += f" ({summary['method_seconds']:.1f} method + {summary['dense_seconds']:.1f} dense)"
    lines.append(
        f"{summary['ok']}/{summary['items']} ok, {summary['errors']} failed, {seconds}; "
        f"density {_fmt(summary['density'], '.3f')}, PSNR {_fmt(summary['psnr'], '.2f')}, "
        f"SSIM {_fmt(summary['ssim'], '.4f')}"
        + (f", LPIPS {summary['lpips']:.4f}" if summary.get("lpips") is not None else "")
    )
    if summary.get("speedup") is not None:
        lines.append(
            f"speedup {summary['speedup']:.2f}x overall; per item mean {_fmt(summary['speedup_mean'], '.2f', 'x')}"
            f" ({_fmt(summary['speedup_min'], '.2f', 'x')} to {_fmt(summary['speedup_max'], '.2f', 'x')})"
        )
        lines.append(summary["speedup_definition"])
    if summary.get("note"):
        lines.append("note: " + summary["note"])
    return "\n".join(lines)

