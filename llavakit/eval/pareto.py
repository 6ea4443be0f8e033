"""Accuracy-vs-cost plots of a compression grid (`llavakit.eval.grid`).

    plot_pareto(grid, out_dir) -> {"pareto_tflops": Path, "pareto_prefill": Path}

Two PNGs, each with one panel per task plus a "mean over tasks" panel: accuracy against analytic
TFLOPs per question, and accuracy against the measured prefill time (time to first token of a batch).
One line per method through its keep ratios in order (points labelled with the ratio), a single marker for a
method without a budget, and the uncompressed reference as a black star with a dotted accuracy line.
Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..fileio import save_figure

AXES = {"pareto_tflops": ("tflops", "analytic TFLOPs per question"),
        "pareto_prefill": ("prefill_s", "measured prefill s (time to first token, per batch)")}


def plot_pareto(grid: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write pareto_tflops.png and pareto_prefill.png into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = [(t, [r for r in grid.rows if r.task == t]) for t in grid.tasks] + [("mean over tasks", grid.summary())]
    return {name: _figure(panels, key, xlabel, out / f"{name}.png", grid.model)
            for name, (key, xlabel) in AXES.items()}


def _figure(panels: Sequence[tuple[str, Sequence[Any]]], key: str, xlabel: str, path: Path, model: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (title, task_rows) in zip(axes.flat, panels):
        _panel(ax, title, task_rows, key, xlabel)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(f"accuracy vs {xlabel.split(' (')[0]} — {model}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return save_figure(fig, path)


def _panel(ax: Any, title: str, rows: Sequence[Any], key: str, xlabel: str) -> None:
    ref = [r for r in rows if r.spec is None]
    methods = list(dict.fromkeys(r.method for r in rows if r.spec is not None))
    for i, m in enumerate(methods):
        pts = sorted(((getattr(r, key), 100 * r.accuracy, r.keep) for r in rows
                      if r.method == m and r.spec is not None and getattr(r, key) is not None),
                     key=lambda p: -(p[2] or 0.0))  # joined in keep order (measured times need not fall with it)
        if not pts:
            continue
        xs, ys, ks = zip(*pts)
        line = ax.plot(xs, ys, marker="o", ms=4, lw=1.3, label=m, color=f"C{i % 10}")[0]
        for x, y, k in pts:
            if k is not None:
                ax.annotate(f"{k:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=line.get_color())
    for r in ref:
        x = getattr(r, key)
        if x is None:
            continue
        ax.plot([x], [100 * r.accuracy], marker="*", ms=11, color="black", ls="none", label="uncompressed")
        ax.axhline(100 * r.accuracy, color="black", lw=0.7, ls=":")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy %", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
