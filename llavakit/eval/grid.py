"""Budget-matched compression evaluation: every method at every keep ratio, next to the uncompressed model.

    from llavakit.eval.grid import evaluate_grid, write_grid
    grid = evaluate_grid(vlm, ["easyvqa", "world-colour"], ["fastervlm", "fastv:layer=2"], [1, 0.5, 0.1], limit=200)
    write_grid(grid, "out/")          # grid.json, grid.md, pareto_tflops.png, pareto_prefill.png, predictions

The grid (`plan_grid`): one uncompressed reference run (compression None) first, then each method spec
(ONE method, possibly with fixed parameters such as `fastv:layer=2`) at every keep ratio, through
`llavakit.compression.with_budget(spec, keep)`; a method without a budget parameter (`BUDGET_PARAMS` is
None) runs once as given. keep = 1 is the method at ratio 1.0 (it still runs, so its overhead shows).
Every spec is parsed and checked against the model (`Compression.check`) before any compute.

Each configuration is one call of the harness (`llavakit.eval.harness.evaluate`, same items, seed,
batch size, greedy); nothing here re-implements generation or scoring. Per (config, task) row:

- accuracy: the harness's (mean over items of the fraction of rounds correct).
- retention: accuracy / the reference's accuracy on the same items, in % (None when the reference scored 0).
- agreement: % of requests whose prediction string equals the reference's prediction for the same
  (item, round) — exact string equality after the harness's strip.
- visual_tokens: image placeholders in the LM input, mean per request. visual_tokens_lm: visual
  positions each LM layer processes in prefill, mean over layers and requests (differs from
  visual_tokens only for in-LLM pruning such as FastV).
- tflops: analytic FLOPs (llavakit.cost: multiply-add = 2 FLOPs) per request, mean, in TFLOPs;
  lm_prefill_tflops: the LM-prefill part of it (all LM layers, prompt positions, lm_head excluded).
  Recomputed per request with `vlm.cost(..., compression=spec)` from the token counts the harness
  recorded (and checked against the harness's own total).
- prefill_s, decode_s_per_token, questions_per_s: the harness's measured timings (prefill_s is the
  time to first token of a batch: preprocessing + vision + projector + LM prefill).
- kv_cache_bytes: `vlm.cost(...).kv_cache_bytes` (fp16, 2 bytes) at the end of generation for a typical
  request of that config and task: the rounded mean text tokens, images and new tokens measured.
  KV-cache eviction policies (H6) are in the count (`Compression.kv_tokens_per_layer`).

The summary (`GridResult.summary`) averages every numeric column over tasks (mean of the per-task
values; n is summed). Our choices: the reference and every config see the same items; configs are
labelled `method@keep` (`none` for the reference).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InputError
from ..fileio import atomic_write_text
from .harness import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, evaluate, resolve_tasks

REFERENCE = "none"
NUMERIC = ("accuracy", "retention", "agreement", "visual_tokens", "visual_tokens_lm", "text_tokens", "new_tokens",
           "tflops", "lm_prefill_tflops", "prefill_s", "decode_s_per_token", "kv_cache_bytes", "questions_per_s")


# ----------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class GridConfig:
    """One run of the grid: `method` as given (no budget) or "none", its keep ratio, the spec evaluated."""

    method: str
    keep: float | None
    spec: str | None

    @property
    def label(self) -> str:
        return self.method if self.keep is None else f"{self.method}@{self.keep:g}"


def parse_keeps(text: str | Sequence[Any]) -> list[float]:
    """"1,0.5,0.1" (or a list of numbers) -> [1.0, 0.5, 0.1]; each must be a ratio in (0, 1]."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    out: list[float] = []
    for p in parts:
        if isinstance(p, str):
            try:
                v = float(p)
            except ValueError:
                raise InputError(f"bad keep ratio {p!r}: keep ratios are numbers in (0, 1], e.g. 1,0.5,0.1") from None
        elif isinstance(p, bool) or not isinstance(p, (int, float)):
            raise InputError(f"bad keep ratio {p!r}: keep ratios are numbers in (0, 1], e.g. 1,0.5,0.1")
        else:
            v = float(p)
        if not (0 < v <= 1) or math.isnan(v):
            raise InputError(f"keep ratio {p!r} is outside (0, 1]: keep is the fraction of visual tokens kept, "
                             f"e.g. 1,0.5,0.25,0.1")
        if v not in out:
            out.append(v)
    if not out:
        raise InputError("give at least one keep ratio in (0, 1], e.g. --keep 1,0.5,0.1")
    return out


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """"fastervlm,fastv:layer=2" (a comma list) or a list of single-method specs -> one canonical spec per
    method; unknown names fail here (listing the valid ones)."""
    from ..compression import METHODS, method_names, parse_spec

    method_names()  # registers every method
    groups = [parse_spec(text)] if isinstance(text, str) else [parse_spec(item) for item in text]
    out: list[str] = []
    for item, parsed in zip([text] if isinstance(text, str) else list(text), groups):
        if not isinstance(text, str) and len(parsed) != 1:
            raise InputError(f"each grid entry is ONE method (e.g. fastv:layer=2), got {item!r}; "
                             f"run a composition without --keep")
        for m in parsed:
            METHODS.get(m.name)  # unknown: InputError listing the valid names
            out.append(str(m))
    if not out:
        raise InputError("give at least one compression method, e.g. --compression fastervlm,fastv:layer=2")
    if len(set(out)) != len(out):
        raise InputError(f"a method is listed twice in {out}")
    return out


