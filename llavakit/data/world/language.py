"""Text about a scene: captions (alignment stage), questions with exact answers, multi-round
instructions (instruction stage).

Issue 3, part 2 (the synthetic world); the caption / instruction split follows LLaVA's two training
stages (feature alignment on captions, then visual instruction tuning on conversations). The questions,
templates and answer vocabularies are ours, chosen to be learnable by a small model at 224 px:

- Every answer of a closed question is lower case and comes from a small vocabulary (`COLOURS`,
  `SHAPES`, `POSITIONS`, counts "0".."9", `WORDS`, "yes"/"no").
- An object is only asked about through a referring expression that picks it out uniquely (e.g. "the
  circle" only when there is one circle); otherwise a longer one is tried ("the large circle", "the
  circle in the top left") or the question is not asked.
- Yes/no questions are balanced *by construction*: the answer is drawn first (a fair coin), then a
  question with that answer is built from the same templates and the same attribute distribution, so
  the wording predicts nothing (unlike easy-vqa, whose wording predicts yes/no ~80 % of the time).
  "No" questions about a colour+shape pair prefer near misses (an existing colour with another shape,
  or the reverse), so colour and shape must be bound to the same object.
- Multi-round samples may follow a question about an object with "Where is it?" / "What colour is
  it?": the answer needs the earlier round in context.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...errors import InputError
from .scene import COLOURS, POSITIONS, SHAPES, Obj, RngLike, Scene, as_rng

POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "middle": "in the middle", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}  # fmt: skip
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
YES_NO = ("yes", "no")

QA = tuple[str, str]

COLOUR_TEMPLATES = ("What colour is {ref}?", "What is the colour of {ref}?", "Which colour does {ref} have?",
                    "What color is {ref}?")  # fmt: skip
SHAPE_TEMPLATES = ("What shape is {ref}?", "Which shape is {ref}?", "What kind of shape is {ref}?")
POSITION_TEMPLATES = ("Where is {ref}?", "Where is {ref} located?", "In which part of the image is {ref}?")
COUNT_TEMPLATES = ("How many shapes are there?", "How many objects are in the image?",
                   "How many shapes can you see?")  # fmt: skip
READ_TEMPLATES = ("What word is written under {ref}?", "What does the label under {ref} say?",
                  "Which word is written below {ref}?")  # fmt: skip
EXISTS_TEMPLATES = ("Is there a {colour} {shape}?", "Is there a {colour} {shape} in the image?",
                    "Can you see a {colour} {shape}?")  # fmt: skip
DESCRIBE_PROMPTS = ("Describe the image briefly.", "What is in this image?", "List the shapes in the image.",
                    "Give a short description of the picture.")  # fmt: skip

# Referring expressions tried in order (attributes of the object named in the phrase).
REFS_FOR_COLOUR = (("shape",), ("size", "shape"), ("shape", "position"))
REFS_FOR_SHAPE = (("colour",), ("size", "colour"), ("colour", "position"))
REFS_FOR_POSITION = (("colour", "shape"), ("size", "colour", "shape"))
REFS_FOR_READ = (("colour", "shape"), ("size", "colour", "shape"))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def describe(scene: Scene, obj: Obj, *, size: bool = True, position: bool = True, word: bool = True) -> str:
    """"a large red circle in the top left (labelled "cat")" style noun phrase for `obj`."""
    text = "a " + " ".join(([obj.size] if size else []) + [obj.colour, obj.shape])
    if position:
        text += " " + POSITION_PHRASES[scene.position(obj)]
    if word and obj.word is not None:
        text += f' with the word "{obj.word}" under it'
    return text


def _attr(scene: Scene, obj: Obj, key: str) -> str:
    return scene.position(obj) if key == "position" else getattr(obj, key)


def referent(scene: Scene, obj: Obj, options: Sequence[Sequence[str]]) -> str | None:
    """The first phrase ("the red object", "the large circle", ...) naming `obj` alone, else None."""
    for keys in options:
        matches = [o for o in scene.objects if all(_attr(scene, o, k) == _attr(scene, obj, k) for k in keys)]
        if len(matches) != 1:
            continue
        adjectives = [getattr(obj, k) for k in ("size", "colour") if k in keys]
        noun = obj.shape if "shape" in keys else "object"
        text = "the " + " ".join(adjectives + [noun])
        if "position" in keys:
            text += " " + POSITION_PHRASES[scene.position(obj)]
        return text
    return None


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _reading_order(scene: Scene) -> list[Obj]:
    return sorted(scene.objects, key=lambda o: POSITIONS.index(scene.position(o)))


def caption(scene: Scene, rng: RngLike = None) -> str:
    """A one-sentence description of every object (size, colour, shape, position, word); 4 templates."""
    rng = as_rng(rng)
    objs = list(scene.objects)
    order = rng.permutation(len(objs)) if rng.random() < 0.5 else None
    if order is not None:
        objs = [objs[i] for i in order]
    else:
        objs = _reading_order(scene)
    phrases = [describe(scene, o) for o in objs]
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    template = int(rng.integers(4))
    if template == 0:
        return f"{NUMBER_WORDS[n].capitalize()} {noun} on a grey background: {_join(phrases)}."
    if template == 1:
        return f"A picture of {_join(phrases)}."
    if template == 2:
        return " ".join(f"There is {p}." for p in phrases)
    return f"An image showing {_join(phrases)}."


# ------------------------------------------------------------------------------ single questions


def colour_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_COLOUR) -> QA | None:
    """"What colour is the circle?" -> "red"; None if `obj` has no unique referent among `refs`."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs)
    return None if ref is None else (_pick(rng, COLOUR_TEMPLATES).format(ref=ref), obj.colour)


