"""Writing an `EvalResults`: results.json, report.md, accuracy.png and predictions.jsonl.

    write_report(results, out_dir) -> {"json": ..., "markdown": ..., "plot": ..., "predictions": ...}
    markdown_table(results) -> str     the summary table (the CLI prints it)

The plot is drawn with matplotlib's object API on an Agg canvas (`Figure` + `FigureCanvasAgg`), so it
never touches pyplot's global backend or needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, save_figure
from .harness import EvalResults, TaskResult

DASH = "—"


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return DASH if x is None else format(x * scale, fmt)


def _row_cells(r: TaskResult) -> list[str]:
    maj = r.baselines.get("majority", {})
    return [r.task, str(r.n), _pct(r.accuracy), _pct(r.accuracy_shuffled), _pct(r.consistency),
            f"{_pct(maj.get('accuracy'))} ({maj.get('answer', '')})", _pct(r.baselines.get("chance")),
            _num(r.visual_tokens, ".1f"), _num(r.flops, ".3f", 1e-9), _num(r.prefill_s, ".3f"),
            _num(r.decode_s_per_token, ".1f", 1e3), _num(r.questions_per_s, ".2f")]


HEADER = ["task", "n", "acc %", "shuffled %", "consistency %", "majority % (answer)", "chance %", "visual tok",
          "GFLOPs/item", "prefill s", "decode ms/tok", "q/s"]


def markdown_table(results: EvalResults) -> str:
    """The summary table, one row per task."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _row_cells(r)) + " |" for r in results.rows]
    return "\n".join(lines)


def markdown_report(results: EvalResults) -> str:
    """report.md: settings, the summary table, column notes, per-answer and per-kind breakdowns."""
    s = results.settings
    out = [f"# Evaluation of `{results.model}`", "",
           f"{results.created} · batch size {s.get('batch_size')} · max new tokens {s.get('max_new_tokens')} · "
           f"greedy · seed {s.get('seed')} · limit {s.get('limit')} · compression {s.get('compression')} · "
           f"device {s.get('device')} {s.get('dtype')} · {s.get('torch_threads')} threads", "",
           markdown_table(results), "",
           "acc: normalised exact match (llavakit/eval/scoring.py), mean over items of the fraction of rounds "
           "correct. shuffled: the same questions with another item's image (a derangement). consistency: "
           "multi-round items with every round correct. majority: always the most frequent gold answer. chance: "
           "mean 1/len(choices). GFLOPs: analytic (multiply-add = 2 FLOPs) per item. prefill: time to first token "
           "per batch; decode: per batch step; q/s: questions per second of generation.", ""]
    for r in results.rows:
        out += [f"## {r.task}", "", r.description, ""]
        for title, table in (("answer", r.per_answer), ("kind", r.per_kind)):
            if not table:
                continue
            out += [f"| {title} | n | acc % | shuffled % |", "|---|---|---|---|"]
            out += [f"| {k or DASH} | {v['n']} | {_pct(v['accuracy'])} | {_pct(v.get('accuracy_shuffled'))} |"
                    for k, v in table.items()]
            out.append("")
        out += [f"note: {n}" for n in r.notes]
    return "\n".join(out).rstrip() + "\n"


def plot_accuracy(results: EvalResults, path: str | Path) -> Path:
    """Per-task accuracy bars (and shuffled-image bars), with majority and chance baselines as ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results.rows
    n = len(rows)
    fig = Figure(figsize=(max(4.0, 1.1 * n + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shuffled = any(r.accuracy_shuffled is not None for r in rows)
    width = 0.38 if shuffled else 0.6
    xs = list(range(n))
    ax.bar([x - (width / 2 if shuffled else 0) for x in xs], [100 * r.accuracy for r in rows], width,
           label="accuracy", color="#3b75af")
    if shuffled:
        ax.bar([x + width / 2 for x in xs], [100 * (r.accuracy_shuffled or 0.0) for r in rows], width,
               label="shuffled images", color="#c9c9c9", hatch="//", edgecolor="#777777")
    for x, r in zip(xs, rows):
        maj = r.baselines.get("majority", {}).get("accuracy")
        chance = r.baselines.get("chance")
        if maj is not None:
            ax.hlines(100 * maj, x - 0.45, x + 0.45, colors="black", linewidth=1.5,
                      label="majority answer" if x == 0 else None)
        if chance is not None:
            ax.hlines(100 * chance, x - 0.45, x + 0.45, colors="#d62728", linestyles="dashed", linewidth=1.2,
                      label="chance" if x == 0 else None)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.task for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{Path(results.model).name or results.model}: per-task accuracy", pad=26)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(results: EvalResults, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, report.md, accuracy.png and predictions.jsonl into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "plot": out / "accuracy.png",
             "predictions": out / "predictions.jsonl"}
    atomic_write_text(paths["json"], json.dumps(results.to_dict(), indent=2, default=_json_default) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(results))
    plot_accuracy(results, paths["plot"])
    atomic_write_text(paths["predictions"],
                      "".join(json.dumps(rec, default=_json_default) + "\n" for rec in results.predictions))
    return paths


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
