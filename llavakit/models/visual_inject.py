"""Visual re-injection: the LM's input visual tokens added back into its residual stream at deeper layers.

Why (measured on the default model, docs/default-model-training.md): a linear probe reads an object's
colour from its centre patch's LM input at 84 %, but from the same position's hidden state at 58 % by
layer 21, the layer whose attention picks out the object a world question asks about. The answer
token finds the right object and reads a state in which its colour has faded.

Related work: DeepStack (Meng et al. 2024, "DeepStack: Deeply Stacking Visual Tokens is Surprisingly
Simple and Effective for LMMs") adds visual tokens into the residual stream of several early LM
layers. Our choices, not DeepStack's:
- the *same* tokens (the projector's output as it entered the LM) are re-added, not extra high-res tokens;
- each chosen layer has its own low-rank map D -> r -> D, with the up-projection zero-initialised,
  so a model with the branch computes exactly what it did without it until the branch is trained;
- the layers and the rank are a recipe choice (`visual_inject`, `visual_inject_rank`).

Only the prompt pass (prefill, or a full recompute) is touched: decode steps carry text tokens only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import InputError


class VisualInjection(nn.Module):
    """Per-layer low-rank maps of the LM's input visual tokens, added at those layers' inputs."""

    def __init__(self, hidden_size: int, layers: Sequence[int], rank: int) -> None:
        super().__init__()
        layers = tuple(int(l) for l in layers)
        if not layers or len(set(layers)) != len(layers) or min(layers) < 1:
            raise InputError(f"visual_inject layers must be distinct layer indices >= 1, got {list(layers)}")
        if rank < 1:
            raise InputError(f"visual_inject rank must be >= 1, got {rank}")
        self.layers = layers
        self.down = nn.ModuleDict({str(l): nn.Linear(hidden_size, rank, bias=False) for l in layers})
        self.up = nn.ModuleDict({str(l): nn.Linear(rank, hidden_size, bias=False) for l in layers})
        for l in layers:
            nn.init.normal_(self.down[str(l)].weight, std=hidden_size ** -0.5)
            nn.init.zeros_(self.up[str(l)].weight)

    def bind(self, embeds: Tensor, visual: Tensor) -> "BoundInjection":
        """embeds (B, T, D): the LM input; visual (B, T) bool: its visual positions."""
        if visual.shape != embeds.shape[:2]:
            raise InputError(f"visual mask {tuple(visual.shape)} does not match embeddings {tuple(embeds.shape[:2])}")
        return BoundInjection(self, visual.bool(), embeds[visual.bool()])  # (n, D)


class BoundInjection:
    """One prompt's injection: what `LlamaLM.forward(..., inject=...)` calls before each listed layer."""

    def __init__(self, module: VisualInjection, visual: Tensor, tokens: Tensor) -> None:
        self.module = module
        self.layers = frozenset(module.layers)
        self.visual = visual  # (B, T0)
        self.tokens = tokens  # (n, D) the visual tokens as they entered the LM
        self.rows = torch.nonzero(visual, as_tuple=True)  # (n,), (n,): where they sit, found once per prompt

    def __call__(self, h: Tensor, layer: int) -> Tensor:
        """h (B, T, D) entering `layer` (T >= T0: later positions are text) -> h with the visual rows updated."""
        b, t = h.shape[:2]
        t0 = self.visual.shape[1]
        if b != self.visual.shape[0] or t < t0:
            raise InputError(f"visual injection was bound to a prompt of {tuple(self.visual.shape)}, "
                             f"got hidden states {tuple(h.shape[:2])}")
        w_down = self.module.down[str(layer)]
        w_up = self.module.up[str(layer)]
        add = w_up(w_down(self.tokens.to(w_down.weight.dtype)))  # (n, D)
        return h.index_put(self.rows, add.to(h.dtype), accumulate=True)
