"""Turn benchmark JSON rows into plots and the README's results section.

Reads every ``*.jsonl`` under ``benchmarks/results/`` (kernel, end-to-end, UNet, synthetic-quality and
tiny-model rows), draws ``benchmarks/results/plots/*.png`` (error and recall vs density, tiny-model PSNR
vs density, kernel speedup vs density, the speed–fidelity Pareto front where both are measured) and rewrites the part of ``README.md`` between
``<!-- results:start -->`` and ``<!-- results:end -->``. Numbers that were never measured on a GPU are
said to be unmeasured, never filled in.

    diffattn bench report                 # rewrite README results + plots
    diffattn bench report --check         # exit 1 if README is out of date with the JSON
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["load_rows", "render_markdown", "update_readme", "draw_plots", "main"]

START, END = "<!-- results:start -->", "<!-- results:end -->"


def load_rows(results_dir: Path | str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            row.setdefault("bench", "kernel" if "tflops" in row else "unknown")
            row["_file"] = path.name
            rows.append(row)
    return rows


def _is_gpu(row: dict[str, Any]) -> bool:
    return row.get("device_type") == "cuda"


def _table(intro: str, columns: list[str], body: Iterable[Iterable[str]]) -> list[str]:
    """``intro``, a blank line and a Markdown table of ``columns``, one line per row of cells in ``body``."""
    return [intro, "", _line(columns), "|" + "---|" * len(columns), *(_line(cells) for cells in body)]


def _line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _cfg_label(row: dict[str, Any]) -> str:
    """The fields that tell a method's sweep points apart (the rest are defaults)."""
    cfg = row.get("config") or {}
    if cfg.get("mode") == "recall":
        parts = [f"recall mode, target={cfg.get('target_recall')}"]
    else:
        keys = ("sparsity", "density", "decay_factor", "kernel_size", "stride", "qk_bits", "pv_bits")
        parts = [f"{k}={cfg[k]}" for k in keys if cfg.get(k) is not None]
    if cfg.get("head_adaptive") is False:
        parts.append("no head-adaptive")
    return ", ".join(parts) if parts else "defaults"


def _quality_table(rows: list[dict[str, Any]]) -> list[str]:
    q = [r for r in rows if r["bench"] == "quality"]
    if not q:
        return ["Fidelity on synthetic attention: not yet measured."]
    first = q[0]
    grid = "×".join(str(x) for x in first.get("grid", []))
    return _table(
        f"**Fidelity on synthetic DiT-like attention** (`diffattn bench quality`; grid {grid}, "
        f"{first.get('heads')} heads × {first.get('head_dim')}, Wan 3-D RoPE, measured at step 40 of 50 "
        f"with the inputs drifting per step by `drift`; {first.get('device')}, commit "
        f"`{first.get('commit')}`). Relative L2 error of the output vs dense fp32 attention, recall = "
        "attention mass kept.",
        ["method", "config", "drift", "density", "recall", "rel. L2 error"],
        (
            [r["method"], _cfg_label(r), str(r.get("drift", "-")), f"{r['density']:.3f}", f"{r['recall']:.3f}",
             f"{r['rel_l2']:.4f}"]
            for r in sorted(q, key=lambda r: (r["method"], -r["density"], r.get("drift", 0), _cfg_label(r)))
        ),
    )


def _tiny_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["bench"] == "tiny":
            groups[r.get("label", r["method"])].append(r)
    return groups


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _tiny_psnr(r: dict[str, Any]) -> float:
    return float("inf") if r.get("psnr") is None else r["psnr"]


