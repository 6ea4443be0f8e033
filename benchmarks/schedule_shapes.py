"""Is a keep schedule's accuracy loss its shape or its budget? Probe schedules for that question.

A diagnostic for docs/compression/README.md ("A second schedule-aware run"): under the P-Sigmoid schedule
found on stage I3 (LM prefill FLOPs x0.448) world-position loses 7-9 points, fine-tuned or not. From a
searched P-Sigmoid (k, l0) this prints `gsearch` / `psigmoid` specs to evaluate on the same items:

- `late`: layers 0..W-1 whole (W = --whole, default 4), then the same sigmoid (same k) moved so that the
  schedule keeps the same sum of keep ratios as the searched one (the same mean visual tokens per layer);
- `flat`: r_0 = 1, then one flat ratio with that sum;
- `late-flat`: layers 0..W2-1 whole (W2 = --whole-flat, default 8), then one flat ratio with that sum;
- `budget`: the searched P-Sigmoid's k with l0 moved to the largest value whose LM prefill FLOPs (relative,
  `search.prefill_flops_fn`, the file's num_visual / num_text) stay within --budget.

Ratios are rounded to 4 decimals (trailing repeats dropped) and l0 is found by bisection. Each line gives
the spec, its mean visual tokens per LM layer and its relative LM prefill FLOPs. Ours, not from the paper
(which searches the sigmoid, not these shapes).

    python benchmarks/schedule_shapes.py --schedule docs/compression/psigmoid-stageI3.json --budget 0.5
    llavakit eval --model default --compression SPEC --tasks world-position,world-count --limit 160 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from llavakit.errors import InputError
from llavakit.llm_hooks.schedule import PSigmoid, keep_count


def sigmoid_tail(k: float, l0: float, first: int, num_layers: int) -> list[float]:
    """P-Sigmoid's r(l) = 1 / (1 + exp(k (l - l0))) for l = first .. num_layers - 1 (first >= 1)."""
    return PSigmoid(k, l0).ratios(num_layers)[first:]


