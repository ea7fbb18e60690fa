"""Stable Diffusion UNet benchmark: dense vs agent attention (AgentSD, pooled agents) vs token merging.

Speed: an SD 1.5-shaped UNet (random weights; speed does not depend on them) runs a whole schedule of
``--steps`` forwards with a CFG batch of 2 (one image), so the agent steps and the later token-merging
steps are both paid for. Per (resolution, method) one JSON row: seconds per image (UNet forwards
only), median forward time in the agent phase and after it, self-attention FLOPs per image (the
``4·B·H·Nq·Nk·D`` of every self-attention call, merging/matching excluded), speed-up vs dense.

Quality proxy (CPU, always printed): relative L2 difference of the UNet output (noise prediction) vs
dense attention on the tiny random SD UNet, per method and phase, plus the experimental DiT layout on
a tiny random Wan transformer. Random weights make this a sanity check of how far each approximation
moves the output, not an image-quality measurement.

    diffattn bench unet                      # GPU: 512² and 1024², fp16, 50 steps
    diffattn bench unet --quick              # CPU toy: tiny UNet, checks the script only
    diffattn bench unet --quality-only       # just the CPU quality proxy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import diffattn
from diffattn.bench.common import default_output, environment, write_rows

# name -> (method, fields). Pooled agents use the same agent count as AgentSD's merge at 512² (N/16).
METHODS: dict[str, tuple[str | None, dict]] = {
    "dense": (None, {}),
    "agent": ("agent", {}),
    "agent-pool": ("agent", {"agent_source": "pool", "num_agents": 256}),
    "agent-only": ("agent", {"agent_steps": 50}),
    "tome": ("tome", {}),
    "tome-0.4": ("tome", {"ratio": 0.4, "proportional": False}),
}


def sd15_unet(sample: int, device, dtype):
    """UNet2DConditionModel with SD 1.5's shape (860M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    from .common import build_model

    return build_model(
        lambda: UNet2DConditionModel(
            sample_size=sample, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        device, dtype,
    )


def tiny_unet(sample: int, device, dtype):
    from diffattn.pipelines.tiny_sd import tiny_sd_pipeline

    unet = tiny_sd_pipeline(seed=0, sample_size=sample, with_tokenizer=False).unet.to(device)
    return (unet if dtype == torch.float32 else unet.to(dtype=dtype)).eval()


def _inputs(unet, sample: int, text_dim: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, sample, sample, generator=g).to(device, dtype),
        torch.randn(2, 77, text_dim, generator=g).to(device, dtype),
    )


def run_schedule(unet, method: str, steps: int, sample: int, device, dtype) -> dict:
    """One image: ``steps`` UNet forwards (CFG batch 2) with decreasing timesteps."""
    name, fields = METHODS[method]
    if name is not None:
        diffattn.apply(unet, name, min_tokens=0, num_steps=steps, **fields)
    latents, text = _inputs(unet, sample, unet.config.cross_attention_dim, device, dtype)
    timesteps = torch.linspace(999, 1, steps).round().long()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        with torch.no_grad():
            for t in timesteps:
                sync()
                t0 = time.perf_counter()
                unet(latents, t.expand(2).to(device), encoder_hidden_states=text, return_dict=False)
                sync()
                times.append(time.perf_counter() - t0)
        rows = diffattn.stats(unet).rows if name is not None else []
    finally:
        if name is not None:
            diffattn.remove(unet)
    switch = int(round(20 * steps / 50))
    early, late = times[:switch] or times, times[switch:] or times
    out = {
        "s_per_image": sum(times),
        "forward_ms_early": 1e3 * statistics.median(early),
        "forward_ms_late": 1e3 * statistics.median(late),
    }
    if rows:
        out["self_attn_gflops"] = sum(r["flops"] for r in rows) / 1e9
        out["dense_self_attn_gflops"] = sum(r["flops"] / r["density"] for r in rows) / 1e9
        out["phases"] = sorted({r["phase"] for r in rows})
    return out