def _tiny_table(rows: list[dict[str, Any]]) -> list[str]:
    groups = _tiny_groups(rows)
    if not groups:
        return ["Fidelity on the embedded tiny model: not yet measured."]
    first = next(iter(groups.values()))[0]
    intro = (
        f"**Fidelity on the embedded tiny model** (`diffattn bench tiny`; {first['frames']}×{first['height']}×"
        f"{first['width']} videos, {first['steps']} steps, each prompt generated densely and with the method "
        f"from the same seed; {first.get('device')}, commit `{first.get('commit')}`). PSNR and SSIM of the "
        "method's video against the dense one; density is the share of video tile pairs computed as each "
        "method reports it, averaged over its sparse calls"
        + (" (GNA's is its layout's share after padding the grid to whole 4×8×8 tiles: on a grid its window "
           "covers, as here with the defaults, that is all the real work of dense attention)"
           if "gna" in groups else "")
        + ". Speed is the shape's fitted speed along the prompted direction in the method's videos, in px a "
        "frame, with the dense videos' in brackets (the training videos move 2.9-3.5)."
    )
    body = []
    for label, rs in sorted(groups.items(), key=lambda kv: -_mean([_tiny_psnr(r) for r in kv[1]])):
        psnrs = [_tiny_psnr(r) for r in rs]
        shown = "∞ (identical)" if min(psnrs) == float("inf") else f"{_mean(psnrs):.1f} ({min(psnrs):.1f})"
        densities = [r["density"] for r in rs if r.get("density") is not None]
        density = f"{_mean(densities):.3f}" if densities else "-"
        name = rs[0]["method"] if label == rs[0]["method"] else f"{rs[0]['method']} ({label})"
        if rs[0]["method"] == "agent":
            config = "DiT layout (experimental)"
        else:
            config = "defaults" if label == rs[0]["method"] else _cfg_label(rs[0])
        speeds = [r["speed"] for r in rs if r.get("speed") is not None]
        dense_speeds = [r["dense_speed"] for r in rs if r.get("dense_speed") is not None]
        speed = f"{_mean(speeds):.2f} ({_mean(dense_speeds):.2f})" if speeds and dense_speeds else "-"
        body.append([name, config, str(len(rs)), density, shown, f"{_mean([r['ssim'] for r in rs]):.4f}", speed])
    columns = ["method", "config", "prompts", "density", "PSNR mean (min) dB", "SSIM mean", "speed (dense) px/frame"]
    return _table(intro, columns, body)


def _kernel_table(rows: list[dict[str, Any]]) -> list[str]:
    k = [r for r in rows if r["bench"] == "kernel" and _is_gpu(r) and r.get("ms") is not None]
    if not k:
        return ["Kernel speed (H100 targets: dense ≥ 0.9× SDPA-flash, time ≤ 1.15·d·dense, ≥ 1.2× FlexAttention): "
                "**not yet measured on a GPU**."]
    return _table(
        "**Kernel speed** (`diffattn bench kernel`; random layouts at fixed densities and each method's "
        "real layout on synthetic DiT-like inputs)",
        ["device", "shape", "dtype", "layout", "backend", "density", "ms", "TFLOP/s"],
        (
            [r["device"], r["shape"], r["dtype"], r.get("layout", "random"), r["backend"], f"{r['density']:.2f}",
             f"{r['ms']:.2f}", "-" if r.get("tflops") is None else f"{r['tflops']:.0f}"]
            for r in sorted(k, key=lambda r: (r["device"], r["shape"], r.get("layout", "random"), r["backend"],
                                              -r["density"]))
        ),
    )