def plan_grid(methods: str | Sequence[str], keeps: str | Sequence[Any], model: Any = None) -> list[GridConfig]:
    """The runs of a grid, reference first. With `model` (a LlavaModel), every spec is also checked
    against it (`Compression.check`): all refusals happen here, before any compute."""
    from ..compression import BUDGET_PARAMS, Compression, parse_spec, with_budget

    ratios = parse_keeps(keeps)
    configs = [GridConfig(REFERENCE, None, None)]
    for spec in parse_methods(methods):
        (m,) = parse_spec(spec)
        key = BUDGET_PARAMS.get(m.name)
        if key is None:
            configs.append(GridConfig(spec, None, spec))
            continue
        fixed = [k for k in (key, "count") if k in m.params]
        if fixed:
            raise InputError(f"{spec!r} sets its own budget ({', '.join(fixed)}); the grid sets {m.name}'s {key} "
                             f"from --keep, so give the method without it (e.g. {m.name})")
        configs += [GridConfig(spec, r, with_budget(spec, r)) for r in ratios]
    for c in configs:
        comp = Compression.parse(c.spec)  # parameter errors surface here
        if comp is not None and model is not None:
            comp.check(model)
    return configs


# ----------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class GridRow:
    """One (config, task) row; see the module docstring for each definition. None: not measurable."""

    method: str
    keep: float | None
    spec: str | None
    task: str
    n: int
    n_questions: int
    accuracy: float
    retention: float | None  # % of the reference accuracy
    agreement: float | None  # % of requests with the reference's prediction
    visual_tokens: float
    visual_tokens_lm: float
    text_tokens: float
    new_tokens: float
    tflops: float
    lm_prefill_tflops: float
    prefill_s: float | None
    decode_s_per_token: float | None
    kv_cache_bytes: float
    questions_per_s: float | None
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return GridConfig(self.method, self.keep, self.spec).label

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class GridResult:
    model: str
    created: str
    settings: Mapping[str, Any]
    configs: tuple[GridConfig, ...]
    rows: tuple[GridRow, ...]
    predictions: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict, repr=False)
    kept_tokens_image: Any = field(default=None, repr=False)  # the sample image of the kept-token figure
    kept_tokens_prompt: str | None = None

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.rows))

    def row(self, task: str, method: str, keep: float | None = None) -> GridRow:
        for r in self.rows:
            if r.task == task and r.method == method and r.keep == keep:
                return r
        raise KeyError((task, method, keep))

    def summary(self) -> list[GridRow]:
        """One row per config: numeric columns averaged over tasks (None where no task has a value)."""
        out = []
        for c in self.configs:
            rows = [r for r in self.rows if (r.method, r.keep) == (c.method, c.keep)]
            means: dict[str, Any] = {}
            for k in NUMERIC:
                vals = [getattr(r, k) for r in rows if getattr(r, k) is not None]
                means[k] = sum(vals) / len(vals) if vals else None
            out.append(GridRow(method=c.method, keep=c.keep, spec=c.spec, task="mean",
                               n=sum(r.n for r in rows), n_questions=sum(r.n_questions for r in rows), **means))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "created": self.created, "settings": dict(self.settings),
            "conventions": {
                "retention": "% of the uncompressed accuracy on the same items",
                "agreement": "% of requests whose prediction string equals the uncompressed prediction",
                "visual_tokens": "image placeholders in the LM input, mean per request",
                "visual_tokens_lm": "visual positions per LM layer in prefill, mean over layers and requests",
                "tflops": "analytic (multiply-add = 2 FLOPs, llavakit.cost), mean per request",
                "lm_prefill_tflops": "analytic LM prefill (all layers, lm_head excluded), mean per request",
                "prefill_s": "measured time to first token of a batch (preprocess + vision + LM prefill)",
                "decode_s_per_token": "measured time per decode step of a batch",
                "kv_cache_bytes": "analytic fp16 KV cache at the end of generation, typical request",
                "summary": "mean over tasks of each per-task value",
            },
            "configs": [asdict(c) | {"label": c.label} for c in self.configs],
            "rows": [r.to_dict() for r in self.rows],
            "summary": [r.to_dict() for r in self.summary()],
        }


