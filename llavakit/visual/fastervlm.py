"""FasterVLM: [CLS]-attention pruning of visual tokens before the LLM (H1 capture + H2 stage).

Zhang et al. 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (reference code: Theia-4869/FasterVLM, clip_encoder.py / llava_arch.py). The score
of patch j is the [CLS] query's attention to it in the vision layer whose output is the selected
feature layer, averaged over heads; the top-T patches are kept in their original raster order and
only they are projected and fed to the LLM (positions re-indexed, as the reference does).

Parameters: `keep` (ratio in (0, 1]) or `count` (tokens; the paper's 576 -> 144 / 58 / 29).
Our choices: ties break toward the lower index (stable sort) so the selection is deterministic.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..compression.base import StageContext, check_params, keep_top_by_patch_score, register, resolve_keep


class FasterVLM:
    kind = "stage"
    needs = frozenset({"cls_attention"})
    kv_safe = True
    batch_safe = True

    def __init__(self, keep: float | None = None, count: int | None = None) -> None:
        self.keep, self.count = keep, count
        resolve_keep("fastervlm", 10**9 if count is not None else 1, keep, count)  # validate now

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return (feature_layer,)

    def num_out(self, num_in: int) -> int:
        return resolve_keep("fastervlm", num_in, self.keep, self.count)

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        score = ctx.cls_attention[ctx.feature_layer].mean(1)  # (N, H, T) -> (N, T): head-mean [CLS] attention
        return keep_top_by_patch_score(tokens, positions, score, ctx.grid, self.num_out(tokens.shape[1]))


@register("fastervlm", budget="keep")
def _build(**params: Any) -> FasterVLM:
    check_params("fastervlm", params, ("keep", "count"))
    return FasterVLM(**params)
