"""End-to-end denoiser benchmark: real-size architectures with random weights, full schedules.

The model is built on the target device in the target dtype. For each method, one untimed call at
each step where a method changes phase compiles and autotunes its kernels first (``warmup_s``, apart);
then the denoiser runs a whole denoising schedule (every step, every CFG call), so dense warm-up
steps, search steps and cached steps are all paid for exactly as in generation. Reported per
(model, method): total seconds, median steady-state step time, attention time and share, mean
density, searches, peak memory and speedup/extra memory against dense in the same run. The device is
synchronised at the ends of each step only: attention time comes from CUDA events, so no attention
call waits on the host and the totals time the schedule as it runs in generation.

Random weights change nothing about speed; fidelity is measured elsewhere (``diffattn bench quality``
on the synthetic attention set and the trained tiny model).

    python -m diffattn.bench.e2e --model wan1.3b-480p --methods dense,radial,adaspa --steps 50
    python -m diffattn.bench.e2e --quick        # toy shapes on CPU: checks the harness, not speed
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import diffattn
from diffattn.processors.sparse import state_of

from .common import build_model, default_output, environment, write_rows

__all__ = ["PRESETS", "run", "main"]


@dataclass
class Preset:
    """A denoiser shape to benchmark: how to build it and feed it one CFG call."""

    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.device, torch.dtype], dict]
    cfg_calls: int  # transformer calls per step (Wan: 2, batched-CFG models: 1)
    tokens: int
    methods: tuple[str, ...]
    notes: str = ""
    layer_attr: str = "blocks"


VIDEO_METHODS = tuple(diffattn.methods.method_names(family="video"))
UNET_METHODS = tuple(diffattn.methods.method_names(family="unet"))


def _wan(heads: int, ffn: int, layers: int, in_ch: int = 16, text_dim: int = 4096):
    def build():
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=in_ch,
            out_channels=in_ch, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )

    return build


def _wan_inputs(latent: tuple[int, int, int], text: int, in_ch: int = 16, text_dim: int = 4096):
    def make(device, dtype):
        f, h, w = latent
        return dict(
            hidden_states=torch.randn(1, in_ch, f, h, w, device=device, dtype=dtype),
            timestep=torch.tensor([999.0], device=device),
            encoder_hidden_states=torch.randn(1, text, text_dim, device=device, dtype=dtype),
        )

    return make


def _cogvideox_build():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
        patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=False,
    )


def _cogvideox_inputs(device, dtype):
    return dict(
        hidden_states=torch.randn(2, 13, 16, 60, 90, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, 226, 4096, device=device, dtype=dtype),
        timestep=torch.tensor([999, 999], device=device),
    )


def _unet_build(sample: int):
    def build():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            sample_size=sample, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )

    return build


def _unet_inputs(sample: int):
    def make(device, dtype):
        return dict(
            sample=torch.randn(2, 4, sample, sample, device=device, dtype=dtype),
            timestep=torch.tensor([999, 999], device=device),
            encoder_hidden_states=torch.randn(2, 77, 768, device=device, dtype=dtype),
        )

    return make


PRESETS: dict[str, Preset] = {
    # Wan2.1-T2V-1.3B, 81 frames 480x832: latent 21x60x104 -> 21x30x52 = 32,760 tokens.
    "wan1.3b-480p": Preset("wan", _wan(12, 8960, 30), _wan_inputs((21, 60, 104), 512), 2, 32760, VIDEO_METHODS),
    # Wan2.1-14B layer shapes, 81 frames 720x1280: 21x45x80 = 75,600 tokens (use --layers to cut).
    "wan14b-720p": Preset(
        "wan", _wan(40, 13824, 40), _wan_inputs((21, 90, 160), 512), 2, 75600, VIDEO_METHODS,
        notes="Wan2.1-14B shape",
    ),
    # CogVideoX-2b, 49 frames 480x720: 13x30x45 = 17,550 video tokens + 226 text, CFG batched.
    "cogvideox-2b": Preset(
        "cogvideox", _cogvideox_build, _cogvideox_inputs, 1, 17550 + 226, VIDEO_METHODS,
        layer_attr="transformer_blocks",
    ),
    # SD 1.5 UNet at 1024x1024: latent 128x128 -> 16,384 tokens in the top blocks, CFG batched.
    "sd15-unet-1024": Preset("unet", _unet_build(128), _unet_inputs(128), 1, 16384, UNET_METHODS, layer_attr=""),
    "sd15-unet-512": Preset("unet", _unet_build(64), _unet_inputs(64), 1, 4096, UNET_METHODS, layer_attr=""),
    # Toy shapes for a CPU smoke run of the harness.
    "toy-wan": Preset(
        "wan", lambda: _toy_wan(), _wan_inputs((4, 16, 16), 8, in_ch=4, text_dim=32), 2, 256, VIDEO_METHODS,
        notes="toy",
    ),
}


def _toy_wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


@dataclass
class _Schedule:
    """Stands in for a pipeline scheduler: the processors read its step index and timesteps."""

    timesteps: torch.Tensor
    step_index: int | None = None
    order: int = 1
    extra: dict = field(default_factory=dict)


def _truncate(model: torch.nn.Module, attr: str, layers: int | None) -> None:
    if not layers or not attr:
        return
    blocks = getattr(model, attr)
    setattr(model, attr, torch.nn.ModuleList(list(blocks)[:layers]))


def run(
    preset_name: str,
    methods: list[str] | None = None,
    steps: int = 50,
    layers: int | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    configs: dict[str, dict] | None = None,
    min_tokens: int = 0,
) -> list[dict[str, Any]]:
    if preset_name not in PRESETS:
        raise ValueError(f"unknown model preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    if dev.type == "cpu" and dt == torch.bfloat16:
        dt = torch.float32
    methods = methods or [m for m in preset.methods if m in diffattn.methods()]
    unknown = [m for m in methods if m not in diffattn.methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {diffattn.methods()}")
    env = environment(dev)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = build_model(preset.build, dev, dt)
    build_s = time.perf_counter() - t_build
    _truncate(model, preset.layer_attr, layers)
    inputs = preset.inputs(dev, dt)
    schedule = _Schedule(torch.linspace(999, 0, steps))

    def step(s: int) -> float:
        schedule.step_index = None if s == 0 else s
        inputs["timestep"] = torch.full_like(inputs["timestep"], float(schedule.timesteps[s]))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(preset.cfg_calls):
            model(**inputs, return_dict=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) * 1e3

    rows: list[dict[str, Any]] = []
    dense_row: dict[str, Any] | None = None
    for method in methods:
        method_cfg = (configs or {}).get(method, {})
        # The first and last steps and those where the method plans anew (searches, calibrations), out of 50.
        events = diffattn.methods.get_method_class(method).event_steps(diffattn.make_config(method, method_cfg))
        warm_steps = sorted({min(steps - 1, round(s * steps / 50)) for s in (0, *events, 49)})
        # Warm-up: one untimed call at each phase-change step compiles and autotunes every kernel the
        # schedule will launch; it is reported apart (warmup_s) and the method starts afresh after.
        diffattn.apply(model, method, min_tokens=min_tokens, **method_cfg)
        state_of(model).tracker.scheduler = schedule
        with torch.no_grad():
            warmup_s = sum(step(s) for s in warm_steps) / 1e3
        diffattn.remove(model)
        cfg = diffattn.apply(model, method, min_tokens=min_tokens, **method_cfg)
        state = state_of(model)
        state.tracker.scheduler = schedule
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            step_ms = [step(s) for s in tqdm(range(steps), desc=f"{preset_name} {method}", leave=False)]
        summary = diffattn.stats(model).summary()
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        diffattn.remove(model)
        tail = sorted(step_ms[-max(1, steps // 5):])
        row = {
            **env,
            "bench": "e2e",
            "model": preset_name,
            "tokens": preset.tokens,
            "layers": layers or "all",
            "steps": steps,
            "cfg_calls": preset.cfg_calls,
            "dtype": str(dt).replace("torch.", ""),
            "method": method,
            "config": json.loads(cfg.to_json()),
            "total_s": sum(step_ms) / 1e3,
            "warmup_s": warmup_s,
            "build_s": build_s,
            "steady_step_ms": tail[len(tail) // 2],
            "attention_ms": summary["attention_ms"],
            "attention_share": summary["attention_ms"] / max(sum(step_ms), 1e-9),
            "density": summary["density"],
            "searches": summary["searches"],
            "cache_hits": summary["cache_hits"],
            "fallbacks": summary["fallbacks"],
            "peak_mem_gib": peak,
        }
        if method == "dense":
            dense_row = row
        if dense_row is not None:
            row["speedup_vs_dense"] = dense_row["total_s"] / row["total_s"]
            row["attention_speedup_vs_dense"] = dense_row["attention_ms"] / max(row["attention_ms"], 1e-9)
            if peak is not None and dense_row["peak_mem_gib"]:
                row["extra_mem_vs_dense"] = peak / dense_row["peak_mem_gib"] - 1.0
        rows.append(row)
    return rows


def _parse_configs(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        try:
            method, assignment = item.split(":", 1)
            key, value = assignment.split("=", 1)
        except ValueError:
            raise SystemExit(f"--config expects method:key=value, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffattn bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan1.3b-480p", choices=sorted(PRESETS))
    p.add_argument("--methods", default=None, help="comma-separated (default: the preset's methods)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --quick: 4)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (faster runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--config", action="append", default=[], help="method:key=value (repeatable)")
    p.add_argument("--out", default=None, help="JSON-lines file to append to")
    p.add_argument("--quick", action="store_true", help="toy model, 4 steps: a smoke test of the harness")
    a = p.parse_args(argv)
    if a.quick:
        a.model = "toy-wan"
    if a.steps is None:
        a.steps = 4 if a.quick else 50
    methods = a.methods.split(",") if a.methods else None
    rows = run(a.model, methods, a.steps, a.layers, a.device, a.dtype, _parse_configs(a.config))
    out = a.out or default_output("e2e", rows[0]) if rows else None
    if out:
        write_rows(rows, out)
    print(f"{'method':<10} {'total s':>9} {'step ms':>9} {'attn share':>10} {'density':>8} {'speedup':>8}")
    for r in rows:
        dens = "-" if r["density"] is None else f"{r['density']:.3f}"
        print(
            f"{r['method']:<10} {r['total_s']:>9.2f} {r['steady_step_ms']:>9.1f} {r['attention_share']:>10.2%} "
            f"{dens:>8} {r.get('speedup_vs_dense', float('nan')):>8.2f}"
        )
    if out:
        print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