def _cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    """``diffattn bench cpu`` rows: one line per (shape, layout, density) with the three providers side by side."""
    c = [r for r in rows if r["bench"] == "cpu" and r.get("ms") is not None]
    if not c:
        return []
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in c:
        key = (r["N"], r["B"], r["H"], r["D"], r["layout"], r.get("density_target", -1.0))
        groups[key][r["provider"]] = r
    first = c[0]
    loads = [x for r in c for x in r.get("loadavg_1m", [])]
    reps = sorted({r.get("reps") for r in c if r.get("reps")})
    rounds = f"{reps[0]}" if len(reps) == 1 else f"{reps[0]}-{reps[-1]}"
    # A run is "idle" when the 1-minute load stayed below the core count (its own threads included).
    span = f"1-minute load average {min(loads):.1f}–{max(loads):.1f}" if loads else "load not recorded"
    if loads and max(loads) < (first.get("host_cpus") or 1):
        load_note = f"otherwise idle: {span}"
    else:
        load_note = (
            f"the machine was shared: {span}, so absolute times are inflated and only the side-by-side "
            "ratios count"
        )
    commands = " and ".join(f"`{cmd}`" for cmd in dict.fromkeys(r.get("command", "diffattn bench cpu") for r in c))
    intro = (
        f"**Block-sparse attention on a CPU** ({commands}; "
        f"{first['device']}, {first.get('host_cpus')} cores, torch {first['torch']}, fp32, commit "
        f"`{first['commit']}`; {load_note}). Each row times the same "
        "attention with dense SDPA, compiled FlexAttention and diffattn, interleaved, the minimum of "
        f"{rounds} rounds; one-off costs (Flex's compile, the kernel's build) are not in the times. "
        "Random layouts keep `round(d·M)` random key blocks of 64 per query block; method layouts are each "
        "method's calls at a late step on synthetic DiT-like inputs."
    )
    body = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4] != "random", k[4], -k[5])):
        g = groups[key]
        ours, sdpa, flex = g.get("diffattn"), g.get("sdpa"), g.get("flex-compiled")
        if ours is None or sdpa is None:
            continue
        n, b, h, d, layout, _ = key
        flex_ms = "-" if flex is None else f"{flex['ms']:.1f}"
        vs_flex = "-" if flex is None else f"{flex['ms'] / ours['ms']:.2f}×"
        body.append([f"{n:,}", f"{b}×{h}×{d}", layout, f"{ours['density']:.2f}", f"{sdpa['ms']:.1f}", flex_ms,
                     f"{ours['ms']:.1f}", f"{sdpa['ms'] / ours['ms']:.2f}×", vs_flex, ", ".join(ours.get("paths", []))])
    columns = ["N", "B×H×D", "layout", "density", "SDPA ms", "Flex ms", "diffattn ms", "diffattn vs SDPA",
               "diffattn vs Flex", "path"]
    return _table(intro, columns, body)


def _e2e_table(rows: list[dict[str, Any]]) -> list[str]:
    e = [r for r in rows if r["bench"] == "e2e" and _is_gpu(r)]
    if not e:
        return ["End-to-end denoiser speed (Wan2.1-1.3B 480p, Wan-14B 720p, CogVideoX-2b, 50 steps; target "
                "≥ 2× at Wan 480p): **not yet measured on a GPU**."]
    return _table(
        "**End-to-end** (`diffattn bench e2e`, full 50-step schedules incl. warm-up and search steps)",
        ["device", "model", "method", "total s", "speedup", "attention share", "density", "extra memory"],
        (
            [r["device"], r["model"], r["method"], f"{r['total_s']:.1f}", f"{r.get('speedup_vs_dense', float('nan')):.2f}×",
             f"{r['attention_share']:.0%}", f"{(r['density'] or 1.0):.3f}",
             "-" if r.get("extra_mem_vs_dense") is None else f"{r['extra_mem_vs_dense']:+.1%}"]
            for r in e
        ),
    )


def _unet_table(rows: list[dict[str, Any]]) -> list[str]:
    u = [r for r in rows if r["bench"] == "unet" and _is_gpu(r)]
    if not u:
        return ["SD 1.5 UNet speed with agent attention / ToMe (target ≥ 1.5× at 1024²): **not yet measured on a GPU**."]
    return _table(
        "**UNet** (`diffattn bench unet`)",
        ["device", "resolution", "method", "s / image", "speedup"],
        (
            [r["device"], str(r.get("resolution", r.get("sample"))), r["method"],
             f"{r.get('s_per_image', float('nan')):.2f}", f"{r.get('speedup', float('nan')):.2f}×"]
            for r in u
        ),
    )


def render_markdown(rows: list[dict[str, Any]]) -> str:
    parts = [_tiny_table(rows), _quality_table(rows), _kernel_table(rows), _cpu_table(rows), _e2e_table(rows),
             _unet_table(rows)]
    body = "\n\n".join("\n".join(p) for p in parts if p)
    return f"{START}\n{body}\n\nRegenerate with `diffattn bench report` (from the JSON rows in `benchmarks/results/`).\n{END}"


