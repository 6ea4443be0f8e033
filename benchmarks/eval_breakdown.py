"""Where an evaluation's answers go wrong, from `llavakit eval`'s predictions.jsonl.

Prints, for the tasks present:
- world-position: the 3x3 grid's row and column accuracy, and the confusion (gold row x predicted cell);
- world-count: accuracy per gold count and the (gold, predicted) pairs of the misses; and, for scenes of
  2+ objects, accuracy with the over- and under-count shares by whether more objects are small or large
  (an answer read from the area the objects cover over-counts large ones and under-counts small ones);
- world-report-simple / -complex: accuracy per corruption (none / insert / remove / substitute) and per
  number of statements in the report;
- easyvqa: accuracy on colour / shape / yes-no questions, with the shuffled-image score when the run
  had `--shuffled-control`, the (gold, predicted) pairs of the colour and shape misses and of the yes/no
  misses, the yes/no accuracy by the colour or shape the question names (`easyvqa_yesno_by_word`), and
  the question-conditional answer prior (`easyvqa_prior`), the blind baseline that control is read against.
These are the breakdown rows of docs/default-model-training.md's stage tables. With `--against`, it
prints instead how many items two runs of the same items answer alike (per task and in all), and per task
the accuracy difference with its 95 % interval over the items drawn (`paired`). `--config LABEL` reads a
compression grid's grid_predictions.jsonl (benchmarks/compression.py), keeping that configuration's rows.

    python benchmarks/eval_breakdown.py docs/eval/default-position2-200-world360/predictions.jsonl
    python benchmarks/eval_breakdown.py docs/eval/default-shipped-check3-world360/predictions.jsonl \
        --against docs/eval/default-check3-300-world360/predictions.jsonl
    python benchmarks/eval_breakdown.py docs/compression/stageI3-world/grid_predictions.jsonl \
        --config fastervlm:pos=original@0.1
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def position(rows: list[dict]) -> dict:
    """Row / column accuracy (% of items) and the confusion Counter[(gold, predicted)] of world-position."""
    from llavakit.data.world.scene import POSITIONS
    from llavakit.eval.scoring import normalize

    items = [r for r in rows if r["task"] == "world-position"]
    cell = {p: (i // 3, i % 3) for i, p in enumerate(POSITIONS)}
    pred = [cell.get(normalize(r["prediction"])) for r in items]
    gold = [cell[r["answer"]] for r in items]
    n = len(items) or 1
    return {"n": len(items),
            "row": 100.0 * sum(p is not None and p[0] == g[0] for p, g in zip(pred, gold)) / n,
            "column": 100.0 * sum(p is not None and p[1] == g[1] for p, g in zip(pred, gold)) / n,
            "confusion": Counter((r["answer"], normalize(r["prediction"])) for r in items)}


def count(rows: list[dict]) -> dict:
    """Accuracy per gold count and the misses Counter[(gold, predicted)] of world-count."""
    from llavakit.eval.scoring import normalize

    per: dict[str, list[float]] = defaultdict(list)
    misses: Counter = Counter()
    for r in rows:
        if r["task"] == "world-count":
            per[r["answer"]].append(float(r["score"]))
            if not r["score"]:
                misses[(r["answer"], normalize(r["prediction"]))] += 1
    return {"per_count": {k: (len(v), 100.0 * sum(v) / len(v)) for k, v in sorted(per.items())}, "misses": misses}


def _item(row: dict):
    """The world item a prediction row was scored on (item ids are TASK-SEED-INDEX)."""
    from llavakit.data.world import eval_item

    task, seed, i = row["id"].rsplit("-", 2)
    return eval_item(task, int(seed), int(i))


def count_by_size(rows: list[dict]) -> dict:
    """{"more small" | "equal" | "more large": (n, acc %, over-count %, under-count %)} over 2+ object scenes."""
    from llavakit.eval.scoring import normalize

    groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in rows:
        if r["task"] != "world-count" or "id" not in r:
            continue
        objects = _item(r).scene.objects
        if len(objects) < 2:
            continue
        large = sum(o.size == "large" for o in objects)
        key = "more small" if 2 * large < len(objects) else "more large" if 2 * large > len(objects) else "equal"
        pred = normalize(r["prediction"])
        diff = int(pred) - int(r["answer"]) if pred.isdigit() else 0
        groups[key].append((float(r["score"]), diff))
    return {k: (len(g), 100.0 * sum(s for s, _ in g) / len(g), 100.0 * sum(d > 0 for _, d in g) / len(g),
                100.0 * sum(d < 0 for _, d in g) / len(g))
            for k in ("more small", "equal", "more large") if (g := groups.get(k))}


def report(rows: list[dict]) -> dict:
    """{task: {"corruption": {label: (n, acc %)}, "statements": {k: (n, acc %)}}} for the report tasks."""
    out: dict[str, dict] = {}
    for r in rows:
        if not r["task"].startswith("world-report-") or "id" not in r:
            continue
        item = _item(r)
        k = item.question.split("Report: ", 1)[1].count(".")
        t = out.setdefault(r["task"], {"corruption": defaultdict(list), "statements": defaultdict(list)})
        t["corruption"][item.detail].append(float(r["score"]))
        t["statements"][k].append(float(r["score"]))
    return {task: {part: {k: (len(v), 100.0 * sum(v) / len(v)) for k, v in sorted(d.items())} for part, d in t.items()}
            for task, t in out.items()}


def easyvqa(rows: list[dict]) -> dict:
    """{kind: (n, acc %, shuffled acc % or None)} for easy-vqa's colour, shape and yes/no questions."""
    from llavakit.data.easyvqa import answer_kind

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["task"] == "easyvqa":
            kind = answer_kind(r["answer"])  # "color" / "shape" / "yes/no"
            groups["colour" if kind == "color" else kind].append(r)
    out = {}
    for kind in ("colour", "shape", "yes/no"):
        g = groups.get(kind, [])
        if g:
            shuffled = [r["score_shuffled"] for r in g if "score_shuffled" in r]
            out[kind] = (len(g), 100.0 * sum(r["score"] for r in g) / len(g),
                         100.0 * sum(shuffled) / len(shuffled) if shuffled else None)
    return out


