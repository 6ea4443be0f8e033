"""A preallocated key/value cache for decoder language models.

Our design (not a port): one (B, Hkv, max_len, Dh) tensor per layer for keys and one for values,
allocated once; `update` writes new keys/values in place and returns views of the filled prefix, so
decoding never reallocates or concatenates (transformers' `DynamicCache` concatenates every step).
Each layer tracks its own length: in-LLM token pruning (FastV and kin) will leave later layers with
fewer cached tokens than earlier ones, and the cache must not assume they are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


class KVCache:
    """Per-layer K/V buffers of shape (B, Hkv, max_len, Dh) plus per-layer filled lengths."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_len = max_len

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def seq_len(self, layer: int = 0) -> int:
        """Number of cached positions in `layer` (layer 0 by default, as transformers' caches do)."""
        return self.lengths[layer]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, Hkv, T, Dh) to `layer`; return all keys/values so far, (B, Hkv, S, Dh) views."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise InputError(f"KV cache is full: layer {layer} holds {start} of {self.max_len} positions and "
                             f"{k.shape[2]} more were added; allocate a larger cache (new_cache(max_len=...))")
        kbuf, vbuf = self.keys[layer], self.values[layer]
        kbuf[:, :, start:end].copy_(k)
        vbuf[:, :, start:end].copy_(v)
        self.lengths[layer] = end
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only cached positions `index` (B, S') of `layer`, in that order (KV eviction, pruning)."""
        end = self.lengths[layer]
        idx = index[:, None, :, None].expand(-1, self.keys[layer].shape[1], -1, self.keys[layer].shape[-1])
        for buf in (self.keys[layer], self.values[layer]):
            kept = buf[:, :, :end].gather(2, idx)  # (B, Hkv, S', Dh), a copy
            buf[:, :, : kept.shape[2]].copy_(kept)
        self.lengths[layer] = index.shape[1]

    def reset(self) -> None:
        """Forget all cached positions (buffers are kept for reuse)."""
        self.lengths = [0] * self.num_layers
