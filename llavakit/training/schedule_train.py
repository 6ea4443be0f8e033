"""Schedule-aware fine-tuning: the LM forward of training with a G-Search / P-Sigmoid keep schedule on.

The schedules (llavakit/llm_hooks/schedule.py; "Accelerating Multimodal Large Language Models by
Searching Optimal Vision Token Reduction", techniques.md section 4) are training-free in the paper.
On our default model (stage I3) the P-Sigmoid schedule at half the LM prefill FLOPs keeps easy-vqa
(-0.5) but loses world count (-10) and position (-7.5) (docs/compression/README.md, "G-Search,
P-Sigmoid and YOPO on stage I3"), and a model fine-tuned for FasterVLM's pre-LLM selection loses the
same under the schedule. This module lets a recipe train with a schedule on
(`prune_schedule: "psigmoid:k=0.0989:l0=7.40"`), as `yopo_train.py` does for YOPO, so the model learns
the network it runs as at inference, where the runner really removes the tokens. Measured (300 steps,
recipes/default-psig.yaml; docs/compression/README.md, "P-Sigmoid fine-tuned"): under that schedule the
tuned model loses at most 0.6 points against I3 uncompressed on easy-vqa, world colour, shape and count, and
8.6 on world position (the column), as under FasterVLM's selection.

Masked form (ours): before every layer l where the schedule's ratio drops, the visual tokens are ranked
by the head- and row-mean attention they received in layer l-1 from the query's text rows, and the
top ceil(r_l N) of the still visible ones stay visible; the others are hidden as keys (never removed)
from layer l on, for the rows of that query. Kept tokens keep their position ids, as at inference.

Which rows rank and which rows lose the hidden keys (a packed training sequence is one image prefix
followed by several conversations, `packing.py`):
- A query's text rows are the prefix's positions after the image's last visual token plus its block's
  positions before the block's first label (at inference: the prompt after the image, up to the
  assistant's turn; the decision is frozen there, as the runner freezes it at the first prefill).
- A sequence with one conversation (or none: a plain prompt) prunes every row, visual ones included:
  that is exactly what inference computes (tests/unit/test_schedule_train.py checks it against the
  runner, logits within 1e-4).
- A sequence with several conversations prunes each block's rows by its own ranking; the shared prefix
  (the visual rows and the text after them) keeps seeing every visual token. This is the approximation
  of packing (ours): at inference the surviving visual tokens also stop seeing the dropped ones, so
  from the second pruned layer on a block's kept visual keys differ slightly from inference's. With
  one pruned layer the packed form is exact too (the test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.dataset import IGNORE_INDEX
from ..layers.attention import attention_rows
from ..llm_hooks.schedule import _LayerSchedule, keep_count
from .yopo_train import _layer


def parse_schedule(spec: str) -> _LayerSchedule:
    """A one-method compression spec naming gsearch or psigmoid -> its hook (a clear error otherwise)."""
    from ..compression import Compression

    return Compression.single(spec, _LayerSchedule, "prune_schedule", "gsearch or psigmoid",
                              "psigmoid:k=0.1:l0=7.4")


def query_groups(block_ids: Tensor, labels: Tensor, visual: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows rank the visual tokens for which query, and which rows each query's choice applies to.

    block_ids (B, T): 0 prefix, b >= 1 conversation b, -1 padding; labels (B, T) (IGNORE_INDEX where no
    target); visual, valid (B, T) bool. Returns weights (B, G, T) float — each query's text rows, each
    1 / their count — and group (B, T) long: the query whose kept set a row sees, -1 for "every visual
    token" (shared prefix rows of a multi-conversation sequence, padding)."""
    b, t = block_ids.shape
    idx = torch.arange(t, device=block_ids.device)
    last_vis = torch.where(visual, idx, -1).amax(1)  # (B,)
    shared = (block_ids == 0) & (idx > last_vis[:, None]) & valid  # (B, T) prompt text after the image
    n_blocks = int(block_ids.max().clamp(min=0))
    g = max(n_blocks, 1)
    w = torch.zeros(b, g, t, device=block_ids.device)
    group = torch.full((b, t), -1, dtype=torch.long, device=block_ids.device)
    labelled = labels != IGNORE_INDEX
    for i in range(b):
        blocks = [int(x) for x in block_ids[i].unique().tolist() if x >= 1]
        for j, blk in enumerate(blocks or [0]):
            rows = shared[i].clone()
            if blk:
                inside = block_ids[i] == blk
                first = torch.where(inside & labelled[i], idx, t).min()
                rows |= inside & (idx < first)
                group[i, inside] = j
            if not bool(rows.any()):  # a prompt ending on a visual token: its last position ranks (as inference)
                rows[int(torch.where(valid[i], idx, -1).max())] = True
            w[i, j] = rows.float() / rows.sum()
        if len(blocks) <= 1:  # one conversation: every real row is that query's
            group[i, valid[i]] = 0
    return w, group


