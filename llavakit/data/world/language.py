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
- Multi-round samples never ask what earlier rounds already said (no round can be answered from the
  conversation text alone), and may follow a colour/shape question about an object with "Where is
  it?", which needs the earlier round in context.
- Training rounds also include "Is the circle red?" (yes/no, balanced the same way), "What is in the
  top left?" ("a large red circle" or "nothing"), per-colour / per-shape counts and short
  descriptions; `CLOSED_KINDS` are those the eval's multi-round task uses.
"""

from __future__ import annotations

import re
from typing import Collection, Sequence

import numpy as np

from ...errors import InputError
from .scene import COLOURS, POSITIONS, SHAPES, Obj, RngLike, Scene, as_rng, pick

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


def referent_keys(scene: Scene, obj: Obj, options: Sequence[Sequence[str]]) -> tuple[str, ...] | None:
    """The first attribute set in `options` whose values `obj` alone has in `scene`, else None."""
    for keys in options:
        matches = [o for o in scene.objects if all(_attr(scene, o, k) == _attr(scene, obj, k) for k in keys)]
        if len(matches) == 1:
            return tuple(keys)
    return None


def referent(scene: Scene, obj: Obj, options: Sequence[Sequence[str]]) -> str | None:
    """The first phrase ("the red object", "the large circle", ...) naming `obj` alone, else None."""
    keys = referent_keys(scene, obj, options)
    if keys is not None:
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
    return None if ref is None else (pick(rng, COLOUR_TEMPLATES).format(ref=ref), obj.colour)


def shape_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_SHAPE) -> QA | None:
    """"What shape is the red object?" -> "circle"."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs)
    return None if ref is None else (pick(rng, SHAPE_TEMPLATES).format(ref=ref), obj.shape)


