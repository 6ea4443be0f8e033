"""Per-config accuracy split by question kind, from a compression grid's predictions.

Reads `grid_predictions.jsonl` (written by `benchmarks/compression.py` / `llavakit eval --keep`) and
prints, per config, the accuracy on "open" questions (answer not yes/no: easy-vqa's colour and shape
questions) and on yes/no questions. This is the "open acc" column of docs/compression/README.md.

    python benchmarks/grid_by_kind.py docs/compression/grid_predictions.jsonl   # or the grid's directory
    python benchmarks/grid_by_kind.py PREDICTIONS.jsonl --wrong 5   # also each config's 5 commonest wrong open answers
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def by_kind(path: str) -> dict[str, dict[str, tuple[int, float]]]:
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for line in f:
            p = json.loads(line)
            kind = "yes/no" if p["answer"] in ("yes", "no") else "open"
            scores[p["config"]][kind].append(float(p["score"]))
    return {c: {k: (len(v), 100.0 * sum(v) / len(v)) for k, v in ks.items()} for c, ks in scores.items()}


def wrong_open(path: str) -> dict[str, Counter]:
    """config -> Counter of the (normalised) predictions that were wrong on open questions."""
    from llavakit.eval.scoring import normalize

    out: dict[str, Counter] = defaultdict(Counter)
    with open(path) as f:
        for line in f:
            p = json.loads(line)
            if p["answer"] not in ("yes", "no") and float(p["score"]) < 1:
                out[p["config"]][normalize(p["prediction"])] += 1
    return out


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__.strip())
        return 0
    top = 0
    if "--wrong" in args:
        i = args.index("--wrong")
        try:
            top = int(args[i + 1])
        except (IndexError, ValueError):
            print("--wrong needs a number of answers", file=sys.stderr)
            return 2
        del args[i:i + 2]
    path = Path(args[0] if args else "docs/compression/grid_predictions.jsonl")
    if path.is_dir():  # a grid's output directory: its predictions file
        path = path / "grid_predictions.jsonl"
    if not path.is_file():
        print(f"no predictions file {str(path)!r} (give a grid's grid_predictions.jsonl or its directory)",
              file=sys.stderr)
        return 2
    path = str(path)
    wrong = wrong_open(path) if top else {}
    for config, kinds in by_kind(path).items():
        cells = "  ".join(f"{k} {acc:5.1f} % (n={n})" for k, (n, acc) in sorted(kinds.items()))
        print(f"{config:>55}  {cells}")
        if top:
            c = wrong.get(config, Counter())
            print(f"{'wrong open answers':>55}  {sum(c.values())}: " + ", ".join(f"{a} {n}" for a, n in c.most_common(top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
