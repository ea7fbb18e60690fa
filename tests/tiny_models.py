"""Tiny random-weight Diffusers denoisers built from configs (no downloads), with input makers.

Each entry: ``build()`` → model (eval, fp32), ``inputs(grid, batch, text)`` → forward kwargs for a
latent token grid ``(F, H, W)``, and the joint-text layout the processor should detect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Tiny:
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]
    text_first: bool | None  # None: no text tokens in self-attention
    grids: tuple[tuple[int, int, int], ...]


def wan_model(image_dim=None, heads=2, layers=2):
    """The tiny Wan denoiser; ``heads``/``layers`` for checks that need another head count."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
    )


def _wan_inputs(grid, batch=2, text=7, image=False):
    f, h, w = grid
    kw = dict(
        hidden_states=torch.randn(batch, 4, f, 2 * h, 2 * w),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text + (512 if image else 0), 32),
    )
    if image:
        kw["encoder_hidden_states_image"] = torch.randn(batch, 5, 24)
        kw["encoder_hidden_states"] = torch.randn(batch, 512, 32)
    return kw


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    )


def _hunyuan_inputs(grid, batch=2, text=9):
    f, h, w = grid
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[0, text - 3 :] = 0  # padded text tokens in the first sample
    return dict(
        hidden_states=torch.randn(batch, 4, f, 2 * h, 2 * w),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, text, 16),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8),
        guidance=torch.full((batch,), 6000.0),
    )


def _cogvideox(patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=12, sample_frames=9,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    )


def _cogvideox_inputs(grid, batch=2, text=8, pt=1):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    f, h, w = grid
    # The pipeline passes RoPE as a keyword: it must survive the processor's signature filter.
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (h, w)), (h, w), f, use_real=True)
    return dict(
        hidden_states=torch.randn(batch, f * pt, 4, 2 * h, 2 * w),
        encoder_hidden_states=torch.randn(batch, text, 16),
        timestep=torch.full((batch,), 500),
        image_rotary_emb=rope,
    )


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16,
    )


def _ltx_inputs(grid, batch=2, text=6):
    f, h, w = grid
    return dict(
        hidden_states=torch.randn(batch, f * h * w, 4),
        encoder_hidden_states=torch.randn(batch, text, 16),
        timestep=torch.full((batch,), 500),
        encoder_attention_mask=torch.ones(batch, text, dtype=torch.long),
        num_frames=f,
        height=h,
        width=w,
    )


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )


def _flux_inputs(grid, batch=2, text=5):
    _, h, w = grid
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    return dict(
        hidden_states=torch.randn(batch, h * w, 8),
        encoder_hidden_states=torch.randn(batch, text, 16),
        pooled_projections=torch.randn(batch, 8),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
    )


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8,
    )


def _unet_inputs(grid, batch=2, text=7):
    _, h, w = grid
    return dict(
        sample=torch.randn(batch, 4, h, w),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, text, 16),
    )


TINY = {
    "wan": Tiny("wan", wan_model, _wan_inputs, None, ((3, 4, 6), (2, 5, 3))),
    "wan-i2v": Tiny(
        "wan", lambda: wan_model(image_dim=24), lambda g, batch=2: _wan_inputs(g, batch, image=True), None,
        ((3, 4, 6), (2, 3, 5)),
    ),
    "hunyuanvideo": Tiny("hunyuanvideo", _hunyuan, _hunyuan_inputs, False, ((3, 4, 6), (2, 3, 5))),
    "cogvideox": Tiny("cogvideox", _cogvideox, _cogvideox_inputs, True, ((3, 4, 6), (2, 6, 4))),
    "cogvideox-1.5": Tiny(
        "cogvideox", lambda: _cogvideox(patch_size_t=2),
        lambda g, batch=2: _cogvideox_inputs(g, batch, pt=2), True, ((2, 4, 6), (3, 3, 5)),
    ),
    "ltx": Tiny("ltx", _ltx, _ltx_inputs, None, ((3, 4, 6), (2, 5, 3))),
    "flux": Tiny("flux", _flux, _flux_inputs, True, ((1, 6, 8), (1, 5, 7))),
    "unet": Tiny("unet", _unet, _unet_inputs, None, ((1, 16, 16), (1, 8, 12))),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY[name].build().eval()


def inputs(name: str, grid, batch: int = 2, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    kw = TINY[name].inputs(grid, batch=batch)
    return kw


def run(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out


def run_steps(model: torch.nn.Module, kwargs: dict, timesteps) -> list[torch.Tensor]:
    """One forward per timestep, the other inputs unchanged: the steps of a denoising run."""
    outs = []
    for t in timesteps:
        kwargs["timestep"] = torch.full_like(kwargs["timestep"], t)
        outs.append(run(model, kwargs))
    return outs


def wan_pipeline(seed: int = 0):
    """A tiny random WanPipeline (Wan VAE + the tiny Wan transformer), used with ``prompt_embeds``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        attn_scales=[], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=build("wan", seed), scheduler=sched)
