"""Training-free KV-cache eviction of visual entries after prefill (H6), attention-scored.

Our training-free stand-in for Dynamic-LLaVA's trained decode-time sparsification (techniques.md
section 5: "decoding with KV cache" keeps fewer vision-context entries from layer 2 on). Instead of a
trained predictor, cached entries are scored the way SnapKV (Li et al. 2024, "SnapKV: LLM Knows What
You are Looking for Before Generation") and H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of LLMs") do: by the attention the prompt pays them. After prefill, in
every layer l >= `start` (default 2, Dynamic-LLaVA's first sparsified layer), only the top `keep`
fraction (default 0.5) of that layer's cached VISUAL entries stays, ranked by the attention the last
prompt token pays them in layer l (mean over heads); text entries always stay.

Our choices: the observation window is the last prompt token only (SnapKV pools a window of the
last prompt tokens; H2O accumulates over all queries); counts round to the nearest integer, at least
one (`resolve_keep`, as FastV/FasterVLM here); `count` gives an absolute number instead. Evicted
entries never come back (decode attends the survivors; prefill itself is unchanged, so the first
generated token is the uncompressed one).

kv_safe is False by nature: eviction acts on the KV cache, so generation without a cache (every step
recomputes the whole sequence) ignores it and can give different tokens from cached generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..compression.base import LayerState, check_params, register, resolve_keep
from ..errors import InputError


class KVEvict:
    kind = "kv"
    needs = frozenset({"attention_rows", "text_query"})
    kv_safe = False  # acts on the cache only: uncached generation ignores it
    batch_safe = True

    def __init__(self, keep: float | None = None, count: int | None = None, start: int = 2) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"kvevict: start must be an integer >= 0 (the first LM layer evicted), got {start!r}")
        self.keep_ratio, self.count, self.start = keep, count, start
        resolve_keep("kvevict", 10**9 if count is not None else 1, keep, count, default=0.5)

    def n_keep(self, num_visual: int) -> int:
        return min(num_visual, resolve_keep("kvevict", max(num_visual, self.count or 1), self.keep_ratio,
                                            self.count, default=0.5))

    def kept_visual(self, layer: int, num_visual: int) -> int:
        """Visual entries of `layer` left after eviction (what `evict` keeps per row)."""
        return num_visual if layer < self.start or not num_visual else self.n_keep(num_visual)

    def evict(self, layer: int, state: LayerState) -> Tensor | None:
        if layer < self.start:
            return None
        vis = state.visual  # (B, S) cached entries of this layer that are visual
        b, s = vis.shape
        n_vis = vis.sum(1).tolist()
        target = [self.kept_visual(layer, int(n)) for n in n_vis]
        if all(k >= n for k, n in zip(target, n_vis)):
            return None
        last = torch.full((b, 1), s - 1, dtype=torch.long, device=vis.device)  # last prompt token (right-aligned)
        att = state.attention_rows(last)[:, :, 0].mean(1)  # (B, S) head-mean attention of the last token
        att = att.masked_fill(~vis, float("-inf"))
        keep = torch.zeros_like(vis)
        for i in range(b):  # rows may hold different numbers of visual entries
            order = torch.sort(att[i].float(), descending=True, stable=True).indices[: target[i]]
            keep[i, order] = True
        return keep


@register("kvevict", budget="keep")
def _build(**params: Any) -> KVEvict:
    check_params("kvevict", params, ("keep", "count", "start"))
    return KVEvict(**params)
