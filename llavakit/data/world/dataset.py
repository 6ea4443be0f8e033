"""Training samples of the synthetic world as LLaVA conversation records, and writing them to disk.

Format: LLaVA's conversation JSON (`{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`), the image placeholder only at the start of
the first human turn, as in LLaVA's `llava_v1_5_mix665k.json`. Caption prompts are the brief-description
instructions LLaVA uses for its alignment stage (LLaVA paper, appendix; `blip_laion_cc_sbu_558k`).

Ours:
- Kinds: "caption" (alignment), "instruction" (1-4 rounds, `language.instructions`), "report" (SIMPLE
  or COMPLEX error checking, 50/50; SIMPLE labels 1/2 "none" and 1/6 each error, COMPLEX 1/4 each),
  "mixed" (per sample: caption 0.25, instruction 0.5, report 0.25).
- Caption and instruction scenes have 1-4 objects; 30 % of them carry words.
- Every sample has its own generator seeded by (TRAIN_SEED_BASE, kind, seed, index) and its scene is
  drawn from the "train" hash half, so no training scene is ever an evaluation scene.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import InputError
from ...fileio import atomic_path, atomic_write_bytes
from .language import QA, caption, instructions
from .render import render
from .report import REPORT_LABELS, report_answer, report_question, sample_report_case
from .scene import Scene, pick, sample_scene
from .tasks import TRAIN_SEED_BASE

TRAIN_KINDS = ("caption", "instruction", "report", "mixed")
MIX = (("caption", 0.25), ("instruction", 0.5), ("report", 0.25))
WORDS_FRACTION = 0.3
IMAGE_TOKEN = "<image>"
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


@dataclass(frozen=True)
class TrainRecord:
    """One training sample before rendering: its scene and its (human, gpt) turns."""

    id: str
    kind: str  # "caption" | "instruction" | "report"
    scene: Scene
    turns: tuple[QA, ...]

    def conversations(self) -> list[dict[str, str]]:
        out = []
        for k, (human, gpt) in enumerate(self.turns):
            out.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{human}" if k == 0 else human})
            out.append({"from": "gpt", "value": gpt})
        return out


def _check(n: int, seed: int, kind: str) -> None:
    if kind not in TRAIN_KINDS:
        raise InputError(f"unknown sample kind {kind!r}; valid kinds: {', '.join(TRAIN_KINDS)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise InputError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")


def train_record(i: int, seed: int = 0, kind: str = "mixed", *, canvas: int = 224) -> TrainRecord:
    """Sample `i` of the (seed, kind) stream (what `train_records(n, seed, kind)` yields at index i)."""
    _check(i, seed, kind)
    rng = np.random.default_rng([TRAIN_SEED_BASE, TRAIN_KINDS.index(kind), seed, i])
    what = kind
    if kind == "mixed":
        names, weights = zip(*MIX)
        what = names[int(rng.choice(len(names), p=np.array(weights) / sum(weights)))]
    if what == "report":
        level = "simple" if rng.random() < 0.5 else "complex"
        if level == "simple":
            label = "none" if rng.random() < 0.5 else pick(rng, REPORT_LABELS[1:])
        else:
            label = pick(rng, REPORT_LABELS)
        scene, text, label = sample_report_case(rng, label, canvas=canvas, split="train")
        turns: tuple[QA, ...] = ((report_question(text, level, rng), report_answer(label, level)),)
    else:
        words = bool(rng.random() < WORDS_FRACTION)
        scene = sample_scene(rng, canvas=canvas, n_objects=(1, 4), words=words, split="train")
        if what == "caption":
            turns = ((pick(rng, CAPTION_PROMPTS), caption(scene, rng)),)
        else:
            turns = tuple(instructions(scene, rng, int(rng.integers(1, 5))))
    return TrainRecord(f"world-{kind}-{seed}-{i:07d}", what, scene, turns)


def train_records(n: int, seed: int = 0, kind: str = "mixed", *, canvas: int = 224) -> Iterator[TrainRecord]:
    """`n` unrendered samples; deterministic in (seed, kind); sample i does not depend on n."""
    _check(n, seed, kind)
    for i in range(n):
        yield train_record(i, seed, kind, canvas=canvas)


def train_samples(n: int, seed: int = 0, kind: str = "mixed", *, canvas: int = 224) -> Iterator[dict]:
    """`n` LLaVA conversation dicts whose "image" is a rendered `PIL.Image` (RGB, `canvas` px)."""
    for rec in train_records(n, seed, kind, canvas=canvas):
        yield {"id": rec.id, "image": render(rec.scene), "conversations": rec.conversations()}


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, kind: str = "mixed", *, canvas: int = 224) -> Path:
    """Write `n` samples as PNGs under `out_dir/images/` and a LLaVA JSON list; return the JSON's path.

    The JSON (`out_dir/world-{kind}-s{seed}-n{n}.json`, "image" paths relative to `out_dir`) is written
    last, to a temporary file renamed into place: when it exists, every image it names exists too.
    Each PNG is also written to a temporary file and renamed.
    """
    _check(n, seed, kind)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for rec in train_records(n, seed, kind, canvas=canvas):
        rel = f"images/{rec.id}.png"
        img = render(rec.scene)
        with atomic_path(out / rel) as tmp:
            img.save(tmp, format="PNG")
        entries.append({"id": rec.id, "image": rel, "conversations": rec.conversations()})
    path = out / f"world-{kind}-s{seed}-n{n}.json"
    payload = json.dumps(entries, indent=1).encode()
    atomic_write_bytes(path, payload)
    return path
