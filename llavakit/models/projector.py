"""Vision -> language projectors (H3).

`mlp2x_gelu` is LLaVA-1.5's two-layer MLP (Liu et al., "Improved Baselines with Visual Instruction
Tuning", 2023); parameter names `linear_1`/`linear_2` follow transformers' LlavaMultiModalProjector so
HF checkpoints load by name. `linear` is LLaVA-1's single projection (named `linear_1`).

Optional local context (ours, `ProjectorConfig.context_kernel > 0`): before the MLP, each patch
feature gains a residual computed from its k x k neighbourhood on the patch grid,
    x' = x + up(GELU(conv_kxk(down(x)))),  down: Dv -> C, conv: C -> C, up: C -> Dv (zero-initialised),
so a model that gains the branch computes exactly what it did before until the branch is trained.
Why: a per-patch MLP cannot tell the LM which colour belongs to which shape when a shape is legible
only at its centre patch (benchmarks/binding_probe.py: one-hop binding of "colour of the triangle"
48-66 % without neighbourhood context, 90 % with a 3x3 conv). Convolutional projectors with local
context are used in the field (Honeybee's C-Abstractor, Cha et al. 2024; LDP in MobileVLM); this
residual form is ours. The branch runs on each view's full patch grid, before any pre-LLM token stage
(`mix`), and HF LLaVA formats cannot hold it (export refuses).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ProjectorConfig
from ..errors import InputError

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class LocalContext(nn.Module):
    """Residual k x k neighbourhood mixing of patch features on their grid (see the module docstring)."""

    def __init__(self, dim: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, channels)
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.up = nn.Linear(channels, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:  # (N, T, Dv) -> (N, T, Dv) residual
        n, t, _ = x.shape
        h, w = grid
        if h * w != t:
            raise InputError(f"projector context needs each view's full patch grid: {t} tokens are not a "
                             f"{h}x{w} grid")
        y = self.down(x).transpose(1, 2).reshape(n, -1, h, w)  # (N, C, h, w)
        y = F.gelu(self.conv(y)).reshape(n, -1, t).transpose(1, 2)  # (N, T, C)
        return self.up(y)


def square_grid(t: int) -> tuple[int, int]:
    s = math.isqrt(t)
    if s * s != t:
        raise InputError(f"projector context: {t} tokens are not a square patch grid; pass the grid")
    return s, s


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        if config.kind == "mlp2x_gelu":
            self.act = _ACTS[config.hidden_act]
            self.linear_2 = nn.Linear(config.out_features, config.out_features, bias=config.bias)
        if config.context_kernel:
            self.context = LocalContext(config.in_features, config.context_channels, config.context_kernel)

    def add_context(self, kernel: int, channels: int) -> None:
        """Add a zero-initialised context branch (outputs unchanged until it is trained or loaded)."""
        import dataclasses

        self.config = dataclasses.replace(self.config, context_kernel=int(kernel), context_channels=int(channels))
        ref = self.linear_1.weight
        self.context = LocalContext(self.config.in_features, int(channels), int(kernel)).to(ref.device, ref.dtype)

    @property
    def has_context(self) -> bool:
        return bool(self.config.context_kernel)

    def mix(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """(N, T, Dv) patch features of full views -> with local context added (identity without it)."""
        if not self.has_context:
            return x
        if x.dim() != 3:
            raise InputError(f"projector context needs (views, tokens, dim) features, got {tuple(x.shape)}")
        return x + self.context(x, grid or square_grid(x.shape[1]))

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None, mixed: bool = False) -> Tensor:
        """(..., Dv) -> (..., D). With context, x must be (N, T, Dv) full views (`grid` defaults to
        square) unless `mixed` says `mix` already ran (a pre-LLM stage may have dropped tokens since)."""
        if not mixed:
            x = self.mix(x, grid)
        x = self.linear_1(x)
        if self.config.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x
