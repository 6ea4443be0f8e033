"""Does the model read an object's column from the tokens at the start (or end) of its row?

A diagnostic for FasterVLM's world-position loss (docs/compression/README.md): with a quarter of the
tokens the shipped model still names an object's row and loses its column, although the kept patches'
own features give the 3x3 cell (docs/eval/feature-probe.json). Our guess: with 1-D position ids over the
raster, the model reads the column against other tokens of the row. This script evaluates world-position
with FasterVLM's top-k tokens by [CLS] attention (`pos=original`) plus one whole patch column always kept:

- `fastervlm_anchor:anchors=left`: the k best tokens outside column 0, plus all of column 0 (k + 16);
- `anchors=right`: the same with the last column;
- `anchors=cls`: FasterVLM's own top-(k + 16), the same number of tokens with no column forced in.

If the left column restores the column answers and the extra top tokens do not, the model reads the
column from the row's start. The method is registered by `main` in this script's process only (a diagnostic, not a
compression method of llavakit: its token count is k + 16, not a budget). Ours, not from a paper.

    python benchmarks/column_anchor.py --count 26 --limit 160 --out docs/compression/column-anchor-stageI3
    python benchmarks/column_anchor.py --weights RUN/trained.safetensors --count 26 --out DIR

Each configuration is a `llavakit eval` run (report.md, predictions.jsonl) under DIR/<anchors>; the row /
column split: `python benchmarks/eval_breakdown.py DIR/<anchors>/predictions.jsonl`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from llavakit.compression.base import (METHODS, StageContext, check_params, keep_top_by_patch_score, register,
                                       resolve_keep)
from llavakit.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnostic_evals import run_evals  # noqa: E402

ANCHORS = ("cls", "left", "right")


class AnchoredFasterVLM:
    """FasterVLM's top-`count` tokens outside one patch column, plus that whole column (anchors=left / right),
    or FasterVLM's top-(count + side) (anchors=cls), on a square side x side grid. It runs as the first stage
    (the full grid)."""

    kind = "stage"
    needs = frozenset({"cls_attention"})
    kv_safe = True
    batch_safe = True

    def __init__(self, count: int, anchors: str = "cls") -> None:
        if anchors not in ANCHORS:
            raise InputError(f"fastervlm_anchor: anchors must be one of {', '.join(ANCHORS)}, got {anchors!r}")
        resolve_keep("fastervlm_anchor", 10**9, None, count)
        self.count, self.anchors = count, anchors

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return (feature_layer,)

    def num_out(self, num_in: int) -> int:
        return min(num_in, self.count + math.isqrt(num_in))  # + one column of the square grid

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        rows, cols = ctx.grid
        if rows != cols or tokens.shape[1] != rows * cols:
            raise InputError(f"fastervlm_anchor needs a full square grid, got {tokens.shape[1]} tokens on a "
                             f"{rows}x{cols} grid")
        score = ctx.cls_attention[ctx.feature_layer].mean(1)  # (N, T) head-mean [CLS] attention
        if self.anchors != "cls":
            col = 0 if self.anchors == "left" else cols - 1
            score = score.masked_fill(positions[..., 1] == col, float("inf"))  # (N, T): the column always wins
        return keep_top_by_patch_score(tokens, positions, score, ctx.grid, self.num_out(tokens.shape[1]))


def _build(**params: Any) -> AnchoredFasterVLM:
    check_params("fastervlm_anchor", params, ("count", "anchors"))
    return AnchoredFasterVLM(**params)


def register_anchor() -> None:
    """Register `fastervlm_anchor` in this process (once); never on import, so importing this module (its
    unit test does) leaves llavakit's registry, and the contract tests over it, unchanged."""
    if "fastervlm_anchor" not in METHODS:
        register("fastervlm_anchor", budget=None)(_build)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=26, help="FasterVLM's own tokens (26 = keep 10 %% of 256)")
    p.add_argument("--anchors", default=",".join(ANCHORS), help="comma-separated: cls (FasterVLM's own "
                   "top-(count + 16)), left / right (top-count + that whole column); one eval each")
    p.add_argument("--tasks", default="world-position")
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    register_anchor()
    return run_evals([(f"fastervlm_anchor:count={a.count}:anchors={anchors}:pos=original", f"{a.out}/{anchors}")
                      for anchors in a.anchors.split(",")], a.tasks, a.limit, a.weights)


if __name__ == "__main__":
    sys.exit(main())