def easyvqa_misses(rows: list[dict], yes_no: bool = False) -> Counter:
    """Counter[(gold, predicted)] of the easy-vqa colour and shape questions answered wrong (with `yes_no`:
    of the yes/no questions answered wrong, e.g. a "no" bias shows as many ("yes", "no"))."""
    from llavakit.data.easyvqa import answer_kind
    from llavakit.eval.scoring import normalize

    return Counter((r["answer"], normalize(r["prediction"])) for r in rows
                   if r["task"] == "easyvqa" and (answer_kind(r["answer"]) == "yes/no") == yes_no and r["score"] < 1)


def easyvqa_yesno_by_word(rows: list[dict]) -> dict[str, tuple[int, float]]:
    """{colour or shape word: (n, acc %)} of the easy-vqa yes/no questions that name it ("is there a green
    shape?" under "green"); a question naming none is left out. Word order: COLORS, then SHAPES."""
    from llavakit.data.easyvqa import COLORS, SHAPES, answer_kind

    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["task"] == "easyvqa" and answer_kind(r["answer"]) == "yes/no" and "prompt" in r:
            q = r["prompt"].lower()
            word = next((w for w in COLORS + SHAPES if re.search(rf"\b{w}\b", q)), None)
            if word is not None:
                groups[word].append(r["score"])
    return {w: (len(groups[w]), 100.0 * sum(groups[w]) / len(groups[w])) for w in COLORS + SHAPES if groups[w]}


