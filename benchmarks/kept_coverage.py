"""Does a pruning method keep the object a world question asks about, and is the answer right when it does?

FasterVLM keeps the top tokens by the vision tower's [CLS] attention. On the world tasks it keeps colour
and shape but loses count and position (docs/compression/README.md). Two causes can be told apart:

- the information is gone: an asked object has no kept patch (for world-count every object is asked:
  a count cannot be read if one object is pruned away);
- the model does not use what is kept: every asked object keeps a patch, and the answer is still wrong.

For each world item (the same items, seed and order as `llavakit eval` and `benchmarks/compression.py`)
and each spec, `llavakit.eval.kept_tokens.kept_mask` gives the kept patches; an object's patches are
those its box overlaps on the tower's grid. The script reports per task and spec: the share of items
whose asked objects all keep >= 1 patch ("covered"), the mean share of the asked objects' patches kept,
and, joined on item id with a grid's `grid_predictions.jsonl`, the accuracy on covered and on uncovered
items. Which object an item asks about is read back from the scene (colour: the object of the answer's
colour whose shape the question names; shape: the converse; position: the object in the answer's cell
whose colour or shape the question names); ours, not from a paper.

    python benchmarks/kept_coverage.py --methods fastervlm:pos=original --keeps 0.25,0.1,0.05 --limit 160 \
        --predictions docs/compression/stageI3-world/grid_predictions.jsonl \
        --out docs/compression/stageI3-world/coverage.json     # vision only; 7 min at 1 thread beside a training run

In-LLM methods (e.g. `fastv:layer=2`) need one LM prefill per item and prompt (kept_mask's rule: a token
counts as kept when it reaches the last layer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from visual_depth_probe import patches_of  # noqa: E402  (an object's patches, the probe's own rule)

TASKS = ("world-colour", "world-shape", "world-count", "world-position")


def asked_objects(task: str, item: Any) -> list[Any]:
    """The objects whose patches the answer needs (see the module docstring)."""
    scene, q, ans = item.scene, item.question.lower(), str(item.answer).lower()
    if task == "world-count":
        return list(scene.objects)
    if task == "world-colour":
        found = [o for o in scene.objects if o.colour == ans and o.shape in q]
    elif task == "world-shape":
        found = [o for o in scene.objects if o.shape == ans and o.colour in q]
    elif task == "world-position":
        found = [o for o in scene.objects if scene.position(o) == ans and (o.colour in q or o.shape in q)]
    else:
        raise ValueError(f"kept_coverage: no rule for {task!r}; valid: {', '.join(TASKS)}")
    if not found:
        raise ValueError(f"{item.id}: no object matches the answer {ans!r} in {q!r}")
    return found


def coverage(mask: torch.Tensor, objects: Iterable[Any], canvas: int, font_px: float) -> tuple[bool, float]:
    """(every object keeps >= 1 patch, mean share of each object's patches kept) for a square (side, side)
    kept mask over the tower's patch grid."""
    side = mask.shape[0]
    if mask.shape != (side, side):
        raise ValueError(f"kept_coverage needs a square patch grid, got {tuple(mask.shape)}")
    flat = mask.flatten()  # (side * side,) raster order, as patches_of counts
    shares = []
    for o in objects:
        cells = patches_of(o.box(font_px), canvas, side)
        shares.append(float(flat[cells].float().mean()))
    return all(s > 0 for s in shares), sum(shares) / len(shares)


def summarise(rows: list[dict[str, Any]], scores: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Per (config, task): n, covered %, mean object share kept %, accuracy % on covered / uncovered items."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["config"], r["task"])].append(r)
    out = {}
    for (cfg, task), rs in groups.items():
        cov = [r for r in rs if r["covered"]]
        unc = [r for r in rs if not r["covered"]]

        def acc(sub: list[dict[str, Any]]) -> float | None:
            s = [scores[(cfg, r["id"])] for r in sub if (cfg, r["id"]) in scores]
            return round(100.0 * sum(s) / len(s), 1) if s else None

        out[f"{cfg} | {task}"] = {
            "config": cfg, "task": task, "n": len(rs), "covered_pct": round(100.0 * len(cov) / len(rs), 1),
            "object_share_kept_pct": round(100.0 * sum(r["share"] for r in rs) / len(rs), 1),
            "n_covered": len(cov), "acc_covered": acc(cov), "n_uncovered": len(unc), "acc_uncovered": acc(unc),
            "acc_all": acc(rs)}
    return out


def read_scores(path: str | None) -> dict[tuple[str, str], float]:
    """(config, item id) -> score from a grid_predictions.jsonl (first round only)."""
    if not path:
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        p = json.loads(line)
        if int(p.get("round", 0)) == 0:
            out[(p["config"], p["id"])] = float(p["score"])
    return out


@torch.inference_mode()
def run(methods: list[str], keeps: list[float], tasks: list[str], limit: int, seed: int,
        weights: str | None) -> list[dict[str, Any]]:
    import llavakit
    from llavakit.compression import with_budget
    from llavakit.data.world import eval_items
    from llavakit.eval import answer_suffix
    from llavakit.eval.kept_tokens import kept_mask
    from llavakit.eval.tasks.world import INSTRUCTIONS

    vlm = llavakit.load("default", dtype=torch.bfloat16, trained=weights or True)
    configs = {f"{m}@{k:g}": with_budget(m, k) for m in methods for k in keeps}
    for spec in configs.values():
        vlm.resolve_compression(spec)  # a bad spec fails here, before any item
    rows = []
    for task in tasks:
        for it in eval_items(task, limit, seed):
            image = it.image()
            prompt = answer_suffix(it.question, INSTRUCTIONS[task])  # as WorldTask.items asks it
            objs = asked_objects(task, it)
            for cfg, spec in configs.items():
                mask = kept_mask(vlm, image, spec, prompt=prompt)  # (gh, gw) bool
                covered, share = coverage(mask, objs, it.scene.canvas, it.scene.font_px)
                rows.append({"config": cfg, "task": task, "id": it.id, "objects": len(objs),
                             "covered": covered, "share": share})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="fastervlm:pos=original", help="comma-separated specs without a budget")
    p.add_argument("--keeps", default="0.25,0.1,0.05")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="a run's trained weights (default: the shipped weights)")
    p.add_argument("--predictions", default=None, help="a grid's grid_predictions.jsonl to join accuracies from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    from llavakit.errors import InputError

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try:
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise InputError(f"kept_coverage: unsupported task(s) {bad}; valid: {', '.join(TASKS)}")
        rows = run([m.strip() for m in a.methods.split(",") if m.strip()],
                   [float(k) for k in a.keeps.split(",") if k.strip()], tasks, a.limit, a.seed, a.weights)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarise(rows, read_scores(a.predictions))
    doc = {"command": " ".join(["python", "benchmarks/kept_coverage.py", *(argv if argv is not None else sys.argv[1:])]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.perf_counter() - t0, 1),
           "summary": summary, "items": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("| config | task | n | covered % | object patches kept % | acc covered (n) | acc uncovered (n) |")
    print("|---|---|---|---|---|---|---|")
    for s in summary.values():
        print(f"| {s['config']} | {s['task']} | {s['n']} | {s['covered_pct']} | {s['object_share_kept_pct']} | "
              f"{s['acc_covered']} ({s['n_covered']}) | {s['acc_uncovered']} ({s['n_uncovered']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
