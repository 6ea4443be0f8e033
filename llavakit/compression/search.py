"""Offline search of a layer-wise keep schedule on a calibration split: G-Search and P-Sigmoid.

Paper: "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction"
(techniques.md section 4) [abstract-level: no public code]. The schedules run as the `gsearch` and
`psigmoid` LM hooks (`llavakit.llm_hooks.schedule`).

    python -m llavakit.compression.search --model default --task easyvqa --limit 64 --out schedule.json
    python -m llavakit.compression.search --model default --task world-colour --limit 64 \
        --out psig.json --psigmoid --budget 0.5 --trials 30
    vlm.chat(q, image, compression="gsearch:file=schedule.json")

- `greedy_search`: G-Search. r_0 = 1; for l = 1..L-1, r_l starts at r_{l-1} and is lowered along the
  grid while the calibration metric stays >= baseline - eps.
- `fit_psigmoid`: P-Sigmoid. r(l) = 1/(1+exp(k(l-l0))); (k, l0) by Bayesian optimisation (optuna TPE,
  seeded) maximising calibration accuracy subject to prefill FLOPs <= budget, started from the
  least-squares sigmoid fit of the G-Search curve (`fit_sigmoid_curve`).
- `calibration_items`: TRAIN data only (easy-vqa's train split; the synthetic world's train scene half);
  `calibration_evaluator`: schedule -> exact-match accuracy via `vlm.chat_batch(compression=...)`.
- `save_schedule` / `load_schedule`: the JSON `gsearch:file=...` reads (written atomically).

Our choices: while layer l is searched, deeper layers keep r_l (the schedule padded with its last value),
so every evaluation is of a complete, valid schedule; evaluations are memoised by schedule; P-Sigmoid
trials over the FLOPs budget are not evaluated and score -1 - overshoot (below any accuracy, worse the
further out); the FLOPs budget is relative to the uncompressed prefill of the LM layers (vision tower,
projector and lm_head are unchanged by these hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..fileio import atomic_write_text
from ..llm_hooks.schedule import PSigmoid, check_schedule, keep_count, read_schedule

GRID = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05)
Evaluate = Callable[[Sequence[float]], float]


# ----------------------------------------------------------------------------- G-Search
def greedy_search(evaluate: Evaluate, num_layers: int, grid: Sequence[float] = GRID, eps: float = 0.01,
                  baseline: float | None = None, log: Callable[[str], None] | None = None) -> list[float]:
    """G-Search: the per-layer keep ratios (length `num_layers`, r_0 = 1, non-increasing).

    `evaluate(schedule) -> accuracy` on the calibration set; `baseline` defaults to evaluate([1] * L).
    Layer l tries the grid values below r_{l-1} from the highest down, keeping the last one that scores
    >= baseline - eps, and stops at the first that does not. Evaluations: every accepted step moves down
    the grid for good and every layer fails at most once, so at most 1 + (L - 1) + (len(grid) - 1),
    fewer once r reaches the bottom of the grid (no more candidates) — linear in depth, not
    L x len(grid).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise InputError(f"num_layers must be a positive integer, got {num_layers!r}")
    for g in grid:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < float(g) <= 1:
            raise InputError(f"grid values must be ratios in (0, 1], got {g!r} in {list(grid)}")
    levels = sorted({float(g) for g in grid} | {1.0}, reverse=True)
    memo: dict[tuple[float, ...], float] = {}

    def score(schedule: list[float]) -> float:
        key = tuple(schedule)
        if key not in memo:
            memo[key] = float(evaluate(list(schedule)))
            if log:
                log(f"eval {len(memo)}: {_fmt(schedule)} -> {memo[key]:.4f}")
        return memo[key]

    base = score([1.0] * num_layers) if baseline is None else float(baseline)
    floor = base - float(eps)
    ratios = [1.0]
    for l in range(1, num_layers):
        r = ratios[-1]
        for g in (x for x in levels if x < ratios[-1]):
            if score(ratios + [g] * (num_layers - l)) < floor:
                break
            r = g
        ratios.append(r)
    if log:
        log(f"G-Search: {len(memo)} evaluations, baseline {base:.4f}, schedule {_fmt(ratios)}")
    return ratios