def easyvqa_prior(rows: list[dict], train: list[tuple[str, str]] | None = None) -> tuple[int, float] | None:
    """(n, acc %) of the question-conditional answer prior on the easy-vqa rows: each question answered with
    the most common train-split answer of the same question text (None when no easy-vqa row has a prompt).

    The baseline a blind model that knows the question could reach (easy-vqa's yes/no answers have strong
    per-question base rates: "is there a teal shape?" is "no" for most images); the shuffled-image control
    is read against it, not only against the overall majority answer. `train`: (question, answer) pairs,
    by default easy-vqa's train split. Ours.
    """
    items = [r for r in rows if r["task"] == "easyvqa" and "prompt" in r]
    if not items:
        return None
    if train is None:
        from llavakit.data.easyvqa import _load

        qs, answers, _, _ = _load("train")
        train = list(zip(qs, answers))
    by_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in train:
        by_question[_question(q)][a] += 1
    hits = 0
    for r in items:
        seen = by_question.get(_question(r["prompt"]))
        hits += bool(seen) and seen.most_common(1)[0][0] == r["answer"]
    return len(items), 100.0 * hits / len(items)


def _question(text: str) -> str:
    """An easy-vqa question without the answer instruction the prompt adds ("... shape? Answer with ...")."""
    return text.split("?", 1)[0].strip().lower()


def agreement(rows: list[dict], other: list[dict]) -> dict[str, tuple[int, int]]:
    """{task: (items in both runs, items answered with the same string)}, matched by (id, round): how much
    two runs of the same items differ (the shipped fp16 file against the run's file, say)."""
    theirs = {(r["task"], r["id"], r.get("round", 0)): r["prediction"] for r in other if "id" in r}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        key = (r["task"], r.get("id"), r.get("round", 0))
        if key in theirs:
            out[r["task"]][0] += 1
            out[r["task"]][1] += r["prediction"] == theirs[key]
    return {task: (n, same) for task, (n, same) in sorted(out.items())}


def _item_scores(rows: list[dict]) -> dict[tuple[str, str], float]:
    """{(task, id): item score}, an item's score being the mean over its rounds (as `llavakit eval` scores it)."""
    rounds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if "id" in r and "score" in r:
            rounds[(r["task"], r["id"])].append(float(r["score"]))
    return {k: sum(v) / len(v) for k, v in rounds.items()}


def paired(rows: list[dict], other: list[dict]) -> dict[str, dict]:
    """{task: {n, acc, acc_other, diff, ci95, only, only_other}} over the items both runs scored (matched by id).

    diff is acc - acc_other in points; ci95 the half-width of its 95 % interval from the paired per-item
    differences (normal approximation, 1.96 standard errors: ours, rough when few items differ). It is the
    sampling error of the items drawn, for the same two models; it does not include training variation.
    only / only_other count the items one run gets fully right and the other does not."""
    mine, theirs = _item_scores(rows), _item_scores(other)
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, a in mine.items():
        if key in theirs:
            per[key[0]].append((a, theirs[key]))
    out = {}
    for task, pairs in sorted(per.items()):
        n = len(pairs)
        d = [a - b for a, b in pairs]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        out[task] = {"n": n, "acc": 100.0 * sum(a for a, _ in pairs) / n,
                     "acc_other": 100.0 * sum(b for _, b in pairs) / n, "diff": 100.0 * mean,
                     "ci95": 100.0 * 1.96 * (var / n) ** 0.5,
                     "only": sum(a == 1.0 and b < 1.0 for a, b in pairs),
                     "only_other": sum(b == 1.0 and a < 1.0 for a, b in pairs)}
    return out


def for_config(rows: list[dict], config: str) -> list[dict]:
    """The rows of one configuration of a compression grid's grid_predictions.jsonl (its "config" label,
    e.g. "fastervlm:pos=original@0.1"); a clear error naming the labels present when there is none."""
    mine = [r for r in rows if r.get("config") == config]
    if not mine:
        labels = sorted({str(r["config"]) for r in rows if "config" in r})
        raise SystemExit(f"eval_breakdown: no rows with config {config!r}; "
                         + (f"present: {', '.join(labels)}" if labels else "the file has no config labels"))
    return mine


