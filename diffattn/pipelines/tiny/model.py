"""The tiny model's parts besides Diffusers' own transformer: the word-level text encoder, the absolute
position channels the transformer takes as extra input, and the shipped shapes' configs."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import VOCAB

__all__ = ["TinyTextEncoder", "POSITION_CHANNELS", "position_channels", "pixel_to_position",
           "with_position_channels", "TINY_TRANSFORMER_CONFIG", "TINY_SCHEDULER_CONFIG"]

class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Word-level prompt encoder: embedding + bidirectional GRU + projection (+ each word's own embedding).

    Prompts are lower-cased and split into words; words outside ``vocab`` become ``<unk>``; at most
    ``max_length`` words are kept. Like Wan's T5 embeddings, positions past the prompt are zeros, so
    the empty prompt (the unconditional branch) is all zeros.

    Args:
        vocab: the words, ``vocab[0] == "<pad>"`` and ``vocab[1] == "<unk>"``.
        max_length: number of text tokens the transformer sees.
        embed_dim: word embedding width.
        hidden_dim: GRU width per direction.
        out_dim: output width (the transformer's ``text_dim``).
        word_skip: also add a per-word embedding straight to each output position, so every token keeps
            its word's identity however the GRU mixes the sentence (the transformer's cross-attention can
            then find e.g. the direction word by itself).
    """

    @register_to_config
    def __init__(
        self,
        vocab: list[str] = list(VOCAB),
        max_length: int = 16,
        embed_dim: int = 64,
        hidden_dim: int = 64,
        out_dim: int = 64,
        word_skip: bool = False,
    ) -> None:
        super().__init__()
        if list(vocab[:2]) != ["<pad>", "<unk>"]:
            raise ValueError(f"vocab must start with '<pad>', '<unk>', got {list(vocab[:2])}")
        self._index = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), embed_dim, padding_idx=0)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.word = nn.Embedding(len(vocab), out_dim, padding_idx=0) if word_skip else None

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, max_length]`` (int64, 0 = padding) and lengths ``[B]``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
            words = re.findall(r"[a-z]+", prompt.lower())[:length]
            ids[row, : len(words)] = torch.tensor([self._index.get(w, 1) for w in words], dtype=torch.long)
            lengths[row] = len(words)
        return ids, lengths

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, max_length, out_dim]`` for ``ids`` ``[B, max_length]``; zeros past ``lengths``."""
        b, n = ids.shape
        out = torch.zeros(b, n, self.config.out_dim, dtype=self.proj.weight.dtype, device=ids.device)
        keep = lengths > 0
        if keep.any():
            x = self.embed(ids[keep])
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths[keep].cpu(), batch_first=True, enforce_sorted=False
            )
            h, _ = self.rnn(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=n)
            h = self.norm(self.proj(h))
            if self.word is not None:
                h = h + self.word(ids[keep])
            valid = torch.arange(n, device=ids.device)[None, :] < lengths[keep].to(ids.device)[:, None]
            out[keep] = h * valid[..., None]
        return out

    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        ids, lengths = self.tokenize(prompts)
        return self(ids.to(device or self.device), lengths)



POSITION_CHANNELS = 3


def position_channels(
    batch: int, frames: int, height: int, width: int, device=None, origin: torch.Tensor | None = None
) -> torch.Tensor:
    """Absolute position of every pixel, ``[B, 3, F, H, W]``: frame offset from the clip's middle (in units
    of 4 frames), then y and x in [-1, 1].

    Wan's transformer only knows relative positions (RoPE) and its patch embedding has no padding, so on
    its own it cannot tell the centre of the frame from an edge; the tiny model gets these as extra
    input channels (its ``in_channels`` is ``out_channels + 3``). ``origin`` (``[B, 2]``, (y, x) in the
    same units) moves each video's coordinate origin there from the frame centre; training uses it to
    tell the model where a translated scene is centred.
    """
    t = (torch.arange(frames, dtype=torch.float32, device=device) - (frames - 1) / 2) / 4
    y = pixel_to_position(torch.arange(height, dtype=torch.float32, device=device) + 0.5, height)
    x = pixel_to_position(torch.arange(width, dtype=torch.float32, device=device) + 0.5, width)
    grid = torch.stack(torch.meshgrid(t, y, x, indexing="ij"))  # [3, F, H, W]
    grid = grid.unsqueeze(0).expand(batch, -1, -1, -1, -1)
    if origin is None:
        return grid
    if tuple(origin.shape) != (batch, 2):
        raise ValueError(f"origin must have shape ({batch}, 2), got {tuple(origin.shape)}")
    shift = torch.zeros(batch, 3, 1, 1, 1, dtype=grid.dtype, device=grid.device)
    shift[:, 1:] = origin.to(grid).view(batch, 2, 1, 1, 1)
    return grid - shift


def pixel_to_position(coordinate, size: int):
    """The y/x position-channel value at ``coordinate`` pixels (a float or tensor; pixel ``i`` is centred at
    ``i + 0.5``): -1 at the first pixel's centre, 1 at the last one's."""
    return -1 + 2 * (coordinate - 0.5) / (size - 1)


def with_position_channels(
    latents: torch.Tensor, in_channels: int, origin: torch.Tensor | None = None
) -> torch.Tensor:
    """The transformer input: ``latents`` plus :func:`position_channels` when the model takes them."""
    extra = in_channels - latents.shape[1]
    if extra == 0:
        return latents
    if extra != POSITION_CHANNELS:
        raise ValueError(
            f"the transformer takes {in_channels} input channels for {latents.shape[1]} latent channels; "
            f"expected equal counts or {POSITION_CHANNELS} position channels more"
        )
    b, _, f, h, w = latents.shape
    pos = position_channels(b, f, h, w, latents.device, origin=origin)
    return torch.cat([latents, pos.to(latents.dtype)], dim=1)



TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 6,  # 3 colour channels + position_channels()
    "out_channels": 3,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
TINY_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}
