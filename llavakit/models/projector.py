"""Vision -> language projectors (H3).

`mlp2x_gelu` is LLaVA-1.5's two-layer MLP (Liu et al., "Improved Baselines with Visual Instruction
Tuning", 2023); parameter names `linear_1`/`linear_2` follow transformers' LlavaMultiModalProjector so
HF checkpoints load by name. `linear` is LLaVA-1's single projection (named `linear_1`).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ProjectorConfig

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        if config.kind == "mlp2x_gelu":
            self.act = _ACTS[config.hidden_act]
            self.linear_2 = nn.Linear(config.out_features, config.out_features, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., Dv) -> (..., D)
        x = self.linear_1(x)
        if self.config.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x
