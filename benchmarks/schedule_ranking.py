"""Which visual tokens should a keep schedule keep? Other ranking signals under the same P-Sigmoid schedule.

A diagnostic for docs/compression/README.md ("Other ranking signals under the same schedule"): under the
P-Sigmoid found on stage I3 (LM prefill FLOPs x0.448) world-position loses 7-9 points, fine-tuned or not,
and other schedule shapes at the same budget lose more (`schedule_shapes.py`). This keeps the schedule
(same tokens per layer) and changes only which tokens go on at each pruning layer:

- `rank=text`: the paper's rule, as `psigmoid` (attention from the text rows of the previous layer,
  averaged over heads, then over text rows);
- `rank=last`: the last prompt position's row only (the one that emits the first answer token);
- `rank=headmax`: the largest head's attention, averaged over text rows;
- `rank=rowmax`: the head-mean attention, its largest text row;
- `anchors=a` (0 <= a <= 1): round(a * k) of the k tokens are spread evenly over the surviving visual
  tokens in raster order, the rest by `rank` (`anchors=1`: a plain spatial subsample, no attention used).

The method `psigmoid_rank` (psigmoid's k / l0 / min_keep plus rank / anchors) is registered by `main` in
this script's process only (a diagnostic, not a compression method of llavakit). It changes inference only:
schedule-aware training (`llavakit/training/schedule_train.py`) ranks by its own masked form of the paper's
rule. Ours, not from the paper.

    python benchmarks/schedule_ranking.py --limit 160 --out docs/compression/schedule-ranking-stageI3
    python benchmarks/schedule_ranking.py --weights RUN/trained.safetensors --configs rank=text,anchors=1 --out DIR

Each configuration is a `llavakit eval` run (report.md, predictions.jsonl) under DIR/<config>; the row /
column split: `python benchmarks/eval_breakdown.py DIR/<config>/predictions.jsonl`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llavakit.compression.base import METHODS, check_params, register
from llavakit.errors import InputError
from llavakit.llm_hooks.schedule import PSigmoid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnostic_evals import run_evals  # noqa: E402

RANKS = ("text", "last", "headmax", "rowmax")
# The P-Sigmoid found on stage I3 (docs/compression/psigmoid-stageI3.json): LM prefill FLOPs x0.448.
I3_K, I3_L0 = 0.09892200218030213, 7.402418687079346
CONFIGS = "rank=text,rank=last,rank=headmax,rank=rowmax,anchors=1,anchors=0.25,anchors=0.5"


class RankedPSigmoid(PSigmoid):
    """P-Sigmoid's schedule with another choice of the tokens kept at each pruning layer (see the module)."""

    name = "psigmoid_rank"

    def __init__(self, rank: str = "text", anchors: float = 0.0, **params: Any) -> None:
        super().__init__(**params)
        if rank not in RANKS:
            raise InputError(f"psigmoid_rank: rank must be one of {', '.join(RANKS)}, got {rank!r}")
        if isinstance(anchors, bool) or not isinstance(anchors, (int, float)) or not 0 <= anchors <= 1:
            raise InputError(f"psigmoid_rank: anchors must be a share in [0, 1], got {anchors!r}")
        self.rank, self.anchors = rank, float(anchors)

    def select(self, att: Tensor, visual: Tensor, k: int) -> Tensor:
        """`att` (H, R, T), `visual` (T,) bool -> the (k,) kept positions: anchors first, then by score."""
        if self.rank == "text":
            score = att.mean(0).mean(0)  # (T,)
        elif self.rank == "last":
            score = att[:, -1].mean(0)  # (T,): the last prompt position's row
        elif self.rank == "headmax":
            score = att.amax(0).mean(0)  # (T,)
        else:  # rowmax
            score = att.mean(0).amax(0)  # (T,)
        score = score.float().masked_fill(~visual, float("-inf"))
        n_anchor = min(k, round(self.anchors * k))
        if n_anchor:
            vidx = visual.nonzero().squeeze(1)  # (n,) surviving visual positions, raster order
            spread = torch.linspace(0, len(vidx) - 1, n_anchor).round().long()  # (n_anchor,)
            score[vidx[spread]] = float("inf")  # anchors always win
        return torch.sort(score, descending=True, stable=True).indices[:k]


def _build(**params: Any) -> RankedPSigmoid:
    check_params("psigmoid_rank", params, ("k", "l0", "min_keep", "rank", "anchors"))
    return RankedPSigmoid(**params)


def register_ranked() -> None:
    """Register `psigmoid_rank` in this process (once); never on import, so importing this module (its unit
    test does) leaves llavakit's registry, and the contract tests over it, unchanged."""
    if "psigmoid_rank" not in METHODS:
        register("psigmoid_rank", budget=None)(_build)


def parse_configs(text: str) -> list[str]:
    """"rank=text,anchors=0.5" -> ["rank=text", "anchors=0.5"], each checked (a clear error otherwise)."""
    out = []
    for c in (x.strip() for x in text.split(",")):
        key, _, value = c.partition("=")
        if key == "rank" and value in RANKS:
            out.append(c)
            continue
        if key == "anchors":
            try:
                a = float(value)
            except ValueError:
                a = math.nan
            if 0 <= a <= 1:
                out.append(c)
                continue
        raise InputError(f"--configs: each entry is rank=<{'|'.join(RANKS)}> or anchors=<share in [0, 1]>, "
                         f"got {c!r}")
    if not out:
        raise InputError("--configs names no configuration")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=float, default=I3_K, help="P-Sigmoid steepness (default: the stage-I3 search's)")
    p.add_argument("--l0", type=float, default=I3_L0, help="P-Sigmoid midpoint (default: the stage-I3 search's)")
    p.add_argument("--configs", default=CONFIGS, help="comma-separated rank=... / anchors=...; one eval each")
    p.add_argument("--tasks", default="world-position,world-count")
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        configs = parse_configs(a.configs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    register_ranked()
    return run_evals([(f"psigmoid_rank:k={a.k}:l0={a.l0}:{c}", f"{a.out}/{c.replace('=', '-')}") for c in configs],
                     a.tasks, a.limit, a.weights)

if __name__ == "__main__":
    sys.exit(main())