def speed(args, env) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    rows = []
    for res in args.resolutions:
        sample = res // 8 if not args.quick else res // 2
        build = tiny_unet if args.quick else sd15_unet
        unet = build(sample, device, dtype)
        # Warm-up of every method before any is timed (kernel compilation, autotuning, allocator,
        # cuDNN choices), reported apart as warmup_s.
        warmup = {}
        for m in args.methods:
            t0 = time.perf_counter()
            run_schedule(unet, m, 2, sample, device, dtype)
            warmup[m] = time.perf_counter() - t0
        results = {m: run_schedule(unet, m, args.steps, sample, device, dtype) | {"warmup_s": warmup[m]}
                   for m in args.methods}
        dense = results.get("dense")
        dense_flops = next((r["dense_self_attn_gflops"] for r in results.values() if "dense_self_attn_gflops" in r), None)
        for m, r in results.items():
            row = {
                "bench": "unet", "model": "tiny-sd-unet" if args.quick else "sd15-unet", "resolution": res,
                "latent": sample, "top_tokens": sample * sample, "method": m, "config": METHODS[m][1],
                "steps": args.steps, "cfg_batch": 2, "dtype": args.dtype, "quick": args.quick, **env, **r,
            }
            if m == "dense" and dense_flops is not None:
                row["self_attn_gflops"] = dense_flops
            if dense is not None:
                row["speedup"] = dense["s_per_image"] / r["s_per_image"]
            rows.append(row)
            flops = row.get("self_attn_gflops")
            print(
                f"{res}² {m:11s} {r['s_per_image']:8.3f} s/image  early {r['forward_ms_early']:8.1f} ms  "
                f"late {r['forward_ms_late']:8.1f} ms  self-attn {flops if flops is None else round(flops, 1)} GFLOP"
                f"  speed-up {row.get('speedup', float('nan')):.2f}x",
                flush=True,
            )
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ quality proxy
def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def quality_proxy() -> list[dict]:
    """Relative L2 of the tiny UNet's output vs dense at an early (agent) and a late step."""
    torch.manual_seed(0)
    rows = []
    unet = tiny_unet(16, "cpu", torch.float32)
    latents, text = _inputs(unet, 16, unet.config.cross_attention_dim, "cpu", torch.float32, seed=1)
    configs = {
        "agent": ("agent", {}),
        "agent-pool": ("agent", {"agent_source": "pool", "num_agents": 16}),
        "agent-q-metric": ("agent", {"metric": "q"}),
        "agent-no-shortcut": ("agent", {"shortcut": 0.0}),
        "tome": ("tome", {}),
        "tome-plain": ("tome", {"proportional": False}),
        "tome-0.4": ("tome", {"ratio": 0.4, "proportional": False}),
    }
    steps = 5  # agent phase: steps 0-1 (20 of 50 scaled), token merging after
    t_seq = torch.linspace(999, 1, steps).round().long()
    with torch.no_grad():
        dense = [unet(latents, t.expand(2), encoder_hidden_states=text, return_dict=False)[0] for t in t_seq]
        for label, (name, fields) in configs.items():
            diffattn.apply(unet, name, min_tokens=0, num_steps=steps, **fields)
            try:
                outs = [unet(latents, t.expand(2), encoder_hidden_states=text, return_dict=False)[0] for t in t_seq]
                phases = {r["step"]: r["phase"] for r in diffattn.stats(unet).rows if r["grid"] == (1, 16, 16)}
            finally:
                diffattn.remove(unet)
            for step in (0, steps - 1):
                rows.append({"model": "tiny-sd-unet 16x16", "method": label, "step": step, "phase": phases[step],
                             "rel_l2_vs_dense": _rel(outs[step], dense[step])})
    rows.extend(_dit_proxy())
    return rows


def _dit_proxy() -> list[dict]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 4, 5, 16, 16, generator=g), timestep=torch.full((2,), 500.0),
              encoder_hidden_states=torch.randn(2, 7, 32, generator=g))
    rows = []
    with torch.no_grad():
        ref = wan(**kw, return_dict=False)[0]
        for agents in (16, 64, 160):
            diffattn.apply(wan, "agent", min_tokens=0, layout="dit", num_agents=agents)
            try:
                out = wan(**kw, return_dict=False)[0]
                used = diffattn.stats(wan).rows[0]["agents"]
            finally:
                diffattn.remove(wan)
            rows.append({"model": "tiny-wan 5x8x8 (320 tokens)", "method": f"agent-dit ({used} agents)", "step": 0,
                         "phase": "agent", "rel_l2_vs_dense": _rel(out, ref)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="pixels (default 512 1024; quick: 32)")
    ap.add_argument("--methods", nargs="+", default=["dense", "agent", "agent-pool", "tome"], choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="forwards per image (default 50; quick: 3)")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny UNet on CPU: checks the script, not speed")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--out", default=None, help="JSON-lines file to append to (default benchmarks/results/...)")
    a = ap.parse_args(argv)
    a.resolutions = a.resolutions or ([32] if a.quick else [512, 1024])
    a.steps = a.steps or (3 if a.quick else 50)
    a.dtype = a.dtype or ("fp16" if a.device == "cuda" and not a.quick else "fp32")
    env = environment(a.device)
    rows: list[dict] = []
    if not a.quality_only:
        if torch.device(a.device).type != "cuda" and not a.quick:
            print("no CUDA device: the SD 1.5 speed benchmark needs a GPU (use --quick for a CPU smoke run)")
            return 2
        rows += speed(a, env)
    print("\nquality proxy (CPU, random weights): relative L2 of the denoiser output vs dense")
    for r in quality_proxy():
        print(f"  {r['model']:28s} {r['method']:26s} step {r['step']:2d} ({r['phase']:5s})  {r['rel_l2_vs_dense']:.4f}")
        rows.append({"bench": "unet-quality-proxy", **{k: v for k, v in env.items() if k != "device"},
                     "device": "cpu", **r})
    out = Path(a.out) if a.out else default_output("unet", env)
    write_rows(rows, out)
    print(f"\n{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