@dataclass(frozen=True)
class ScheduleTraining:
    """The masked forward of one layer schedule (`hook`: a GSearch or PSigmoid)."""

    hook: _LayerSchedule

    def forward(self, lm, emb: Tensor, mask: Tensor, position_ids: Tensor, visual: Tensor, block_ids: Tensor,
                labels: Tensor, valid: Tensor) -> Tensor:
        """emb (B, T, D), mask bool (B, 1, T, T), position_ids (B, T), visual / valid (B, T) bool,
        block_ids / labels (B, T) as `packing.collate_packed` gives them -> hidden after the final norm."""
        layers = lm.layers
        n_layers = len(layers)
        ratios = self.hook.ratios(n_layers)
        prune = set(self.hook.prune_layers(n_layers))
        b, t, _ = emb.shape
        cos, sin = lm.rotary(position_ids, emb.dtype)  # (B, T, Dh)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        weights, group = query_groups(block_ids, labels, visual, valid)  # (B, G, T), (B, T)
        rows, row_w = _ranking_rows(weights)  # (B, R), (B, G, R)
        n_vis = visual.sum(1).tolist()  # N per row: the prompt's visual tokens
        seen = visual[:, None, :].expand(-1, weights.shape[1], -1).clone()  # (B, G, T) visible visual keys
        eye = torch.eye(t, dtype=torch.bool, device=emb.device)
        h, cur, scores = emb, mask, None
        for i, block in enumerate(layers):
            if i in prune and scores is not None:
                seen = _select(scores, seen, [keep_count(ratios[i], n) for n in n_vis])
                cur = _masked(mask, visual, seen, group, eye)
            probe = {} if i + 1 in prune else None
            h = _layer(block, h, cos, sin, cur, visual, None, 1, probe)
            scores = None
            if probe is not None:
                with torch.no_grad():
                    q = probe["q"].gather(2, rows[:, None, :, None].expand(-1, probe["q"].shape[1], -1,
                                                                           probe["q"].shape[-1]))  # (B, H, R, Dh)
                    m = cur.gather(2, rows[:, None, :, None].expand(-1, 1, -1, t))  # (B, 1, R, T)
                    probs = attention_rows(q, probe["k"], m)  # (B, H, R, T) fp32: the ranking rows only
                    scores = torch.einsum("bgr,bhrk->bgk", row_w, probs) / probs.shape[1]  # (B, G, T)
        return lm.model.norm(h)


def _ranking_rows(weights: Tensor) -> tuple[Tensor, Tensor]:
    """weights (B, G, T) -> the positions any query ranks with, (B, R) (right-padded with position 0), and
    the weights at them (B, G, R) (0 on the padding), so attention is recomputed for those rows only."""
    used = weights.sum(1) > 0  # (B, T)
    r = int(used.sum(1).max())
    order = torch.sort(used.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :r]  # (B, R)
    rows = torch.where(used.gather(1, order), order, 0)
    row_w = weights.gather(2, rows[:, None, :].expand(-1, weights.shape[1], -1))
    return rows, row_w * used.gather(1, order)[:, None, :]


def _select(scores: Tensor, seen: Tensor, target: list[int]) -> Tensor:
    """Each query's top `target[row]` visible visual keys by score (stable order, as the inference hook):
    seen (B, G, T) bool -> (B, G, T) bool."""
    s = scores.float().masked_fill(~seen, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, G, T)
    pos = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, pos)  # (B, G, T) each token's place in the order
    k = torch.minimum(torch.tensor(target, device=seen.device)[:, None], seen.sum(-1))  # (B, G)
    return rank < k[..., None]


def _masked(mask: Tensor, visual: Tensor, seen: Tensor, group: Tensor, eye: Tensor) -> Tensor:
    """mask (B, 1, T, T) with each row's hidden visual keys removed (its own key always stays)."""
    rows = seen.gather(1, group.clamp(min=0)[..., None].expand(-1, -1, seen.shape[-1]))  # (B, T, T)
    rows = torch.where((group >= 0)[..., None], rows, torch.ones_like(rows))
    hide = visual[:, None, :] & ~rows & ~eye  # (B, T, T)
    return mask & ~hide[:, None]