# ----------------------------------------------------------------------------- P-Sigmoid
def fit_sigmoid_curve(ratios: Sequence[float]) -> tuple[float, float]:
    """Least-squares (k, l0) of r(l) = 1/(1+exp(k(l-l0))) to ratios[1:] (a G-Search curve); a coarse
    grid (k log-spaced in [0.01, 10], l0 in [0, L + 2]) then a finer one around the best point."""
    r = np.asarray(check_schedule("fit_sigmoid_curve", ratios), dtype=np.float64)
    n = len(r)
    layers = np.arange(1, n, dtype=np.float64)
    target = r[1:]
    if not len(target):
        return 0.5, n / 2

    def best(ks: np.ndarray, l0s: np.ndarray) -> tuple[float, float]:
        z = np.clip(ks[:, None, None] * (layers[None, None, :] - l0s[None, :, None]), -700, 700)
        err = ((1 / (1 + np.exp(z)) - target) ** 2).sum(-1)  # (K, L0)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return float(ks[i]), float(l0s[j])

    k, l0 = best(np.logspace(-2, 1, 61), np.linspace(0, n + 2, 8 * (n + 2) + 1))
    k, l0 = best(k * np.logspace(-0.05, 0.05, 21), l0 + np.linspace(-0.125, 0.125, 21))
    return k, l0


def fit_psigmoid(evaluate: Evaluate, num_layers: int, flops_fn: Callable[[Sequence[float]], float],
                 budget: float, n_trials: int = 30, init: tuple[float, float] | None = None, seed: int = 0,
                 k_range: tuple[float, float] = (0.01, 5.0), l0_range: tuple[float, float] | None = None,
                 min_keep: float = 0.0, log: Callable[[str], None] | None = None) -> tuple[float, float]:
    """P-Sigmoid: (k, l0) maximising `evaluate(ratios)` subject to `flops_fn(ratios) <= budget`.

    optuna's TPE sampler (seeded: same arguments, same trials; constrained TPE with the FLOPs overshoot
    as the constraint; random start-up trials: a third of `n_trials`, at most 10); k log-uniform in
    `k_range`, l0 uniform in `l0_range` (default [0, L]); `init` (e.g. `fit_sigmoid_curve` of the
    G-Search schedule, clipped into the ranges) is the first trial. Infeasible trials are not evaluated
    (score -1 - overshoot). Evaluations: at most `n_trials`.
    Raises InputError when no trial meets the budget.
    """
    try:
        import optuna
    except ImportError:
        raise InputError("P-Sigmoid's search needs optuna: pip install optuna") from None
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InputError(f"n_trials must be a positive integer, got {n_trials!r}")
    lo_l0, hi_l0 = l0_range if l0_range is not None else (0.0, float(num_layers))
    k_lo, k_hi = k_range
    if not 0 < k_lo < k_hi or not lo_l0 < hi_l0:
        raise InputError(f"bad search ranges: k {k_range!r} (0 < lo < hi), l0 {(lo_l0, hi_l0)!r} (lo < hi)")

    new_api = hasattr(optuna.trial.Trial, "set_constraint")

    def objective(trial: Any) -> float:
        k = trial.suggest_float("k", k_lo, k_hi, log=True)
        l0 = trial.suggest_float("l0", lo_l0, hi_l0)
        ratios = PSigmoid(k, l0, min_keep).ratios(num_layers)
        flops = float(flops_fn(ratios))
        trial.set_user_attr("flops", flops)
        trial.set_user_attr("feasible", flops <= budget)
        if new_api:
            trial.set_constraint("prefill_flops", flops - budget)  # <= 0: feasible (optuna >= 5)
        else:
            trial.set_user_attr("constraint", (flops - budget,))
        if flops > budget:
            return -1.0 - (flops - budget)
        acc = float(evaluate(ratios))
        if log:
            log(f"trial {trial.number}: k={k:.4g} l0={l0:.4g} flops={flops:.4g} -> {acc:.4f}")
        return acc

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        old_api = {} if new_api else {"constraints_func": lambda t: t.user_attrs["constraint"]}
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, n_trials // 3)), **old_api)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        if init is not None:
            k0, l00 = init
            study.enqueue_trial({"k": min(max(float(k0), k_lo), k_hi), "l0": min(max(float(l00), lo_l0), hi_l0)})
        study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    feasible = [t for t in study.trials if t.user_attrs.get("feasible") and t.value is not None]
    if not feasible:
        raise InputError(f"no P-Sigmoid trial met the FLOPs budget {budget} in {n_trials} trials; "
                         f"raise the budget or the number of trials")
    best = max(feasible, key=lambda t: (t.value, -t.user_attrs["flops"], -t.number))
    return float(best.params["k"]), float(best.params["l0"])


