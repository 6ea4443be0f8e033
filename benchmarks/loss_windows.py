"""Mean logged training loss over step windows, for one or more runs' loss logs.

A training run logs its loss every `log_every` steps (`loss.jsonl`: the mean over those steps, null when
none was finite). Single entries are noisy at batch 4; docs/compression/README.md ("A third schedule-aware
run") compares runs by the mean of their entries inside a window of steps:

    python benchmarks/loss_windows.py docs/eval/default-psig2-loss.jsonl docs/eval/default-psig3-loss.jsonl \
        --windows 1-100,201-300

Each line: the file, then per window `first-last: mean (entries)`. Ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def parse_windows(text: str) -> list[tuple[int, int]]:
    """"1-100,201-300" -> [(1, 100), (201, 300)] (inclusive step ranges); a clear error otherwise."""
    out = []
    for part in (x.strip() for x in text.split(",")):
        a, sep, b = part.partition("-")
        if not (sep and a.isdigit() and b.isdigit() and int(a) <= int(b)):
            raise ValueError(f"--windows: each window is FIRST-LAST steps with FIRST <= LAST, got {part!r}")
        out.append((int(a), int(b)))
    return out


def window_means(records: Sequence[dict], windows: Sequence[tuple[int, int]]) -> list[tuple[float | None, int]]:
    """(mean loss, entries) of the logged entries whose step lies in each window (None when none is finite)."""
    out = []
    for first, last in windows:
        xs = [r["loss"] for r in records if first <= r["step"] <= last and r.get("loss") is not None]
        out.append((sum(xs) / len(xs) if xs else None, len(xs)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="loss.jsonl files (a run's out_dir/loss.jsonl)")
    p.add_argument("--windows", default="1-100,201-300", help="comma-separated FIRST-LAST step windows")
    a = p.parse_args(argv)
    try:
        windows = parse_windows(a.windows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for log in a.logs:
        try:
            records = [json.loads(x) for x in Path(log).read_text().splitlines() if x.strip()]
        except (OSError, ValueError) as e:
            print(f"error: {log}: not a readable loss log ({e})", file=sys.stderr)
            return 2
        cells = [f"{f}-{l}: {'-' if m is None else f'{m:.3f}'} ({n})" for (f, l), (m, n) in
                 zip(windows, window_means(records, windows))]
        print(f"{log}\t" + "\t".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
