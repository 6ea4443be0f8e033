"""The synthetic world (issue 3, part 2): procedurally drawn scenes, deterministic by seed, with
captions, multi-round instructions, error-checking reports, held-out evaluation items and short clips.

    scene.py     Obj / Scene, vocabularies, `sample_scene` (non-overlapping, one object per 3x3 cell)
    render.py    `render(scene, size)`: PIL drawing at any resolution
    language.py  `caption`, single questions, `instructions` (multi-round, yes/no balanced)
    report.py    `report(scene, rng, corrupt)`: insert / remove / substitute errors (SIMPLE / COMPLEX)
    tasks.py     `EVAL_TASKS`, `eval_items(task, n, seed)` -> `WorldItem`s; seed bases
    dataset.py   `train_samples` (LLaVA conversation dicts), `write_dataset` (PNGs + JSON, atomic)
    video.py     `sample_clip`, `Clip.frames()`, `clip_questions`
"""

from .dataset import TRAIN_KINDS, TrainRecord, train_records, train_samples, write_dataset
from .language import caption, instructions
from .render import COLOUR_RGB, render
from .report import (REPORT_LABELS, omission_checks, report, report_answer, report_question, sample_report_case,
                     statement_checks)
from .scene import COLOURS, POSITIONS, SHAPES, SIZES, WORDS, Obj, Scene, sample_scene, scene_split
from .tasks import CHOICES, EVAL_SEED_BASE, EVAL_TASKS, TRAIN_SEED_BASE, WorldItem, eval_item, eval_items
from .video import DIRECTIONS, EVENTS, Clip, Track, clip_questions, sample_clip

__all__ = [
    "CHOICES", "COLOURS", "COLOUR_RGB", "DIRECTIONS", "EVAL_SEED_BASE", "EVAL_TASKS", "EVENTS", "POSITIONS",
    "REPORT_LABELS", "SHAPES", "SIZES", "TRAIN_KINDS", "TRAIN_SEED_BASE", "WORDS",
    "Clip", "Obj", "Scene", "Track", "TrainRecord", "WorldItem",
    "caption", "clip_questions", "eval_item", "eval_items", "instructions", "omission_checks", "render", "report",
    "report_answer", "report_question", "sample_clip", "sample_report_case", "sample_scene", "scene_split",
    "statement_checks", "train_records", "train_samples", "write_dataset",
]  # fmt: skip
