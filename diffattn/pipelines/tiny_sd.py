"""Tiny random Stable Diffusion pipelines built from configs, for offline tests and examples.

Everything is constructed locally (no model hub): a small UNet2DConditionModel with cross-attention
at two resolutions, a one-downsample AutoencoderKL (pixel/latent factor 2), a two-layer CLIP text
encoder, a DDIM scheduler with Stable Diffusion's schedule, and a byte-level BPE ``CLIPTokenizer``
whose vocabulary holds every single byte (so any text tokenizes) plus whole-word tokens for a small
word list (so common words are one token, as in the real vocabulary).

>>> from diffattn.pipelines.tiny_sd import tiny_sd_pipeline
>>> pipe = tiny_sd_pipeline(seed=0)
>>> pipe.tokenizer("a cat on a mat").input_ids
[0, 322, 526, 518, 322, 544, 1]
>>> pipe.unet.config.sample_size, pipe.vae_scale_factor
(16, 2)
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

__all__ = ["tiny_sd_pipeline", "tiny_clip_tokenizer", "TINY_WORDS"]

# Words that get a single token each; anything else falls back to byte tokens.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "and", "with", "cat", "dog", "tiger", "lion", "jeep",
    "car", "road", "mat", "man", "woman", "red", "blue", "silver", "running", "driving",
    "watercolor", "painting", "photo", "sitting", "grass", "snow", "beach", "boy", "girl",
    "rabbit", "fox", "wolf", "swan", "duck", "flamingo", "eating", "carrot", "down", "curvy",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to unused code points."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_clip_tokenizer(words: Iterable[str] = TINY_WORDS, model_max_length: int = 77):
    """A ``CLIPTokenizer`` with a vocabulary built in memory.

    Ids: 0 ``<|startoftext|>``, 1 ``<|endoftext|>`` (also pad), then the 256 byte symbols, the 256
    end-of-word byte symbols, the merge intermediates and whole words, in the order first needed.
    A word from ``words`` encodes to one token; other text falls back to (end-of-word) byte tokens.
    """
    from .._extras import need

    need("transformers", "edit", "the tiny CLIP tokenizer")
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        word = word.lower()
        if len(word) < 2:
            continue
        # Left-to-right merges: "c a" -> "ca", "ca t</w>" -> "cat</w>". Each intermediate is a token.
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            pair = (current, right)
            current = current + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_sd_pipeline(
    seed: int = 0,
    *,
    sample_size: int = 16,
    block_out_channels: Sequence[int] = (32, 64),
    attention_heads: int = 2,
    cross_attention_dim: int = 32,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
):
    """Build a tiny random ``StableDiffusionPipeline`` (DDIM scheduler, no safety checker).

    Args:
        seed: seeds ``torch.manual_seed`` before each component is built, so the weights are reproducible.
        sample_size: latent side of the UNet's default resolution; pixels are twice this.
        block_out_channels: UNet channels per level; one cross-attention down/up block per level, so
            attention runs at ``sample_size / 2**level`` for each level (16² and 8² by default).
        attention_heads: heads of every UNet attention layer (head dim = channels / heads).
        cross_attention_dim: text-embedding width (CLIP hidden size).
        with_tokenizer: when False the pipeline has ``tokenizer=None``; pass ``prompt_embeds`` instead.
        dtype, device: where the components live.

    Returns:
        ``diffusers.StableDiffusionPipeline`` with ``vae_scale_factor == 2``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from .._extras import need

    need("transformers", "edit", "the tiny Stable Diffusion model")
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(block_out_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_heads,  # diffusers' SD naming: this is the number of heads
        norm_num_groups=min(32, min(block_out_channels)),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    )
    tokenizer = tiny_clip_tokenizer() if with_tokenizer else None
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer) if tokenizer is not None else 1000,
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Stable Diffusion 1.x's DDIM settings.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32 or device is not None:
        pipe = pipe.to(device=device, dtype=dtype)
    return pipe
