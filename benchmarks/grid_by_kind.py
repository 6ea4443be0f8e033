"""Per-config accuracy split by question kind, from a compression grid's predictions.

Reads `grid_predictions.jsonl` (written by `benchmarks/compression.py` / `llavakit eval --keep`) and
prints, per config, the accuracy on "open" questions (answer not yes/no: easy-vqa's colour and shape
questions) and on yes/no questions. This is the "open acc" column of docs/compression/README.md.

    python benchmarks/grid_by_kind.py docs/compression/grid_predictions.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def by_kind(path: str) -> dict[str, dict[str, tuple[int, float]]]:
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for line in f:
            p = json.loads(line)
            kind = "yes/no" if p["answer"] in ("yes", "no") else "open"
            scores[p["config"]][kind].append(float(p["score"]))
    return {c: {k: (len(v), 100.0 * sum(v) / len(v)) for k, v in ks.items()} for c, ks in scores.items()}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "docs/compression/grid_predictions.jsonl"
    for config, kinds in by_kind(path).items():
        cells = "  ".join(f"{k} {acc:5.1f} % (n={n})" for k, (n, acc) in sorted(kinds.items()))
        print(f"{config:>55}  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
