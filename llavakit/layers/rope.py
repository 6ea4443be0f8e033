"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer"), in the "rotate half" layout that
Llama/Qwen2 checkpoints in transformers format use (GPT-NeoX style: dims [0, Dh/2) pair with
[Dh/2, Dh), not interleaved).

Supported `rope_scaling` types (the HF `rope_type` / legacy `type` key):
  - default (no scaling)
  - linear   (position interpolation, Chen et al. 2023): inv_freq / factor
  - llama3   (Llama 3.1 frequency-dependent scaling; formula from transformers
              `modeling_rope_utils._compute_llama3_parameters`)
Everything else (dynamic, yarn, longrope, ...) raises `InputError` rather than silently running
unscaled. Our choice: cos/sin are computed per forward from `position_ids` (no cached table), so
arbitrary and non-monotonic positions (packing, pruning) cost nothing extra.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import InputError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    """The rope type named by an HF-style `rope_scaling` dict (None -> "default")."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None = None,
                  max_position_embeddings: int | None = None) -> Tensor:
    """Inverse frequencies (Dh/2,) in fp32 for the given rope type."""
    kind = rope_type(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise InputError(f"unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv_freq
    try:
        factor = float(rope_scaling["factor"])  # type: ignore[index]
        if kind == "linear":
            return inv_freq / factor
        low = float(rope_scaling["low_freq_factor"])  # type: ignore[index]
        high = float(rope_scaling["high_freq_factor"])  # type: ignore[index]
        old_len = rope_scaling.get("original_max_position_embeddings",  # type: ignore[union-attr]
                                   max_position_embeddings)
        if old_len is None:
            raise KeyError("original_max_position_embeddings")
        old_len = float(old_len)
    except KeyError as e:
        raise InputError(f"rope_scaling of type {kind!r} is missing key {e.args[0]!r}") from None
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. `inv_freq` is a non-persistent buffer (not in state_dict,
    as in transformers). Our choice: it stays fp32 when the model is cast (`.to(torch.bfloat16)`),
    as it is in a transformers model loaded with `from_pretrained(dtype=...)`; a plain `.to()` of a
    transformers model would round it to bf16."""

    def __init__(self, head_dim: int, theta: float = 10000.0, rope_scaling: Mapping[str, Any] | None = None,
                 max_position_embeddings: int | None = None) -> None:
        super().__init__()
        self._args = (head_dim, theta, rope_scaling, max_position_embeddings)
        self.register_buffer("inv_freq", rope_inv_freq(*self._args), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # recompute rather than upcast a rounded copy
            self.inv_freq = rope_inv_freq(*self._args).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin each (B, T, Dh), computed in fp32 then cast to `dtype`."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, Dh)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, Dh); cos, sin (B, T, Dh) -> rotated x (B, H, T, Dh)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh)
    return x * cos + rotate_half(x) * sin


def default_position_ids(attention_mask: Tensor | None, q_len: int, past: int, device: torch.device) -> Tensor:
    """Positions as transformers' generation computes them.

    With a mask (B, S): cumsum(mask) - 1 with padding positions set to 1, last `q_len` columns -> (B, T).
    Without: arange(past, past + q_len) -> (1, T), broadcast over the batch.
    """
    if attention_mask is not None:
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        return pos[:, -q_len:]
    return torch.arange(past, past + q_len, device=device)[None]
