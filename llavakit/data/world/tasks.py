"""Held-out evaluation items of the synthetic world, with exact answers and closed answer sets.

Issue 3, part 2. The tasks and their construction are ours:

- Every item is built from its own generator, seeded by (EVAL_SEED_BASE, task, seed, index): item i
  does not depend on `n`, and the same arguments give identical items (images included).
- Eval scenes come from the "eval" hash half of scene space (`scene_split`), training scenes from the
  "train" half: the two can never share a scene, whatever the seeds.
- Answers are balanced by construction: each block of len(targets) items is a seeded permutation of
  the task's targets, and the scene is sampled (rejection) until it holds an object with that answer
  and a unique referent. The answer-prior baseline is therefore 1 / len(choices) (report-simple: 1/2;
  its "yes" half is split equally over insert / remove / substitute).
- Referring expressions are the simplest ones: colour questions name the object by its shape only
  ("the circle"), shape questions by its colour only ("the red object"), position and read questions
  by colour + shape.
- world-multiround: scenes of 2-4 objects, 2-4 closed rounds (colour, shape, position, total count,
  yes/no existence, and pronoun follow-ups "Where is it?"); no round can be answered from the text of
  earlier ones (`language.instructions`). `question`/`answer` are the last round; `rounds` holds all
  of them in order; a harness scores each round with the earlier rounds and their gold answers in
  context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...errors import InputError
from .language import (
    CLOSED_KINDS,
    QA,
    YES_NO,
    colour_question,
    count_question,
    instructions,
    position_question,
    read_question,
    referent,
    shape_question,
)
from .render import render
from .report import REPORT_LABELS, report_answer, report_question, sample_report_case
from .scene import COLOURS, POSITIONS, SHAPES, WORDS, Scene, sample_scene

TRAIN_SEED_BASE = 20_240_301  # first entropy word of every training generator
EVAL_SEED_BASE = 90_240_301  # first entropy word of every evaluation generator

EVAL_TASKS = (
    "world-colour",
    "world-shape",
    "world-count",
    "world-position",
    "world-read",
    "world-multiround",
    "world-report-simple",
    "world-report-complex",
)
COUNTS = ("1", "2", "3", "4")
CHOICES = {
    "world-colour": COLOURS,
    "world-shape": SHAPES,
    "world-count": COUNTS,
    "world-position": POSITIONS,
    "world-read": WORDS,
    "world-multiround": COLOURS + SHAPES + COUNTS + POSITIONS + YES_NO,
    "world-report-simple": YES_NO,
    "world-report-complex": REPORT_LABELS,
}
# What each block of items cycles through (the balanced hidden variable).
_TARGETS = {
    "world-colour": COLOURS,
    "world-shape": SHAPES,
    "world-count": COUNTS,
    "world-position": POSITIONS,
    "world-read": WORDS,
    "world-multiround": ("any",),
    "world-report-simple": ("none", "none", "none", "insert", "remove", "substitute"),
    "world-report-complex": REPORT_LABELS,
}
_MAX_TRIES = 2000
_BLOCK = 1 << 20  # entropy word marking a block-permutation generator


@dataclass(frozen=True)
class WorldItem:
    """One evaluation item. `image()` renders `scene` lazily (any `size`)."""

    id: str
    task: str
    scene: Scene
    question: str
    answer: str  # lower case, exact
    choices: tuple[str, ...]  # the task's closed answer set
    rounds: tuple[QA, ...]  # all rounds in order, the last one is (question, answer)
    detail: str = ""  # report tasks: the corruption ("none", "insert", ...)

    def image(self, size: int | None = None) -> Image.Image:
        return render(self.scene, size)


def _check_task(task: str) -> None:
    if task not in EVAL_TASKS:
        raise InputError(f"unknown world task {task!r}; valid tasks: {', '.join(EVAL_TASKS)}")


def _target(task: str, seed: int, i: int) -> str:
    targets = _TARGETS[task]
    block_rng = np.random.default_rng([EVAL_SEED_BASE, EVAL_TASKS.index(task), seed, _BLOCK, i // len(targets)])
    return targets[int(block_rng.permutation(len(targets))[i % len(targets)])]


def _object_question(task: str, target: str, rng: np.random.Generator, canvas: int) -> tuple[Scene, QA]:
    for _ in range(_MAX_TRIES):
        if task == "world-count":
            scene = sample_scene(rng, canvas=canvas, n_objects=int(target), split="eval")
            return scene, count_question(scene, rng, total_only=True)
        words = task == "world-read"
        scene = sample_scene(rng, canvas=canvas, n_objects=(1, 3) if words else (1, 4), words=words, split="eval")
        if task == "world-colour":
            objs = [o for o in scene.objects if o.colour == target and referent(scene, o, [("shape",)])]
            make = lambda o: colour_question(scene, o, rng, refs=[("shape",)])  # noqa: E731
        elif task == "world-shape":
            objs = [o for o in scene.objects if o.shape == target and referent(scene, o, [("colour",)])]
            make = lambda o: shape_question(scene, o, rng, refs=[("colour",)])  # noqa: E731
        elif task == "world-position":
            refs = [("colour", "shape")]
            objs = [o for o in scene.objects if scene.position(o) == target and referent(scene, o, refs)]
            make = lambda o: position_question(scene, o, rng, refs=refs)  # noqa: E731
        else:  # world-read
            refs = [("colour", "shape")]
            objs = [o for o in scene.objects if o.word == target and referent(scene, o, refs)]
            make = lambda o: read_question(scene, o, rng, refs=refs)  # noqa: E731
        if objs:
            return scene, make(objs[int(rng.integers(len(objs)))])
    raise RuntimeError(f"{task}: no scene with answer {target!r} in {_MAX_TRIES} draws")  # not expected


def eval_item(task: str, seed: int, i: int, *, canvas: int = 224) -> WorldItem:
    """Item `i` of `task` for `seed` (what `eval_items(task, n, seed)[i]` returns)."""
    _check_task(task)
    rng = np.random.default_rng([EVAL_SEED_BASE, EVAL_TASKS.index(task), seed, i])
    target = _target(task, seed, i)
    item_id = f"{task}-{seed}-{i:05d}"
    detail = ""
    if task.startswith("world-report-"):
        level = task.rsplit("-", 1)[1]
        scene, text, detail = sample_report_case(rng, target, canvas=canvas, split="eval")
        rounds: tuple[QA, ...] = ((report_question(text, level, rng), report_answer(detail, level)),)
    elif task == "world-multiround":
        scene = sample_scene(rng, canvas=canvas, n_objects=(2, 4), split="eval")
        rounds = tuple(instructions(scene, rng, int(rng.integers(2, 5)), kinds=CLOSED_KINDS))
    else:
        scene, qa = _object_question(task, target, rng, canvas)
        rounds = (qa,)
    question, answer = rounds[-1]
    return WorldItem(item_id, task, scene, question, answer, CHOICES[task], rounds, detail)


def eval_items(task: str, n: int, seed: int = 0, *, canvas: int = 224) -> list[WorldItem]:
    """`n` items of `task` (one of `EVAL_TASKS`), deterministic in (`task`, `n`, `seed`); images lazy."""
    _check_task(task)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return [eval_item(task, int(seed), i, canvas=canvas) for i in range(n)]