def shape_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_SHAPE) -> QA | None:
    """"What shape is the red object?" -> "circle"."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs)
    return None if ref is None else (_pick(rng, SHAPE_TEMPLATES).format(ref=ref), obj.shape)


def position_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_POSITION) -> QA | None:
    """"Where is the blue square?" -> "top left" (a `POSITIONS` name)."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs)
    return None if ref is None else (_pick(rng, POSITION_TEMPLATES).format(ref=ref), scene.position(obj))


def read_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_READ) -> QA | None:
    """"What word is written under the red circle?" -> "cat"; None without a word or unique referent."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs) if obj.word is not None else None
    return None if ref is None else (_pick(rng, READ_TEMPLATES).format(ref=ref), obj.word)


def count_question(scene: Scene, rng: RngLike = None, *, total_only: bool = False) -> QA:
    """"How many shapes are there?" -> "3"; also (unless `total_only`) per colour or per shape (may be "0")."""
    rng = as_rng(rng)
    kind = 0 if total_only else int(rng.integers(3))
    if kind == 0:
        return _pick(rng, COUNT_TEMPLATES), str(len(scene.objects))
    # The counted colour / shape is one in the scene half of the time, so "0" does not dominate.
    if kind == 1:
        colour = _pick(rng, scene.objects).colour if rng.random() < 0.5 else _pick(rng, COLOURS)
        n = sum(o.colour == colour for o in scene.objects)
        return f"How many {colour} shapes are there?", str(n)
    shape = _pick(rng, scene.objects).shape if rng.random() < 0.5 else _pick(rng, SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return f"How many {PLURALS[shape]} are there?", str(n)


def exists_question(scene: Scene, rng: RngLike = None, answer: bool | None = None) -> QA:
    """"Is there a green triangle?" -> "yes"/"no". `answer` None draws it with a fair coin first."""
    rng = as_rng(rng)
    if answer is None:
        answer = bool(rng.random() < 0.5)
    present = {(o.colour, o.shape) for o in scene.objects}
    if answer:
        obj = _pick(rng, scene.objects)
        colour, shape = obj.colour, obj.shape
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = _pick(rng, near if near and rng.random() < 0.5 else absent)
    return _pick(rng, EXISTS_TEMPLATES).format(colour=colour, shape=shape), YES_NO[0 if answer else 1]


def attribute_check(scene: Scene, obj: Obj, rng: RngLike = None, answer: bool | None = None) -> QA | None:
    """"Is the circle red?" -> "yes"/"no" (answer drawn first); None without a unique shape referent."""
    rng = as_rng(rng)
    if answer is None:
        answer = bool(rng.random() < 0.5)
    ref = referent(scene, obj, REFS_FOR_COLOUR)
    if ref is None:
        return None
    colour = obj.colour if answer else _pick(rng, [c for c in COLOURS if c != obj.colour])
    return f"Is {ref} {colour}?", YES_NO[0 if answer else 1]


def what_is_at(scene: Scene, rng: RngLike = None) -> QA:
    """"What is in the top left?" -> "a large red circle" or "nothing" (occupied cell with p = 0.5)."""
    rng = as_rng(rng)
    taken = {scene.position(o): o for o in scene.objects}
    free = [p for p in POSITIONS if p not in taken]
    if free and rng.random() < 0.5:
        return f"What is {POSITION_PHRASES[_pick(rng, free)]}?", "nothing"
    obj = _pick(rng, scene.objects)
    return f"What is {POSITION_PHRASES[scene.position(obj)]}?", describe(scene, obj, position=False, word=False)


# ------------------------------------------------------------------------------ multi-round

# (kind, weight) of a training round; "read" only when the scene has words.
ROUND_KINDS = (
    ("colour", 0.18), ("shape", 0.18), ("position", 0.16), ("count", 0.12), ("exists", 0.12),
    ("attribute", 0.06), ("what_at", 0.05), ("read", 0.08), ("describe", 0.05),
)  # fmt: skip
CLOSED_KINDS = ("colour", "shape", "position", "count", "exists")  # kinds with a one-word exact answer
_FOLLOW_UP = 0.3  # chance of a pronoun follow-up after a question about one object


def _one_round(scene: Scene, kind: str, rng: np.random.Generator, *, total_only: bool) -> tuple[QA | None, Obj | None]:
    obj = _pick(rng, scene.objects)
    if kind == "colour":
        return colour_question(scene, obj, rng), obj
    if kind == "shape":
        return shape_question(scene, obj, rng), obj
    if kind == "position":
        return position_question(scene, obj, rng), obj
    if kind == "read":
        return read_question(scene, obj, rng), obj
    if kind == "attribute":
        return attribute_check(scene, obj, rng), obj
    if kind == "count":
        return count_question(scene, rng, total_only=total_only), None
    if kind == "exists":
        return exists_question(scene, rng), None
    if kind == "what_at":
        return what_is_at(scene, rng), None
    if kind == "describe":
        return (_pick(rng, DESCRIBE_PROMPTS), caption(scene, rng)), None
    raise InputError(f"unknown round kind {kind!r}; valid: {[k for k, _ in ROUND_KINDS]}")


def _follow_up(scene: Scene, obj: Obj, previous: str, rng: np.random.Generator) -> QA:
    if previous == "position":
        return _pick(rng, ("What colour is it?", "And what colour is it?")), obj.colour
    return _pick(rng, ("Where is it?", "And where is it?")), scene.position(obj)


def instructions(
    scene: Scene,
    rng: RngLike = None,
    rounds: int = 1,
    *,
    kinds: Sequence[str] | None = None,
    follow_ups: bool = True,
) -> list[QA]:
    """`rounds` (question, answer) pairs about `scene`, all different, for one multi-round sample.

    Args:
        kinds: restrict round kinds (default: all of `ROUND_KINDS`, weighted; "read" only with words).
            With `kinds` given, they are drawn uniformly and counts are totals only.
        follow_ups: allow "Where is it?" / "What colour is it?" after a question about one object.
    """
    rng = as_rng(rng)
    if not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= 16:
        raise InputError(f"rounds must be an int in 1..16, got {rounds!r}")
    has_words = any(o.word is not None for o in scene.objects)
    if kinds is None:
        table = [(k, w) for k, w in ROUND_KINDS if k != "read" or has_words]
        names, weights = [k for k, _ in table], np.array([w for _, w in table])
        total_only = False
    else:
        unknown = [k for k in kinds if k not in dict(ROUND_KINDS)]
        if unknown:
            raise InputError(f"unknown round kinds {unknown}; valid: {[k for k, _ in ROUND_KINDS]}")
        names, weights = list(kinds), np.ones(len(kinds))
        total_only = True
    weights = weights / weights.sum()
    out: list[QA] = []
    seen: set[str] = set()
    last: tuple[str, Obj] | None = None
    for _ in range(50 * rounds):
        if len(out) == rounds:
            break
        if follow_ups and last is not None and last[0] in ("colour", "shape", "position") and rng.random() < _FOLLOW_UP:
            qa, last = _follow_up(scene, last[1], last[0], rng), None
        else:
            kind = names[int(rng.choice(len(names), p=weights))]
            qa, obj = _one_round(scene, kind, rng, total_only=total_only)
            last = (kind, obj) if qa is not None and obj is not None else None
        if qa is None or qa[0] in seen:
            last = None  # a follow-up must come right after the round it refers to
            continue
        seen.add(qa[0])
        out.append(qa)
    if len(out) < rounds:  # tiny scenes run out of distinct questions: pad with counts/existence
        for qa in (count_question(scene, rng, total_only=True), exists_question(scene, rng)):
            if len(out) < rounds and qa[0] not in seen:
                seen.add(qa[0])
                out.append(qa)
    return out
