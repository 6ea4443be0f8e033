"""FastV-style text-attention pruning inside the LLM (H5): the baseline FasterVLM argues against.

Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models". After layer K-1, visual tokens are ranked by the attention the last
prompt token pays them in layer K-1 (mean over heads); the top `keep` fraction survives into layers
K.. (hidden states and KV cache), with their original position ids. Defaults K=2, keep=0.5 (FastV's).

Our choices: attention rows are recomputed for the one query row (SDPA never returns them); the
ranking is per row of the batch, so padding never changes a row's choice; `count` is accepted as an
absolute number of visual tokens kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..compression.base import register, LayerState, check_params, resolve_keep
from ..errors import InputError


class FastV:
    kind = "layer"
    needs = frozenset({"attention_rows", "text_query"})
    kv_safe = True
    batch_safe = True

    def __init__(self, layer: int = 2, keep: float | None = None, count: int | None = None) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise InputError(f"fastv: layer must be an integer >= 1 (attention of layer K-1 ranks tokens), got {layer!r}")
        self.layer, self.keep_ratio, self.count = layer, keep, count
        resolve_keep("fastv", 10**9 if count is not None else 1, keep, count, default=0.5)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.layer,)

    def n_keep(self, num_visual: int) -> int:
        return resolve_keep("fastv", num_visual, self.keep_ratio, self.count, default=0.5)

    def visual_schedule(self, num_layers: int, num_visual: int) -> list[int]:
        k = self.n_keep(num_visual) if num_visual else 0
        return [num_visual if l < self.layer else k for l in range(num_layers)]

    def keep(self, state: LayerState) -> Tensor:
        b, t = state.visual.shape
        last = torch.full((b, 1), t - 1, dtype=torch.long, device=state.visual.device)
        att = state.attention_rows(last)[:, :, 0].mean(1)  # (B, T): head-mean attention of the last token
        att = att.masked_fill(~state.visual, float("-inf"))
        keep = torch.zeros_like(state.visual)
        for i in range(b):  # rows may hold different numbers of visual tokens
            n_vis = int(state.visual[i].sum())
            if n_vis == 0:
                continue
            k = self.n_keep(n_vis)
            order = torch.sort(att[i].float(), descending=True, stable=True).indices[:k]
            keep[i, order] = True
        return keep


@register("fastv", budget="keep")
def _build(**params: Any) -> FastV:
    check_params("fastv", params, ("layer", "keep", "count"))
    return FastV(**params)