# ----------------------------------------------------------------------------------------- evaluation

def evaluate_grid(vlm: Any, tasks: Sequence[Any], methods: str | Sequence[str], keeps: str | Sequence[Any], *,
                  limit: int | None = None, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True, warmup: bool = True,
                  out: str | Path | None = None, kept_keep: float | None = None) -> GridResult:
    """Run the grid (see the module docstring) and, with `out`, write it (`write_grid`) there.

    `kept_keep`: the keep ratio of the kept-token figure (default 0.1 when in `keeps`, else the smallest).
    """
    resolved = resolve_tasks(tasks)
    configs = plan_grid(methods, keeps, vlm.model)  # every refusal before any compute
    items = {t.name: t.items(limit, seed) for t in resolved}  # deterministic: the items every run sees
    images = {name: {it.id: len(it.images) for it in its} for name, its in items.items()}
    rows: list[GridRow] = []
    predictions: dict[str, tuple[Mapping[str, Any], ...]] = {}
    reference: dict[tuple, str] = {}
    ref_acc: dict[str, float] = {}
    for c in configs:
        res = evaluate(vlm, resolved, limit=limit, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       compression=c.spec, progress=progress, warmup=warmup)
        predictions[c.label] = tuple(res.predictions)  # visual tokens as the harness counted them
        for r in res.rows:
            preds = [p for p in res.predictions if p["task"] == r.task]
            if c.spec is None:
                reference.update({(p["task"], p["id"], p["round"]): p["prediction"] for p in preds})
                ref_acc[r.task] = r.accuracy
            rows.append(_row(vlm, c, r, preds, images[r.task], reference, ref_acc.get(r.task)))
    ratios = parse_keeps(keeps)
    settings = {"tasks": [t.name for t in resolved], "methods": parse_methods(methods), "keeps": ratios,
                "limit": limit, "seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "greedy": True, "warmup": warmup, "kept_keep": _kept_keep(kept_keep, ratios),
                **{k: v for k, v in res.settings.items() if k in ("torch_threads", "device", "dtype")}}
    first = items[resolved[0].name][0]
    result = GridResult(model=str(getattr(vlm, "source", "") or "model"),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=settings,
                        configs=tuple(configs), rows=tuple(rows), predictions=predictions,
                        kept_tokens_image=first.images[0] if first.images else None,
                        kept_tokens_prompt=(first.rounds[0][0] if first.rounds else first.prompt))
    if out is not None:
        write_grid(result, out, vlm=vlm)
    return result


def _kept_keep(kept_keep: float | None, ratios: Sequence[float]) -> float:
    if kept_keep is not None:
        return parse_keeps([kept_keep])[0]
    return 0.1 if 0.1 in ratios else min(ratios)


def _view(vlm: Any) -> tuple[int, int]:
    side = int(vlm.model.config.input_size)
    return (side, side)  # fixed-resolution models (compression refuses anyres ones)


def _row(vlm: Any, c: GridConfig, r: Any, preds: Sequence[Mapping[str, Any]], images: Mapping[str, int],
         reference: Mapping[tuple, str], ref_accuracy: float | None) -> GridRow:
    from ..compression import Compression

    comp = Compression.parse(c.spec)
    model = vlm.model
    view = _view(vlm)
    notes = list(r.notes)
    costs, vis_lm, n_images = [], [], []
    cache: dict[tuple[int, int, int], tuple[Any, float]] = {}
    visual = []
    for p in preds:
        # the harness counts text and visual tokens from the processor run with this config's compression
        t, v, k, n = int(p["text_tokens"]), int(p["visual_tokens"]), images[p["id"]], int(p["new_tokens"])
        if (t, k, n) not in cache:
            cost = vlm.cost(prompt_tokens=t, new_tokens=n, image_sizes=[view] * k, compression=c.spec)
            lm_vis = v
            if comp is not None and v:
                per_layer = comp.tokens_per_layer(model, v, t)
                lm_vis = sum(x - t for x in per_layer) / len(per_layer)
            cache[(t, k, n)] = (cost, float(lm_vis))
        cost, lm_vis = cache[(t, k, n)]
        if cost.total_flops != p["flops"] and not any(x.startswith("flops recomputed") for x in notes):
            notes.append(f"flops recomputed from token counts differ from the harness's ({cost.total_flops} vs "
                         f"{p['flops']}): the view is not {view}")
        costs.append(cost)
        vis_lm.append(lm_vis)
        visual.append(v)
        n_images.append(k)
    mean = lambda xs: float(sum(xs) / len(xs)) if len(xs) else 0.0  # noqa: E731
    text, new = mean([p["text_tokens"] for p in preds]), mean([p["new_tokens"] for p in preds])
    typical = vlm.cost(prompt_tokens=int(round(text)), new_tokens=int(round(new)),
                       image_sizes=[view] * int(round(mean(n_images))), compression=c.spec)
    agree = [reference.get((p["task"], p["id"], p["round"])) == p["prediction"] for p in preds]
    return GridRow(
        method=c.method, keep=c.keep, spec=c.spec, task=r.task, n=r.n, n_questions=r.n_questions,
        accuracy=r.accuracy,
        retention=100.0 * r.accuracy / ref_accuracy if ref_accuracy else None,
        agreement=100.0 * mean([float(a) for a in agree]) if reference else None,
        visual_tokens=mean(visual), visual_tokens_lm=mean(vis_lm),
        text_tokens=text, new_tokens=new,
        tflops=mean([x.total_flops for x in costs]) / 1e12,
        lm_prefill_tflops=mean([x.lm_prefill_flops for x in costs]) / 1e12,
        prefill_s=r.prefill_s, decode_s_per_token=r.decode_s_per_token,
        kv_cache_bytes=float(typical.kv_cache_bytes), questions_per_s=r.questions_per_s, notes=tuple(notes))