def prefill_flops_fn(config: Any, num_visual: int, num_text: int) -> Callable[[Sequence[float]], float]:
    """ratios -> LM prefill FLOPs of a schedule relative to no pruning (1.0 = uncompressed), for a prompt
    of `num_visual` visual and `num_text` text tokens (`cost.lm_layer_prefill_flops`, layer by layer)."""
    from ..cost import lm_layer_prefill_flops

    lc = config.lm
    full = lc.num_hidden_layers * lm_layer_prefill_flops(lc, num_visual + num_text)

    def flops(ratios: Sequence[float]) -> float:
        r = list(ratios) + [ratios[-1]] * (lc.num_hidden_layers - len(ratios))
        return sum(lm_layer_prefill_flops(lc, keep_count(x, num_visual) + num_text) for x in r) / full

    return flops


# ----------------------------------------------------------------------------- calibration data
WORLD_KINDS = {"world-colour": "colour", "world-shape": "shape", "world-count": "count",
               "world-position": "position", "world-read": "read"}
_CALIB_TAG = 1 << 21  # entropy word separating calibration generators from the training streams


def calibration_items(task: str, limit: int, seed: int = 0) -> list:
    """`limit` calibration `EvalItem`s of `task` from TRAIN data (never the evaluation split).

    easyvqa: `easyvqa_samples("train")` (seeded shuffle) with the eval task's answer instruction;
    easyvqa-open: the same without yes/no questions (colour and shape only: yes/no answers follow the
    wording, so a schedule that blinds the model can still score on them; our choice).
    world-colour/-shape/-count/-position/-read: scenes from the world's train hash half, each from its
    own generator seeded by (TRAIN_SEED_BASE, tag, task, seed, i), one closed question of the task's kind
    (`language.instructions`; the referring expressions vary more than the eval task's, and answers
    are not balanced). Other world tasks (multiround, report) are not supported yet.
    """
    from ..eval import EvalItem, answer_suffix

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    if task in ("easyvqa", "easyvqa-open"):
        from ..data.easyvqa import answer_kind, easyvqa_samples
        from ..eval.tasks.easyvqa import INSTRUCTION, KIND_CHOICES

        out = []
        for s in easyvqa_samples("train", seed=seed):
            if len(out) == limit:
                break
            question = s.turns[0][1].split("\n", 1)[1]
            answer = s.turns[1][1]
            if task == "easyvqa-open" and answer_kind(answer) == "yes/no":
                continue
            out.append(EvalItem(id=s.id, images=s.images, prompt=answer_suffix(question, INSTRUCTION),
                                answer=answer, choices=tuple(KIND_CHOICES[answer_kind(answer)])))
        return out
    if task not in WORLD_KINDS:
        raise InputError(f"no calibration data for task {task!r}; valid: easyvqa, easyvqa-open, {', '.join(WORLD_KINDS)}")
    from ..data.world import CHOICES, TRAIN_SEED_BASE, instructions, render, sample_scene
    from ..eval.tasks.world import INSTRUCTIONS

    kind = WORLD_KINDS[task]
    out = []
    for i in range(limit):
        rng = np.random.default_rng([TRAIN_SEED_BASE, _CALIB_TAG, list(WORLD_KINDS).index(task), seed, i])
        for _ in range(1000):
            scene = sample_scene(rng, n_objects=(1, 4), words=kind == "read", split="train")
            qa = instructions(scene, rng, 1, kinds=(kind,), follow_ups=False)
            if qa and qa[0][1] in CHOICES[task]:
                break
        else:  # not expected: every kind has a question on most scenes
            raise RuntimeError(f"{task}: no calibration question found for item {i}")
        (question, answer), = qa
        out.append(EvalItem(id=f"calib-{task}-{seed}-{i:05d}", images=(render(scene),),
                            prompt=answer_suffix(question, INSTRUCTIONS[task]), answer=answer,
                            choices=tuple(CHOICES[task])))
    return out


