"""Attention primitives shared by every tower and language model.

All models run attention through `torch.nn.functional.scaled_dot_product_attention` (SDPA). Methods
that need attention weights (FasterVLM's CLS row, FastV's text->image rows, ...) never switch a model
to eager attention: they call `attention_rows`, which recomputes softmax(q_rows K^T * scale + mask)
for the chosen query rows only, from the same q/k the layer used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, Dh) -> (B, Hkv * n_rep, S, Dh) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
         scale: float | None = None) -> Tensor:
    """Scaled dot-product attention.

    q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh) with H a multiple of Hkv (GQA handled here);
    mask: bool (B or 1, 1 or H, T, S), True = attend. Returns (B, H, T, Dh).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attention_rows(q_rows: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Attention probabilities for a few query rows, computed in fp32.

    q_rows: (B, H, R, Dh) — the queries of the rows wanted (already RoPE-rotated where the model uses
    RoPE); k: (B, Hkv, S, Dh); mask: bool broadcastable to (B, H, R, S), True = attend.
    Returns (B, H, R, S), each row summing to 1 (rows with no allowed key are all zeros).
    """
    k = repeat_kv(k, q_rows.shape[1] // k.shape[1])
    scale = q_rows.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale  # (B, H, R, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def causal_padding_mask(attention_mask: Tensor, q_len: int) -> Tensor:
    """Boolean mask (B, 1, T, S) for T new queries over S keys (cached + new), True = attend.

    attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding, covering cached and new
    keys. Query i (absolute key index S - T + i) sees keys j <= its own index that are not padding.
    A padded query row would have no allowed key (NaN in SDPA); it may attend itself instead —
    its output is never used.
    """
    b, s = attention_mask.shape
    device = attention_mask.device
    q_idx = torch.arange(s - q_len, s, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(s, device=device)[None, :]  # (1, S)
    causal = k_idx <= q_idx  # (T, S)
    keep = attention_mask.bool()[:, None, None, :] & causal[None, None]  # (B, 1, T, S)
    return keep | (k_idx == q_idx)[None, None]
