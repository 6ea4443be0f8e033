"""RMSNorm (Zhang & Sennrich 2019), as used by Llama and Qwen2.

Numerics follow transformers' `LlamaRMSNorm`: normalise in fp32, cast back to the input dtype, then
multiply by the weight, so fp16/bf16 outputs match the reference bit for bit in the common case.
The parameter is named `weight` to keep HF state_dict keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        dtype = x.dtype
        h = x.float()  # no-op (no copy) for fp32 inputs
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