def one_config(rows: list[dict], path: str) -> list[dict]:
    """`rows` unchanged unless they hold several configurations of a compression grid: those would be
    scored together (the same item id once per configuration), so that is a clear error asking for --config."""
    labels = sorted({str(r["config"]) for r in rows if "config" in r})
    if len(labels) > 1:
        raise SystemExit(f"eval_breakdown: {path} holds {len(labels)} grid configurations "
                         f"({', '.join(labels)}); pick one with --config LABEL")
    return rows


def main(argv: list[str]) -> int:
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    missing = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--config")
               and not Path(a).is_file()]
    if missing:
        print(f"no predictions file {missing[0]!r} (give llavakit eval's predictions.jsonl or a grid's "
              f"grid_predictions.jsonl)", file=sys.stderr)
        return 2
    config = None
    if "--config" in argv:  # a grid's file: keep one configuration's rows (both files with --against)
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print(__doc__)
            return 2
        config = argv[i + 1]
        del argv[i:i + 2]
    if config is None:
        def load(path: str) -> list[dict]:
            return one_config(_rows(path), path)
    else:
        def load(path: str) -> list[dict]:
            return for_config(_rows(path), config)
    if len(argv) == 3 and argv[1] == "--against":
        rows, other = load(argv[0]), load(argv[2])
        pairs = agreement(rows, other)
        for task, (n, same) in pairs.items():
            print(f"{task}: the same answer on {same} of {n} items")
        n, same = sum(n for n, _ in pairs.values()), sum(s for _, s in pairs.values())
        print(f"all: the same answer on {same} of {n} items")
        for task, p in paired(rows, other).items():
            print(f"{task} (n={p['n']}): {p['acc']:.1f} % vs {p['acc_other']:.1f} %, difference "
                  f"{p['diff']:+.1f} +- {p['ci95']:.1f} points (95 %, items drawn); right only in the first "
                  f"{p['only']}, only in the second {p['only_other']}")
        return 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    rows = load(argv[0])
    tasks = {r["task"] for r in rows}
    if "world-position" in tasks:
        p = position(rows)
        print(f"world-position (n={p['n']}): row {p['row']:.1f} %, column {p['column']:.1f} %")
        for (g, pr), k in sorted(p["confusion"].items()):
            if g != pr:
                print(f"  {g!r} -> {pr!r}: {k}")
    if "world-count" in tasks:
        c = count(rows)
        print("world-count: " + ", ".join(f"{k}: {a:.1f} % (n={n})" for k, (n, a) in c["per_count"].items()))
        for (g, pr), k in sorted(c["misses"].items()):
            print(f"  {g} -> {pr}: {k}")
        for key, (n, acc, over, under) in count_by_size(rows).items():
            print(f"  2+ objects, {key} (n={n}): {acc:.1f} %, over-count {over:.1f} %, under-count {under:.1f} %")
    for task, parts in report(rows).items():
        print(f"{task}: " + ", ".join(f"{k}: {a:.1f} % (n={n})" for k, (n, a) in parts["corruption"].items()))
        print("  by statements: " + ", ".join(f"{k}: {a:.1f} % (n={n})" for k, (n, a) in parts["statements"].items()))
    if "easyvqa" in tasks:
        for kind, (n, acc, sh) in easyvqa(rows).items():
            print(f"easyvqa {kind} (n={n}): {acc:.1f} %" + ("" if sh is None else f" (shuffled image {sh:.1f} %)"))
        for (g, pr), k in sorted(easyvqa_misses(rows).items()):
            print(f"  {g!r} -> {pr!r}: {k}")
        if yn := easyvqa_misses(rows, yes_no=True):
            print("easyvqa yes/no misses: " + ", ".join(f"{g!r} -> {pr!r}: {k}" for (g, pr), k in sorted(yn.items())))
        if by_word := easyvqa_yesno_by_word(rows):
            print("easyvqa yes/no by the word asked about: "
                  + ", ".join(f"{w} {a:.1f} % (n={n})" for w, (n, a) in by_word.items()))
        if prior := easyvqa_prior(rows):
            print(f"easyvqa answer prior per question (train split's most common answer; n={prior[0]}): "
                  f"{prior[1]:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