# ----------------------------------------------------------------------------------------- writing

DASH = "—"
HEADER = ["method", "keep", "n", "acc %", "retention %", "agreement %", "vis tok", "vis tok/LM layer", "TFLOPs/q",
          "LM prefill TFLOPs/q", "prefill s", "decode ms/tok", "KV MB", "q/s"]


def _f(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return DASH if x is None else format(x * scale, fmt)


def _cells(r: GridRow) -> list[str]:
    return [r.method, DASH if r.keep is None else f"{r.keep:g}", str(r.n), _f(r.accuracy, ".1f", 100),
            _f(r.retention, ".1f"), _f(r.agreement, ".1f"), _f(r.visual_tokens, ".1f"), _f(r.visual_tokens_lm, ".1f"),
            _f(r.tflops, ".4g"), _f(r.lm_prefill_tflops, ".4g"), _f(r.prefill_s, ".3f"),
            _f(r.decode_s_per_token, ".1f", 1e3), _f(r.kv_cache_bytes, ".3f", 1e-6), _f(r.questions_per_s, ".2f")]


def markdown_table(rows: Sequence[GridRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(grid: GridResult) -> str:
    s = grid.settings
    out = [f"# Budget-matched compression grid: `{grid.model}`", "",
           f"{grid.created} · tasks {', '.join(s.get('tasks', []))} · limit {s.get('limit')} · seed {s.get('seed')} · "
           f"batch size {s.get('batch_size')} · max new tokens {s.get('max_new_tokens')} · greedy · "
           f"device {s.get('device')} {s.get('dtype')} · {s.get('torch_threads')} threads", "",
           "## Mean over tasks", "", markdown_table(grid.summary()), "",
           "acc: normalised exact match. retention: % of the uncompressed (`none`) accuracy on the same items. "
           "agreement: % of questions answered with exactly the uncompressed model's string. vis tok: visual tokens "
           "into the LM per question; vis tok/LM layer: visual positions per LM layer in prefill (in-LLM pruning). "
           "TFLOPs: analytic per question (multiply-add = 2 FLOPs). prefill s: measured time to first token of a "
           "batch (vision included). KV MB: analytic fp16 cache at the end of generation, typical question. "
           "Mean over tasks: the mean of the per-task values.", ""]
    for task in grid.tasks:
        out += [f"## {task}", "", markdown_table([r for r in grid.rows if r.task == task]), ""]
        out += [f"note ({r.label}): {n}" for r in grid.rows if r.task == task for n in r.notes]
    return "\n".join(out).rstrip() + "\n"


def write_grid(grid: GridResult, out_dir: str | Path, vlm: Any = None) -> dict[str, Path]:
    """grid.json, grid.md, grid_predictions.jsonl, pareto_tflops.png, pareto_prefill.png and, with `vlm`,
    kept_tokens.png (the grid's sample image at `settings["kept_keep"]`)."""
    from .pareto import plot_pareto

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "grid.json", "markdown": out / "grid.md", "predictions": out / "grid_predictions.jsonl"}
    atomic_write_text(paths["json"], json.dumps(grid.to_dict(), indent=2) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(grid))
    atomic_write_text(paths["predictions"], "".join(json.dumps({"config": label, **p}) + "\n"
                                                    for label, preds in grid.predictions.items() for p in preds))
    paths.update(plot_pareto(grid, out))
    if vlm is not None:
        from .kept_tokens import plot_kept_tokens

        keep = float(grid.settings.get("kept_keep", 0.1))
        image = grid.kept_tokens_image
        paths["kept_tokens"] = plot_kept_tokens(vlm, image, grid.settings.get("methods", []), keep,
                                                out / "kept_tokens.png", prompt=grid.kept_tokens_prompt)
    return paths
