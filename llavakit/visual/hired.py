"""HiRED: attention-guided token dropping with a budget spread over image partitions (H1 capture + H2).

Arif et al. 2024, "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models" (reference code: hasanar1f/HiRED, llava_next/modeling_llava_next.py,
`HiRED_token_selection` / `HiRED_sub_img_budgets`). Scores are the [CLS] query's attention over the
patch tokens, SUMMED over heads. An early vision layer (0) allocates the budget across partitions,
a late layer (22 of CLIP-L's 24) selects tokens inside each partition.

Full algorithm (P partitions of N tokens: 0 = the whole image, 1..P-1 = anyres sub-images), as
`allocate_budget` + `select_partitions`:
    total = int(P*N*rho); full = min(int(total*alpha), N); sub_total = min(total - full, (P-1)*N)
    the whole image keeps its top-`full` tokens by late attention;
    binarise the whole image's top int(N*(1-alpha)) tokens by EARLY attention, count the hits inside
    each sub-image's 2-D region of the whole image's grid; budget_i = int(count_i/sum*sub_total) <= N;
    sub-image i keeps its top-budget_i tokens by its own late attention.
Single-image (fixed-resolution) models: keep the top int(N*rho) tokens by late attention — the stage
`HiRED` registered as "hired" runs this form, since the compression pipeline refuses anyres models
for now. The multi-partition functions are implemented and tested but NOT wired into the anyres
path yet (that needs the pipeline to re-pack views with their newline tokens).

Parameters: `rho` (budget ratio in (0, 1], default 0.2), `alpha` (share of the budget for the whole
image, in [0, 1], default 0.5), `early_layer` (default 0), `late_layer` (default: the tower's
num_layers - 2, i.e. 22 of 24; negative numbers count from the end), `rowmajor` (default false).

Our choices:
- sub-image regions are true 2-D blocks of the whole image's patch grid; the reference reshapes the
  flattened map into (rows, cols, -1), i.e. gives sub-image i the i-th contiguous raster chunk of N/(P-1)
  tokens. `rowmajor=true` reproduces that (chunks via `tensor_split`, so N need not divide evenly);
- budgets use exact integer arithmetic (count_i * sub_total // sum), where the reference's float32
  ratio can round one token down at exact boundaries; when no hit falls in any region (alpha = 1) the
  sub-images get nothing (the reference divides by zero there);
- at least one token is kept in the single-image form; ties break toward the lower index (stable
  sort); kept tokens stay in raster order. `early_layer`, `alpha` and `rowmajor` are validated but only
  the multi-partition form uses them;
- `StageContext` does not carry the tower depth, so a default / negative `late_layer` is resolved in
  `cls_layers` (which the pipeline calls for each request, just before the stages run) and remembered
  for `__call__`; an explicit non-negative `late_layer` needs no such memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..compression.base import (StageContext, check_params, check_ratio, keep_top_by_patch_score, register,
                                topk_in_order)
from ..errors import InputError

Region = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open, in the whole image's patch grid


# ----------------------------------------------------------------------------- the multi-partition algorithm
def tile_regions(grid: tuple[int, int], rows: int, cols: int) -> list[Region]:
    """The 2-D regions of a rows x cols tiling of a `grid` (h, w) patch map, in row-major tile order
    (the order anyres sub-images come in). Tile edges at floor(i*h/rows), floor(j*w/cols)."""
    h, w = grid
    if rows < 1 or cols < 1 or rows > h or cols > w:
        raise InputError(f"hired: cannot tile a {h}x{w} patch grid into {rows}x{cols} sub-images")
    r = [i * h // rows for i in range(rows + 1)]
    c = [j * w // cols for j in range(cols + 1)]
    return [(r[i], r[i + 1], c[j], c[j + 1]) for i in range(rows) for j in range(cols)]


def allocate_budget(early_full: Tensor, grid: tuple[int, int], partitions: Sequence[Region], rho: float,
                    alpha: float, rowmajor: bool = False) -> list[int]:
    """Token budget of each partition -> [full, sub_1, ..., sub_{P-1}] (P = 1 + len(partitions)).

    early_full (N,): the whole image's early-layer [CLS] attention (head-summed), N = h*w of `grid`.
    partitions: each sub-image's 2-D region of the whole image's grid, in sub-image order. With
    `rowmajor` the regions are ignored (only their number counts) and sub-image i gets the i-th
    contiguous chunk of the flattened map, as the reference code does.
    """
    h, w = grid
    n = int(early_full.numel())
    if early_full.dim() != 1 or n != h * w:
        raise InputError(f"hired: early attention of shape {tuple(early_full.shape)} does not match the "
                         f"{h}x{w} patch grid")
    check_ratio("hired", "rho", rho)
    _check_alpha(alpha)
    p = 1 + len(partitions)
    total = int(p * n * rho)
    full = min(int(total * alpha), n)
    sub_total = min(total - full, (p - 1) * n)
    if sub_total <= 0:
        return [full] + [0] * (p - 1)
    hits = torch.zeros(n, dtype=torch.bool)
    top = int(n * (1 - alpha))
    hits[topk_in_order(early_full.detach().float().cpu(), top)] = True  # binarised top early attention
    if rowmajor:
        counts = [int(c.sum()) for c in torch.tensor_split(hits, p - 1)]
    else:
        hmap = hits.view(h, w)
        counts = []
        for reg in partitions:
            r0, r1, c0, c1 = (int(x) for x in reg)
            if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
                raise InputError(f"hired: region {tuple(reg)} is not a (row0, row1, col0, col1) block of "
                                 f"the {h}x{w} patch grid")
            counts.append(int(hmap[r0:r1, c0:c1].sum()))
    s = sum(counts)
    if s == 0:
        return [full] + [0] * (p - 1)
    return [full] + [min(c * sub_total // s, n) for c in counts]


def select_partitions(early_full: Tensor, late: Tensor, grid: tuple[int, int], partitions: Sequence[Region],
                      rho: float, alpha: float, rowmajor: bool = False) -> list[Tensor]:
    """Kept token indices of each partition (raster order): late (P, N) head-summed late-layer [CLS]
    attention of [whole image, sub-images...] -> P long tensors of sizes `allocate_budget(...)`."""
    budgets = allocate_budget(early_full, grid, partitions, rho, alpha, rowmajor)
    if late.dim() != 2 or late.shape[0] != len(budgets):
        raise InputError(f"hired: late attention of shape {tuple(late.shape)}; expected ({len(budgets)}, N)")
    return [topk_in_order(late[i], b) for i, b in enumerate(budgets)]


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= float(alpha) <= 1:
        raise InputError(f"hired: alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_layer(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"hired: {key} must be an integer vision layer number, got {value!r}")
    return value


# ----------------------------------------------------------------------------- the H2 stage (single image)
class HiRED:
    kind = "stage"
    needs = frozenset({"cls_attention"})
    kv_safe = True
    batch_safe = True

    def __init__(self, rho: float = 0.2, alpha: float = 0.5, early_layer: int = 0, late_layer: int | None = None,
                 rowmajor: bool = False) -> None:
        self.rho = check_ratio("hired", "rho", rho)
        self.alpha = _check_alpha(alpha)
        self.early_layer = _check_layer("early_layer", early_layer)
        self.late_layer = _check_layer("late_layer", late_layer)
        if not isinstance(rowmajor, bool):
            raise InputError(f"hired: rowmajor must be true or false, got {rowmajor!r}")
        self.rowmajor = rowmajor

    def _late(self, num_layers: int) -> int:
        late = num_layers - 2 if self.late_layer is None else self.late_layer
        late = late + num_layers if late < 0 else late
        if not 0 <= late < num_layers:
            raise InputError(f"hired: late_layer={self.late_layer} is outside the tower's {num_layers} layers "
                             f"(valid: 0..{num_layers - 1}, or negative from the end)")
        return late

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return (self._late(num_layers),)  # the single-image form reads the late layer only

    def num_out(self, num_in: int) -> int:
        return max(1, int(num_in * self.rho))

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        late = self._late(ctx.num_layers)
        if late not in ctx.cls_attention:
            raise InputError(f"hired: the [CLS] attention of vision layer {late} was not captured "
                             f"(captured: {sorted(ctx.cls_attention)})")
        score = ctx.cls_attention[late].float().sum(1)  # (N, H, T) -> (N, T): head-summed [CLS] attention
        return keep_top_by_patch_score(tokens, positions, score, ctx.grid, self.num_out(tokens.shape[1]))


@register("hired", budget="rho")
def _build(**params: Any) -> HiRED:
    check_params("hired", params, ("rho", "alpha", "early_layer", "late_layer", "rowmajor"))
    return HiRED(**params)