def calibration_set(tasks: str | Sequence[str], limit: int, seed: int = 0) -> list:
    """`calibration_items` of each task (a comma-separated string or a list), `limit` per task, pooled in
    task order: the metric is then accuracy over the pool (our choice: a token-hungry task such as
    world-count beside easy-vqa keeps the search from accepting a schedule only an easy task survives).
    An unknown name is refused by `calibration_items` (before any model is loaded)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise InputError("no calibration task given")
    if len(set(names)) != len(names):
        raise InputError(f"calibration task listed twice: {names}")
    return [it for t in names for it in calibration_items(t, limit, seed)]


def calibration_evaluator(vlm: Any, items: Sequence[Any], batch_size: int = 8, max_new_tokens: int = 8,
                          prefix: str | None = None) -> Evaluate:
    """`evaluate(ratios) -> accuracy`: greedy `vlm.chat_batch(..., compression="gsearch:ratios=...")` on
    `items` (EvalItems, or (question, image, answer[, choices]) tuples), normalised exact match.

    `prefix`: methods to run before the schedule (e.g. an H2 stage "fastervlm:keep=0.5"). An all-ones
    schedule runs without the hook (identical answers, less work).
    """
    from ..eval.scoring import exact_match
    from ..data.images import load_image

    rows = []
    for it in items:
        if isinstance(it, tuple):
            q, img, ans, *rest = it
            rows.append((q, [load_image(img)], ans, tuple(rest[0]) if rest else ()))
        else:
            rows.append((it.prompt, [load_image(x) for x in it.images], it.answer, tuple(it.choices)))
    if not rows:
        raise InputError("calibration needs at least one item")

    def evaluate(ratios: Sequence[float]) -> float:
        sched = check_schedule("calibration schedule", list(ratios))
        parts = [prefix] if prefix else []
        if any(r < 1 for r in sched):
            parts.append(schedule_spec(sched))
        spec = ",".join(parts) or None
        correct = 0.0
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            preds = vlm.chat_batch([r[0] for r in batch], [r[1] for r in batch], compression=spec,
                                   max_new_tokens=max_new_tokens, temperature=0.0)
            correct += sum(exact_match(p, r[2], r[3]) for p, r in zip(preds, batch))
        return correct / len(rows)

    return evaluate


# ----------------------------------------------------------------------------- schedule files
def schedule_spec(ratios: Sequence[float]) -> str:
    """The `gsearch` spec of a schedule: "gsearch:ratios=1.0/1.0/0.5/..." (trailing repeats dropped)."""
    r = list(check_schedule("gsearch", list(ratios)))
    while len(r) > 1 and r[-1] == r[-2]:
        r.pop()
    return "gsearch:ratios=" + "/".join(repr(float(x)) for x in r)


def save_schedule(path: str | os.PathLike, ratios: Sequence[float], **meta: Any) -> Path:
    """Write {"ratios": [...], **meta} as JSON, atomically (temp file in the same folder + os.replace)."""
    p = Path(path)
    data = {"ratios": [float(x) for x in check_schedule("gsearch", list(ratios))], **meta}
    return atomic_write_text(p, json.dumps(data, indent=2) + "\n")


def load_schedule(path: str | os.PathLike) -> list[float]:
    """The ratios of a schedule JSON (validated as `gsearch:file=...` validates them)."""
    return list(read_schedule(str(path)))


def _fmt(ratios: Sequence[float]) -> str:
    return "/".join(f"{x:g}" for x in ratios)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llavakit.compression.search",
                                description="Search a layer-wise visual-token keep schedule (G-Search / P-Sigmoid) "
                                            "on TRAIN calibration data.")
    p.add_argument("--model", default="default", help="model source (\"default\", a directory, a hub id)")
    p.add_argument("--task", default="easyvqa", help=f"calibration task: easyvqa, easyvqa-open, {', '.join(WORLD_KINDS)}; "
                   "several, comma-separated, are pooled (--limit questions of each)")
    p.add_argument("--limit", type=int, default=64, help="calibration questions (per task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="schedule JSON to write (read by gsearch:file=...)")
    p.add_argument("--grid", default=",".join(f"{g:g}" for g in GRID), help="G-Search ratio grid, comma-separated")
    p.add_argument("--eps", type=float, default=0.01, help="accuracy drop allowed below the baseline")
    p.add_argument("--psigmoid", action="store_true", help="then fit P-Sigmoid (k, l0) under --budget")
    p.add_argument("--budget", type=float, default=0.5, help="P-Sigmoid: LM prefill FLOPs relative to uncompressed")
    p.add_argument("--trials", type=int, default=30, help="P-Sigmoid: optuna trials")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..loader import load

    grid = tuple(float(g) for g in str(args.grid).split(",") if g.strip())
    items = calibration_set(args.task, args.limit, args.seed)  # bad task / limit fail before loading
    vlm = load(args.model, dtype=args.dtype, device=args.device)
    L = vlm.config.lm.num_hidden_layers
    evaluate = calibration_evaluator(vlm, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    memo: dict[tuple[float, ...], float] = {}

    def counted(r: Sequence[float]) -> float:  # every schedule is run once
        key = tuple(float(x) for x in r)
        if key not in memo:
            memo[key] = evaluate(key)
        return memo[key]

    baseline = counted([1.0] * L)
    ratios = greedy_search(counted, L, grid=grid, eps=args.eps, baseline=baseline, log=log)
    num_visual = vlm.model.num_image_tokens()
    num_text = _mean_text_tokens(vlm, items, num_visual)
    flops_fn = prefill_flops_fn(vlm.config, num_visual, num_text)
    meta: dict[str, Any] = {"method": "gsearch", "model": str(args.model), "task": args.task, "limit": args.limit,
                            "seed": args.seed, "num_layers": L, "grid": list(grid), "eps": args.eps,
                            "baseline": baseline, "gsearch_ratios": ratios,
                            "gsearch_accuracy": counted(ratios), "gsearch_relative_prefill_flops": flops_fn(ratios),
                            "num_visual": num_visual, "num_text": num_text}
    final = ratios
    if args.psigmoid:
        init = fit_sigmoid_curve(ratios)
        k, l0 = fit_psigmoid(counted, L, flops_fn, args.budget, n_trials=args.trials, init=init, seed=args.seed,
                             log=log)
        final = PSigmoid(k, l0).ratios(L)
        meta.update(method="psigmoid", k=k, l0=l0, init=list(init), budget=args.budget, trials=args.trials,
                    spec=f"psigmoid:k={k!r}:l0={l0!r}")
    else:
        meta["spec"] = schedule_spec(ratios)
    meta.update(accuracy=counted(final), relative_prefill_flops=flops_fn(final), evaluations=len(memo))
    save_schedule(args.out, final, **meta)
    return meta


def _mean_text_tokens(vlm: Any, items: Sequence[Any], num_visual: int, n: int = 16) -> int:
    """Mean non-visual prompt length (chat template included) over the first `n` items."""
    lengths = []
    for it in items[:n]:
        prompt = it.prompt if not isinstance(it, tuple) else it[0]
        text = vlm.build_prompt(prompt, [None])  # one <image> tag, expanded into zero tokens below
        lengths.append(len(vlm.processor.tokenize([text], [0])[0]))
    return max(1, int(round(sum(lengths) / len(lengths))))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("method", "spec", "baseline", "accuracy", "relative_prefill_flops",
                                           "evaluations")}, indent=2))
    print(f"wrote {args.out}; use compression=\"gsearch:file={args.out}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