def position_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_POSITION) -> QA | None:
    """"Where is the blue square?" -> "top left" (a `POSITIONS` name)."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs)
    return None if ref is None else (pick(rng, POSITION_TEMPLATES).format(ref=ref), scene.position(obj))


def read_question(scene: Scene, obj: Obj, rng: RngLike = None, refs=REFS_FOR_READ) -> QA | None:
    """"What word is written under the red circle?" -> "cat"; None without a word or unique referent."""
    rng = as_rng(rng)
    ref = referent(scene, obj, refs) if obj.word is not None else None
    return None if ref is None else (pick(rng, READ_TEMPLATES).format(ref=ref), obj.word)


def count_question(scene: Scene, rng: RngLike = None, *, total_only: bool = False) -> QA:
    """"How many shapes are there?" -> "3"; also (unless `total_only`) per colour or per shape (may be "0")."""
    rng = as_rng(rng)
    kind = 0 if total_only else int(rng.integers(3))
    if kind == 0:
        return pick(rng, COUNT_TEMPLATES), str(len(scene.objects))
    # The counted colour / shape is one in the scene half of the time, so "0" does not dominate.
    if kind == 1:
        colour = pick(rng, scene.objects).colour if rng.random() < 0.5 else pick(rng, COLOURS)
        n = sum(o.colour == colour for o in scene.objects)
        return f"How many {colour} shapes are there?", str(n)
    shape = pick(rng, scene.objects).shape if rng.random() < 0.5 else pick(rng, SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return f"How many {PLURALS[shape]} are there?", str(n)


def exists_question(
    scene: Scene, rng: RngLike = None, answer: bool | None = None, *, avoid: Collection[tuple[str, str]] = ()
) -> QA | None:
    """"Is there a green triangle?" -> "yes"/"no".

    `answer` None draws it with a fair coin. A "yes" asks about a random object, a "no" about an
    absent (colour, shape) pair, half the time a near miss (sharing a colour or a shape with an object).
    Pairs in `avoid` are never asked; when that leaves no question for one of the two answers, None is
    returned whatever the answer would have been (so skipping cannot unbalance yes/no).
    """
    rng = as_rng(rng)
    present = [(o.colour, o.shape) for o in scene.objects]
    yes = [p for p in present if p not in avoid]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (c, s) not in avoid]
    if not yes or not absent:
        return None
    if answer is None:
        answer = bool(rng.random() < 0.5)
    if answer:
        colour, shape = pick(rng, yes)
    else:
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = pick(rng, near if near and rng.random() < 0.5 else absent)
    return pick(rng, EXISTS_TEMPLATES).format(colour=colour, shape=shape), YES_NO[0 if answer else 1]


def attribute_check(scene: Scene, obj: Obj, rng: RngLike = None, answer: bool | None = None) -> QA | None:
    """"Is the circle red?" -> "yes"/"no" (answer drawn first); None without a unique shape referent."""
    rng = as_rng(rng)
    if answer is None:
        answer = bool(rng.random() < 0.5)
    ref = referent(scene, obj, REFS_FOR_COLOUR)
    if ref is None:
        return None
    colour = obj.colour if answer else pick(rng, [c for c in COLOURS if c != obj.colour])
    return f"Is {ref} {colour}?", YES_NO[0 if answer else 1]


def what_is_at(scene: Scene, rng: RngLike = None) -> QA:
    """"What is in the top left?" -> "a large red circle" or "nothing" (occupied cell with p = 0.5)."""
    rng = as_rng(rng)
    taken = {scene.position(o): o for o in scene.objects}
    free = [p for p in POSITIONS if p not in taken]
    if free and rng.random() < 0.5:
        return f"What is {POSITION_PHRASES[pick(rng, free)]}?", "nothing"
    obj = pick(rng, scene.objects)
    return f"What is {POSITION_PHRASES[scene.position(obj)]}?", describe(scene, obj, position=False, word=False)


# ------------------------------------------------------------------------------ multi-round

# (kind, weight) of a training round; "read" only when the scene has words; "describe" only last.
ROUND_KINDS = (
    ("colour", 0.18), ("shape", 0.18), ("position", 0.16), ("count", 0.12), ("exists", 0.12),
    ("attribute", 0.06), ("what_at", 0.05), ("read", 0.08), ("describe", 0.05),
)  # fmt: skip
CLOSED_KINDS = ("colour", "shape", "position", "count", "exists")  # kinds with a one-word exact answer
_FOLLOW_UP = 0.3  # chance of "Where is it?" right after a colour/shape question


def _count_key(question: str) -> str:
    words = set(re.findall(r"[a-z]+", question.lower()))
    hits = [w for w in (*COLOURS, *PLURALS.values()) if w in words]
    return hits[0] if hits else "total"


_REFS = {"colour": REFS_FOR_COLOUR, "attribute": REFS_FOR_COLOUR, "shape": REFS_FOR_SHAPE,
         "position": REFS_FOR_POSITION, "read": REFS_FOR_READ}  # fmt: skip


class _Context:
    """What earlier rounds already said, so that no later round can be answered from the text alone.

    A (colour, shape) pair counts as settled when both words occur in one round (question or answer);
    when a referent names an object by its shape alone ("the circle": so there is one circle) or its
    colour alone, every pair with that shape / colour; when a count of a colour or shape is "0", every
    pair with it. An object's position counts as said when its pair and its position name
    occur in one round, or after a "Where is it?" about it.
    """

    def __init__(self, scene: Scene):
        self.scene = scene
        self.pairs: set[tuple[str, str]] = set()
        self.placed: set[int] = set()  # indices of objects whose position was said
        self.words: set[str] = set()
        self.counts: set[str] = set()  # what was counted: "total", a colour or a plural shape

    def add(self, qa: QA, kind: str, about: int | None = None) -> None:
        text = f"{qa[0]} {qa[1]}".lower()
        words = set(re.findall(r"[a-z]+", text))
        self.words |= words
        new = {(c, s) for c in COLOURS if c in words for s in SHAPES if s in words}
        if qa[0].startswith("How many"):
            key = _count_key(qa[0])
            self.counts.add(key)
            if qa[1] == "0":
                new |= {(c, s) for c in COLOURS for s in SHAPES if key in (c, PLURALS[s])}
        if about is not None and kind in _REFS:
            obj = self.scene.objects[about]
            keys = referent_keys(self.scene, obj, _REFS[kind])
            if keys is not None and set(keys) <= {"colour", "shape"}:
                new |= {(c, s) for c in COLOURS for s in SHAPES
                        if ("colour" not in keys or c == obj.colour) and ("shape" not in keys or s == obj.shape)}  # fmt: skip
        self.pairs |= new
        for i, o in enumerate(self.scene.objects):
            if (o.colour, o.shape) in new and self.scene.position(o) in text:
                self.placed.add(i)
        if kind == "follow_up" and about is not None:
            self.placed.add(about)

    def known(self, obj: Obj) -> bool:
        return (obj.colour, obj.shape) in self.pairs


def _one_round(
    scene: Scene, kind: str, rng: np.random.Generator, ctx: _Context, *, total_only: bool
) -> tuple[QA | None, int | None]:
    """One round of `kind`, or None when it would repeat what `ctx` already said."""
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    if kind in ("colour", "shape", "attribute"):
        if ctx.known(obj):
            return None, None
        make = {"colour": colour_question, "shape": shape_question, "attribute": attribute_check}[kind]
        return make(scene, obj, rng), i
    if kind == "position":
        return (None, None) if i in ctx.placed else (position_question(scene, obj, rng), i)
    if kind == "read":
        return (None, None) if obj.word in ctx.words else (read_question(scene, obj, rng), i)
    if kind == "count":
        qa = count_question(scene, rng, total_only=total_only)
        return (None, None) if _count_key(qa[0]) in ctx.counts else (qa, None)
    if kind == "exists":
        # Settled pairs are avoided; once every object's pair is settled no "yes" is left, so (to keep
        # yes/no balanced) no existence question is asked at all.
        return exists_question(scene, rng, avoid=ctx.pairs), None
    if kind == "what_at":
        qa = what_is_at(scene, rng)
        said = [j for j, o in enumerate(scene.objects) if ctx.known(o) and j in ctx.placed]
        return (None, None) if any(qa[1] == describe(scene, scene.objects[j], position=False, word=False)
                                   and POSITION_PHRASES[scene.position(scene.objects[j])] in qa[0]
                                   for j in said) else (qa, None)  # fmt: skip
    if kind == "describe":
        return (pick(rng, DESCRIBE_PROMPTS), caption(scene, rng)), None
    raise InputError(f"unknown round kind {kind!r}; valid: {[k for k, _ in ROUND_KINDS]}")


def instructions(
    scene: Scene,
    rng: RngLike = None,
    rounds: int = 1,
    *,
    kinds: Sequence[str] | None = None,
    follow_ups: bool = True,
) -> list[QA]:
    """`rounds` (question, answer) pairs about `scene` for one multi-round sample (fewer only if the
    scene runs out of fresh questions, which a 1-object scene can after ~6 rounds).

    No round repeats a question or can be answered from the text of earlier rounds (see `_Context`);
    the only rounds that need an earlier one are the follow-ups "Where is it?" (after a colour or
    shape question whose object's position is not yet said), which need it for "it".

    Args:
        kinds: restrict round kinds (default: all of `ROUND_KINDS`, weighted; "read" only with words,
            "describe" only as the last round). With `kinds` given, they are drawn uniformly and counts
            are totals only.
        follow_ups: allow "Where is it?" follow-ups.
    """
    rng = as_rng(rng)
    if not isinstance(rounds, (int, np.integer)) or isinstance(rounds, bool) or not 1 <= rounds <= 16:
        raise InputError(f"rounds must be an int in 1..16, got {rounds!r}")
    has_words = any(o.word is not None for o in scene.objects)
    if kinds is None:
        table = [(k, w) for k, w in ROUND_KINDS if k != "read" or has_words]
        names, weights = [k for k, _ in table], np.array([w for _, w in table])
        total_only = False
    else:
        unknown = [k for k in kinds if k not in dict(ROUND_KINDS)]
        if unknown or not kinds:
            raise InputError(f"unknown round kinds {list(kinds)}; valid: {[k for k, _ in ROUND_KINDS]}")
        names, weights = list(kinds), np.ones(len(kinds))
        total_only = True
    weights = weights / weights.sum()
    ctx = _Context(scene)
    out: list[QA] = []
    seen: set[str] = set()
    last: int | None = None  # object of the previous round when a follow-up may come next
    for _ in range(50 * rounds):
        if len(out) == rounds:
            break
        follow = follow_ups and last is not None and last not in ctx.placed and rng.random() < _FOLLOW_UP
        if follow:
            qa, about = (pick(rng, ("Where is it?", "And where is it?")), scene.position(scene.objects[last])), last
            kind = "follow_up"
        else:
            kind = names[int(rng.choice(len(names), p=weights))]
            if kind == "describe" and len(out) < rounds - 1:
                continue
            qa, about = _one_round(scene, kind, rng, ctx, total_only=total_only)
        if qa is None or qa[0] in seen:
            last = None  # a follow-up must come right after the round it refers to
            continue
        seen.add(qa[0])
        ctx.add(qa, kind, about)
        out.append(qa)
        last = about if kind in ("colour", "shape") else None
    return out
