"""Where a model's wrong world answers come from: seeing or binding.

For the world tasks that name one object by one attribute and ask another (world-colour: "what colour
is the triangle?", world-shape: "what shape is the red object?", world-position: "where is the red
triangle?"), every generated answer is put in one of three classes (ours):

- ``ok``: the gold answer;
- ``other``: wrong, but the asked attribute of *another* object in the scene (a binding error: the
  model saw the scene's values and picked the wrong object's);
- ``absent``: wrong and no object in the scene has it (a seeing error, or not an answer at all).

and split by the number of objects in the scene. If one-object scenes are answered right and the
accuracy on n-object scenes is near 1/n, the model sees every value but does not bind it to the object
asked about. Same items, prompts and scoring as ``llavakit eval`` (task seed 0, bf16, greedy): the
answer is read with eval's normalised exact-match rule (`llavakit.eval.scoring.extract_answer`).

    python benchmarks/binding_errors.py --tasks world-colour,world-shape,world-position --limit 180 \
        [--weights RUN/trained.safetensors] --out docs/eval/binding-errors.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

ASKED = {"world-colour": "colour", "world-shape": "shape", "world-position": "position"}


def asked_value(scene: Any, obj: Any, attr: str) -> str:
    return scene.position(obj) if attr == "position" else getattr(obj, attr)


def classify(prediction: str, answer: str, scene: Any, attr: str, choices: Sequence[str]) -> str:
    """"ok", "other" (another object's value of `attr`) or "absent" for one generated answer; the
    answer is the option of `choices` eval's scoring reads from `prediction`."""
    from llavakit.eval.scoring import extract_answer, normalize

    got, gold = extract_answer(prediction, [*choices, answer]), normalize(answer)
    if got == gold:
        return "ok"
    others = {normalize(asked_value(scene, o, attr)) for o in scene.objects} - {gold}
    return "other" if got in others else "absent"


def summarise(rows: list[tuple[str, int]]) -> dict[str, Any]:
    """rows: (class, objects in the scene) per item -> counts, and accuracy + error classes per object count."""
    by_n: dict[int, Counter] = defaultdict(Counter)
    for cls, n in rows:
        by_n[n][cls] += 1
    total = Counter(cls for cls, _ in rows)
    return {
        "n": len(rows), "accuracy": 100.0 * total["ok"] / max(len(rows), 1), "classes": dict(total),
        "by_objects": {str(n): {"n": sum(c.values()), "accuracy": 100.0 * c["ok"] / sum(c.values()),
                                "chance_among_scene_values": 100.0 / n, **dict(c)}
                       for n, c in sorted(by_n.items())},
    }


@torch.inference_mode()
def run(tasks: list[str], limit: int, weights: str | None, batch_size: int) -> dict[str, Any]:
    import llavakit
    from llavakit.data.world import eval_items
    from llavakit.eval.tasks.world import WorldTask

    vlm = llavakit.load("default", dtype=torch.bfloat16, trained=weights or True)
    out = {}
    for task in tasks:
        raw, items = eval_items(task, limit, 0), WorldTask(task).items(limit, 0)
        preds: list[str] = []
        for s in range(0, len(items), batch_size):
            b = items[s:s + batch_size]
            preds += vlm.chat_batch([it.prompt for it in b], [list(it.images) for it in b], max_new_tokens=8)
        rows = [(classify(p, it.answer, w.scene, ASKED[task], it.choices), len(w.scene.objects))
                for w, it, p in zip(raw, items, preds)]
        out[task] = summarise(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="world-colour,world-shape,world-position")
    p.add_argument("--limit", type=int, default=180)
    p.add_argument("--weights", default=None, help="a run's trained .safetensors (default: the shipped weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    tasks = [x for x in a.tasks.split(",") if x]
    bad = [t for t in tasks if t not in ASKED]
    if bad or not tasks:
        p.error(f"unknown task(s) {bad or tasks!r}; valid: {', '.join(ASKED)}")  # before any model is loaded
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    res = run(tasks, a.limit, a.weights, a.batch_size)
    out = {"command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
           "weights": a.weights or "shipped", "limit": a.limit, "wall_s": round(time.perf_counter() - t, 1),
           "results": res}
    for task, r in res.items():
        print(f"{task}: {r['accuracy']:.1f} % of {r['n']}  {r['classes']}")
        for n, c in r["by_objects"].items():
            print(f"  {n} object(s): {c['accuracy']:5.1f} % (n={c['n']}, 1/n = {c['chance_among_scene_values']:.0f} %)"
                  f"  other {c.get('other', 0)}  absent {c.get('absent', 0)}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
