"""Run `llavakit eval` once per compression spec, each into its own folder: the loop of the diagnostic
scripts (`column_anchor.py`, `schedule_ranking.py`) that register a method in their own process first."""

from __future__ import annotations

from typing import Sequence


def run_evals(runs: Sequence[tuple[str, str]], tasks: str, limit: int, weights: str | None = None) -> int:
    """`runs`: (compression spec, output folder) pairs, evaluated in order on the default model in bf16
    (report.md, predictions.jsonl under each folder); stops at the first non-zero exit code and returns it."""
    from llavakit.cli import main as cli

    for spec, out in runs:
        args = ["eval", "--model", "default", "--dtype", "bfloat16", "--no-progress", "--tasks", tasks,
                "--limit", str(limit), "--compression", spec, "--out", out]
        if weights:
            args += ["--weights", weights]
        rc = cli(args)
        if rc:
            return rc
    return 0
