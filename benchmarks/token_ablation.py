"""Which visual tokens does a model read its answer from: the object's patches or the rest?

FasterVLM keeps the tokens with the highest [CLS] attention; in easy-vqa's one-shape images those are
the shape's own patches (docs/compression/kept_tokens.png). This script scores easy-vqa, open colour /
shape questions and yes/no questions apart, three ways (ours):

- ``all``: every visual token;
- ``object only``: ``fastervlm:keep=K:pos=original``, the top K by [CLS] attention;
- ``without object``: ``hide-top-cls:drop=K:pos=original``, a stage defined here that drops exactly
  those top-K tokens and keeps the rest.

If "object only" falls and "without object" does not, the model reads the shape's colour and shape
from background tokens (in DINOv2 every patch carries some of the whole image), not from the object's
patches. Same items, prompts and scoring as ``llavakit eval --tasks easyvqa`` (seed 0, greedy).

    python benchmarks/token_ablation.py --limit 400 [--weights RUN/trained.safetensors] \
        --out docs/eval/token-ablation-stageD.json        # ~13 min on 2 cores (bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

def split_scores(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """eval predictions -> accuracy % over all, open (colour / shape) and yes/no questions, with counts
    (the kind from easy-vqa's own `answer_kind`)."""
    from llavakit.data.easyvqa import answer_kind

    groups: dict[str, list[float]] = {"all": [], "open": [], "yes/no": []}
    for p in predictions:
        s = float(p["score"])
        groups["all"].append(s)
        groups["yes/no" if answer_kind(str(p["answer"])) == "yes/no" else "open"].append(s)
    return {k: {"n": len(v), "accuracy": 100.0 * sum(v) / len(v) if v else None} for k, v in groups.items()}


class HideTopCls:
    """Drop the `drop` share of tokens with the highest head-mean [CLS] attention; keep the rest (a probe,
    not a compression method: it keeps what FasterVLM throws away)."""

    kind = "stage"
    needs = frozenset({"cls_attention"})
    kv_safe = True
    batch_safe = True

    def __init__(self, drop: float) -> None:
        if not 0.0 < float(drop) < 1.0:
            raise ValueError(f"hide-top-cls: drop must be in (0, 1), got {drop}")
        self.drop = float(drop)

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return (feature_layer,)

    def num_out(self, num_in: int) -> int:
        return num_in - max(1, round(self.drop * num_in))

    def __call__(self, tokens, positions, ctx):
        from llavakit.compression.base import keep_top_by_patch_score

        score = ctx.cls_attention[ctx.feature_layer].mean(1)  # (N, H, T) -> (N, T)
        return keep_top_by_patch_score(tokens, positions, -score, ctx.grid, self.num_out(tokens.shape[1]))


def _register() -> None:
    from llavakit.compression.base import BUDGET_PARAMS, register

    if "hide-top-cls" not in BUDGET_PARAMS:  # this script's own probe; registered when it runs, not on import
        register("hide-top-cls", budget=None)(lambda **p: HideTopCls(**p))


@torch.inference_mode()
def run(keeps: list[float], limit: int, weights: str | None, batch_size: int) -> dict[str, Any]:
    import llavakit
    from llavakit.eval.harness import evaluate

    _register()
    vlm = llavakit.load("default", dtype=torch.bfloat16, trained=weights or True)
    configs = {"all": None}
    for k in keeps:
        configs[f"object only (top {k:g})"] = f"fastervlm:keep={k:g}:pos=original"
        configs[f"without object (top {k:g} dropped)"] = f"hide-top-cls:drop={k:g}:pos=original"
    out = {}
    for name, spec in configs.items():
        t = time.perf_counter()
        r = evaluate(vlm, ["easyvqa"], limit=limit, compression=spec, batch_size=batch_size, progress=False)
        out[name] = {"spec": spec, **split_scores(r.predictions), "wall_s": round(time.perf_counter() - t, 1)}
        s = out[name]
        print(f"{name:34s} all {s['all']['accuracy']:5.1f}  open {s['open']['accuracy']:5.1f} (n={s['open']['n']})"
              f"  yes/no {s['yes/no']['accuracy']:5.1f} (n={s['yes/no']['n']})", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keeps", default="0.1,0.25", help="shares K of top-[CLS] tokens kept / dropped")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--weights", default=None, help="a run's trained .safetensors (default: the shipped weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    try:
        keeps = [float(x) for x in a.keeps.split(",") if x.strip()]
    except ValueError:
        p.error(f"--keeps must be a comma list of numbers, got {a.keeps!r}")
    if not keeps or not all(0.0 < k < 1.0 for k in keeps):
        p.error(f"--keeps must be shares in (0, 1), got {a.keeps!r}")  # before any model is loaded
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    res = run(keeps, a.limit, a.weights, a.batch_size)
    out = {"command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
           "weights": a.weights or "shipped", "limit": a.limit, "wall_s": round(time.perf_counter() - t, 1),
           "results": res}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