def _bisect(f: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The largest x in [lo, hi] with f(x) <= target, for f non-decreasing in x (80 halvings)."""
    if f(lo) > target:
        raise InputError(f"no value in [{lo}, {hi}] reaches {target} (f({lo}) = {f(lo)})")
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= target else (lo, mid)
    return lo


def late_sigmoid(k: float, total: float, whole: int, num_layers: int) -> list[float]:
    """`whole` layers at 1, then the sigmoid (steepness k) whose keep ratios sum to `total` with them."""
    _check(total, whole, num_layers)
    l0 = _bisect(lambda m: sum(sigmoid_tail(k, m, whole, num_layers)), total - whole, -10.0 * num_layers,
                 10.0 * num_layers)
    return [1.0] * whole + sigmoid_tail(k, l0, whole, num_layers)


def late_flat(total: float, whole: int, num_layers: int) -> list[float]:
    """`whole` layers at 1, then one flat ratio; the ratios sum to `total`."""
    _check(total, whole, num_layers)
    return [1.0] * whole + [(total - whole) / (num_layers - whole)] * (num_layers - whole)


def _check(total: float, whole: int, num_layers: int) -> None:
    if not 1 <= whole < num_layers:
        raise InputError(f"whole layers must be in [1, {num_layers - 1}], got {whole}")
    if not whole < total < num_layers:
        raise InputError(f"a schedule keeping {whole} layers whole cannot sum to {total:.3f} "
                         f"over {num_layers} layers")


def psigmoid_at_budget(k: float, num_layers: int, flops_fn: Callable[[Sequence[float]], float],
                       budget: float) -> float:
    """The largest l0 (the sigmoid's midpoint; later = more tokens) with flops_fn(ratios) <= budget."""
    return _bisect(lambda m: flops_fn(PSigmoid(k, m).ratios(num_layers)), budget, -10.0 * num_layers,
                   10.0 * num_layers)


def gsearch_spec(ratios: Sequence[float]) -> str:
    r = [round(float(x), 4) for x in ratios]
    while len(r) > 1 and r[-1] == r[-2]:
        r.pop()
    return "gsearch:ratios=" + "/".join(f"{x:g}" for x in r)


def shapes(k: float, l0: float, num_layers: int, flops_fn: Callable[[Sequence[float]], float] | None,
           budget: float | None, whole: int = 4, whole_flat: int = 8) -> dict[str, str]:
    """name -> spec: the searched schedule and the probes of the module docstring."""
    searched = PSigmoid(k, l0).ratios(num_layers)
    total = sum(searched)
    out = {"searched": f"psigmoid:k={k!r}:l0={l0!r}",
           "late": gsearch_spec(late_sigmoid(k, total, whole, num_layers)),
           "flat": gsearch_spec(late_flat(total, 1, num_layers)),
           "late-flat": gsearch_spec(late_flat(total, whole_flat, num_layers))}
    if budget is not None and flops_fn is not None:
        out["budget"] = f"psigmoid:k={k!r}:l0={psigmoid_at_budget(k, num_layers, flops_fn, budget)!r}"
    return out


def ratios_of(spec: str, num_layers: int) -> list[float]:
    """The per-layer ratios a printed spec gives once parsed as llavakit parses it (so each spec is checked)."""
    from llavakit.compression.pipeline import Compression
    from llavakit.llm_hooks.schedule import GSearch

    plugin = Compression.single(spec, (GSearch, PSigmoid), "schedule", "gsearch / psigmoid", "gsearch:ratios=1/0.5")
    return plugin.ratios(num_layers)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", required=True, help="a P-Sigmoid schedule file (python -m llavakit.compression.search --psigmoid)")
    p.add_argument("--budget", type=float, default=None, help="relative LM prefill FLOPs for the `budget` line")
    p.add_argument("--whole", type=int, default=4)
    p.add_argument("--whole-flat", type=int, default=8)
    p.add_argument("--model", default="default", help="whose LM config counts the FLOPs")
    args = p.parse_args(argv)
    path = Path(args.schedule)
    if not path.is_file():
        raise SystemExit(f"schedule_shapes.py: no schedule file {str(path)!r}")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(f"schedule_shapes.py: {str(path)!r} is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("method") != "psigmoid":
        method = meta.get("method") if isinstance(meta, dict) else None
        raise SystemExit(f"schedule_shapes.py: {str(path)!r} holds a {method!r} schedule, not psigmoid")
    missing = [key for key in ("k", "l0", "num_visual", "num_text") if key not in meta]
    if missing:
        raise SystemExit(f"schedule_shapes.py: {str(path)!r} lacks {', '.join(missing)} (write it with "
                         f"python -m llavakit.compression.search --psigmoid)")
    from llavakit.compression.search import prefill_flops_fn
    from llavakit.hf_format import read_config_json, vlm_config_from_hf
    from llavakit.loader import resolve_source

    try:
        k, l0, nv, nt = float(meta["k"]), float(meta["l0"]), int(meta["num_visual"]), int(meta["num_text"])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"schedule_shapes.py: {str(path)!r}: k / l0 / num_visual / num_text must be numbers "
                         f"({e})") from None
    try:
        config = vlm_config_from_hf(read_config_json(resolve_source(args.model)))  # the config only, no weights
    except InputError as e:
        raise SystemExit(f"schedule_shapes.py: --model {args.model!r}: {e}") from None
    L = config.lm.num_hidden_layers
    flops_fn = prefill_flops_fn(config, nv, nt)
    try:
        specs = shapes(k, l0, L, flops_fn, args.budget, args.whole, args.whole_flat)
    except InputError as e:
        raise SystemExit(f"schedule_shapes.py: {e}") from None
    for name, spec in specs.items():
        r = ratios_of(spec, L)
        tokens = sum(keep_count(x, nv) for x in r) / L
        print(f"{name}\t{tokens:.1f} visual tokens / layer\tLM prefill FLOPs x{flops_fn(r):.4f}\t{spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
