"""Next-token selection: greedy, or temperature / top-k / top-p sampling.

Semantics follow transformers' logits warpers, applied in the same order (temperature, then top-k,
then top-p): top-k keeps the k highest logits (ties at the k-th value kept); top-p keeps the smallest
set of most likely tokens whose cumulative probability reaches `top_p`, always at least one token
(`TopPLogitsWarper`). Randomness comes only from the `torch.Generator` passed in, so a seeded
generator reproduces a run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """logits (B, V): all but the k largest per row set to -inf (k <= 0 or k >= V: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """logits (B, V): keep the smallest most-likely set with cumulative probability >= p (>= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature == 0 means greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    scores = top_p_filter(top_k_filter(scores, top_k), top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