def update_readme(readme: Path | str, rows: list[dict[str, Any]]) -> tuple[str, str]:
    path = Path(readme)
    text = path.read_text()
    new = render_markdown(rows)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        updated = before + new + after
    else:
        updated = text.rstrip() + "\n\n" + new + "\n"
    return text, updated


def draw_plots(rows: list[dict[str, Any]], out_dir: Path | str) -> list[Path]:
    from .._extras import need

    matplotlib = need("matplotlib", "plot")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    q = [r for r in rows if r["bench"] == "quality" and r["method"] != "dense"]
    if q:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        by = defaultdict(list)
        for r in q:
            by[r["method"]].append(r)
        for name, rs in sorted(by.items()):
            rs.sort(key=lambda r: r["density"])
            axes[0].plot([r["density"] for r in rs], [r["rel_l2"] for r in rs], "o-", label=name)
            axes[1].plot([r["density"] for r in rs], [r["recall"] for r in rs], "o-", label=name)
        axes[0].set(xlabel="density", ylabel="relative L2 error vs dense", title="error vs density")
        axes[1].set(xlabel="density", ylabel="recall (attention mass kept)", title="recall vs density")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        written.append(save(fig, "quality_vs_density.png"))
    tiny = _tiny_groups(rows)
    if tiny:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rs in sorted(tiny.items()):
            pts = [(r["density"], r["psnr"]) for r in rs if r.get("density") is not None and r.get("psnr") is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.axhline(30.0, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="density", ylabel="PSNR vs dense (dB)", title="tiny model: fidelity vs density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save(fig, "tiny_psnr_vs_density.png"))
    k = [r for r in rows if r["bench"] == "kernel" and _is_gpu(r) and r.get("ms")]
    if k:
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = defaultdict(list)
        dense = {(r["device"], r["shape"]): r["ms"] for r in k if r["backend"] == "sdpa"}
        for r in k:
            if r["backend"] not in ("sdpa", "search") and (r["device"], r["shape"]) in dense:
                layout = r.get("layout", "random")
                key = (r["shape"], r["backend"], "random" if layout == "dense" else layout)
                groups[key].append((r["density"], dense[(r["device"], r["shape"])] / r["ms"]))
        for (shape, backend, layout), pts in sorted(groups.items()):
            pts.sort()
            style = "o-" if layout == "random" else "*"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{backend} {shape} ({layout})")
        ax.set(xlabel="density", ylabel="speedup vs SDPA flash", title="kernel speedup vs density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save(fig, "kernel_speedup.png"))
    e = [r for r in rows if r["bench"] == "e2e" and _is_gpu(r) and r.get("speedup_vs_dense")]
    if e and tiny:
        # fidelity of a method at its defaults: mean tiny-model PSNR of the row labelled with its name
        fidelity = {label: _mean([r["psnr"] for r in rs if r.get("psnr") is not None] or [float("nan")])
                    for label, rs in tiny.items()}
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in e:
            if r["method"] in fidelity:
                ax.scatter(fidelity[r["method"]], r["speedup_vs_dense"])
                ax.annotate(f"{r['method']} ({r['model']})", (fidelity[r["method"]], r["speedup_vs_dense"]), fontsize=7)
        ax.axvline(30.0, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="PSNR vs dense on the tiny model (dB)", ylabel="end-to-end speedup", title="speed vs fidelity")
        ax.grid(alpha=0.3)
        written.append(save(fig, "pareto.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 if README's results section is stale")
    a = p.parse_args(argv)
    rows = load_rows(a.results)
    old, new = update_readme(a.readme, rows)
    if a.check:
        if old != new:
            print(f"{a.readme} results section is out of date: run `diffattn bench report`")
            return 1
        print(f"{a.readme} results section matches {len(rows)} rows")
        return 0
    Path(a.readme).write_text(new)
    print(f"rewrote the results section of {a.readme} from {len(rows)} rows")
    if not a.no_plots:
        for path in draw_plots(rows, Path(a.results) / "plots"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
