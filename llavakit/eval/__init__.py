"""Evaluation: benchmark tasks, a batched harness, and reports (`llavakit eval`).

    from llavakit.eval import evaluate
    results = evaluate(vlm, ["easyvqa", "world-colour"], limit=200, shuffled_control=True)

    __init__.py  `EvalItem` and the `Task` protocol (what every benchmark provides)
    scoring.py   normalised exact match (the one answer-matching rule, documented there)
    tasks/       `TASKS` registry; one Task class per benchmark family (easyvqa.py, world.py)
    harness.py   `evaluate`: batched greedy generation, baselines, shuffled-image control, costs, timings
    report.py    results.json, report.md, accuracy.png (and predictions.jsonl)

The types live here (not in tasks/) so task modules and the harness import them without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

__all__ = ["EvalItem", "Task", "TASKS", "evaluate", "EvalResults", "TaskResult", "write_report"]


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question (or conversation) with its exact answer.

    `images`: PIL images or paths, placed before the (first) question. `prompt`: the question with the
    task's short answer instruction. `choices`: the closed answer set (the uniform-chance baseline is
    1 / len(choices); scoring prefers the longest choice a prediction starts with). `kind`: an optional
    group for the breakdown (e.g. easy-vqa's "yes/no" / "shape" / "color").
    `rounds`: for a multi-round conversation, every (prompt, answer) in order (the last one equals
    `prompt`, `answer`); empty for a single question.
    """

    id: str
    images: tuple[Any, ...]
    prompt: str
    answer: str
    choices: tuple[str, ...]
    kind: str = ""
    rounds: tuple[tuple[str, str], ...] = ()

    @property
    def num_rounds(self) -> int:
        return max(1, len(self.rounds))

    def round(self, k: int) -> "EvalItem":
        """Round `k` as a single-question item (itself for a single-question item and k == 0)."""
        if not self.rounds:
            if k != 0:
                raise IndexError(f"{self.id} has one round, asked for round {k}")
            return self
        prompt, answer = self.rounds[k]
        return replace(self, id=f"{self.id}#r{k}", prompt=prompt, answer=answer, rounds=())


@runtime_checkable
class Task(Protocol):
    """A benchmark: deterministic items and a per-question score in [0, 1]."""

    name: str
    description: str

    def items(self, limit: int | None, seed: int) -> list[EvalItem]:
        """The first `limit` items (None: the task's default size) of the seeded order; same args, same list."""
        ...

    def score(self, prediction: str, item: EvalItem) -> float:
        """Score one answer to a single-question item (the harness passes `item.round(k)` per round)."""
        ...


def answer_suffix(question: str, instruction: str) -> str:
    """`question` + `instruction`, on a new line when the question spans several lines."""
    sep = "\n" if "\n" in question else " "
    return f"{question}{sep}{instruction}"


def __getattr__(name: str) -> Any:  # lazy: importing the types does not import the harness
    if name == "TASKS":
        from .tasks import TASKS
        return TASKS
    if name in ("evaluate", "EvalResults", "TaskResult"):
        from . import harness
        return getattr(harness, name)
    if name == "write_report":
        from .report import write_report
        return write_report
    raise AttributeError(name)
