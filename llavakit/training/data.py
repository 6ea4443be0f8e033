"""Training data as image groups: one image and the conversations about it (packed later).

Sources (`DataSource.kind`):
- easyvqa: the easy-vqa train split (never test), questions grouped by image, `questions_per_image`
  independent single-round blocks per group.
- world-instruction: synthetic-world scenes, each with a caption block and three multi-round
  instruction blocks (yes/no balanced by construction in the world generator).
- world-report: report error-checking (radiology protocol): per scene, SIMPLE blocks for a correct and
  a corrupted report (balanced yes/no) and COMPLEX blocks for all four labels (balanced).
- world-qa: synthetic-world scenes, each with dense single-round blocks of the evaluation's question
  kinds (colour, shape and position of every object, counts, a yes and a no existence question, the
  word when there is one): one image's features feed up to ~16 targets.
- world-bind: scenes of 2-4 objects with binding questions only, all packed on one image (~17 per
  scene): the colour of each uniquely shaped object named by its shape (world-colour's form), the shape
  of each uniquely coloured object named by its colour (world-shape's form), each object's position
  named by colour and shape, "Is the circle red?" once true and once false per object, and two yes and
  two no "Is there a green triangle?" questions (near misses preferred). Ours: a curriculum source for
  binding a colour to a shape, which the mixed sources above did not teach (docs/default-model-training.md).
- world-position: scenes of 1-4 objects (world-qa's scenes, no words) with position questions only: each
  object's position named by colour and shape (world-position's form) and, when one attribute names it
  alone, by its shape or by its colour. Ours: a curriculum source for the 3x3 grid's column, which the
  mixed sources taught far less well than the row (stage H3: row 94 %, column 53 % on world-position).
- world-check: scenes of 1-5 objects (the report tasks' range, no words), a curriculum for SIMPLE report
  checking: each object's statement in the report's wording checked true and one false statement per
  object checked ("Is this statement about the image true? ..."), "What is in the top left?" for every
  taken cell and as many free ones ("nothing"), the total count, and four SIMPLE reports of the scene
  (two correct, two with an error of a kind the scene allows), so the same image carries both answers.
  Ours: the decomposition (statement, cell, count, then whole reports); yes/no balanced by construction.
- world-count: scenes of 1-5 objects (no words), a counting curriculum: the total count twice (two
  wordings), the count of small and of large shapes, of each grid row and column ("How many shapes are
  in the top row?", often "0"), and two counts of a colour or a shape. Ours: a source that splits a count into
  parts; stage I's model under-counted scenes of mostly small objects and over-counted mostly large ones
  (an answer read from the covered area; `benchmarks/eval_breakdown.py`).
- world-omit: scenes of 2-5 objects, a curriculum for the remove error (a report that leaves an object
  out; every statement in it is true, so world-check's single-statement checks cannot teach it): two
  complete and two incomplete reports asked SIMPLE, "Which shape in the image does this report leave
  out?" ("none" or the dropped object), "Does this report mention the shape in the top left?", the
  incomplete report's statement count and the image's count (`report.omission_checks`). Ours.
- world-caption: one caption block per scene.
- llava-json: a LLaVA conversation JSON file, one group per sample.
Our choices: the block layout above, so every image's features are reused by several targets, and
easyvqa `yes_no: balanced`: easy-vqa's yes/no answers are predictable from the question's wording (each
template is 70-88 % one answer), so a model can score ~81 % on them without looking; balanced drops
majority-answer questions per template (colour and shape words masked) until yes and no are equal.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from .config import DataSource

Rounds = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ImageGroup:
    key: str  # unique, stable: the feature-cache key
    load: Callable[[], Any]  # -> PIL image (lazy)
    blocks: tuple[Rounds, ...]


def build_groups(src: DataSource) -> list[ImageGroup]:
    builders = {"easyvqa": _easyvqa, "world-instruction": _world_instruction, "world-qa": _world_qa,
                "world-bind": _world_bind, "world-position": _world_position,
                "world-check": _world_check,
                "world-count": _world_count, "world-omit": _world_omit,
                "world-report": _world_report, "world-caption": _world_caption, "llava-json": _llava_json}
    groups = builders[src.kind](src)
    if src.kind == "llava-json":
        return groups
    return [ImageGroup(g.key, g.load, tuple(tuple((with_instruction(q, a), a) for q, a in b) for b in g.blocks))
            for g in groups]


def with_instruction(question: str, answer: str) -> str:
    """Short answers get the answer-format instruction the eval tasks append (llavakit.eval.tasks),
    as LLaVA-1.5 appends "Answer the question using a single word or phrase." to its short-answer data."""
    from ..eval import answer_suffix

    words = answer.split()
    if len(words) > 2:
        return question
    if answer.isdigit():
        return answer_suffix(question, "Answer with a number.")
    if len(words) == 2 or zlib.crc32(question.encode()) % 2:  # one-word answers see both phrasings
        return answer_suffix(question, "Answer with one or two words.")
    return answer_suffix(question, "Answer with one word.")


def _easyvqa(src: DataSource) -> list[ImageGroup]:
    from PIL import Image

    from ..data.easyvqa import easyvqa_samples

    samples = easyvqa_samples("train", seed=src.seed, pack_per_image=True)
    keep = _yes_no_balancer(samples, src.seed) if src.yes_no == "balanced" else None
    rng = np.random.default_rng(src.seed)
    groups = []
    for s in samples:
        qa = [(q, a) for (rq, q), (ra, a) in zip(s.turns[0::2], s.turns[1::2])]
        qa = [(q.replace("<image>", "").strip(), a) for q, a in qa]
        if keep is not None:
            qa = [(q, a) for q, a in qa if keep(str(s.images[0]), q, a)]
        order = rng.permutation(len(qa))
        qa = [qa[i] for i in order]
        path = str(s.images[0])
        for c in range(0, len(qa), src.questions_per_image):
            chunk = tuple(((q, a),) for q, a in qa[c:c + src.questions_per_image])
            groups.append(ImageGroup(f"easyvqa-train:{os.path.basename(path)}", lambda p=path: Image.open(p).convert("RGB"), chunk))
    return groups[: src.n] if src.n else groups


def _yes_no_balancer(samples, seed: int) -> Callable[[str, str, str], bool]:
    """keep(image_key, question, answer): True for every non-yes/no question and for a seeded subset of
    each yes/no template's majority answer of the size of its minority answer (so yes = no per template)."""
    import re

    from ..data.easyvqa import COLORS, SHAPES

    colour = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
    shape = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")

    def template(q: str) -> str:
        return shape.sub("S", colour.sub("C", q.replace("<image>", "").strip().lower()))

    counts: dict[tuple[str, str], int] = {}
    for s in samples:
        for (_, q), (_, a) in zip(s.turns[0::2], s.turns[1::2]):
            if a in ("yes", "no"):
                counts[(template(q), a)] = counts.get((template(q), a), 0) + 1
    p_keep = {}
    for (t, a), n in counts.items():
        other = counts.get((t, "no" if a == "yes" else "yes"), 0)
        p_keep[(t, a)] = min(1.0, other / n)

    def keep(key: str, q: str, a: str) -> bool:
        if a not in ("yes", "no"):
            return True
        u = zlib.crc32(f"{seed}:{key}:{q}:{a}".encode()) / 2**32  # deterministic, uniform in [0, 1)
        return u < p_keep[(template(q), a)]

    return keep


def _world_scene(i: int, seed: int, words: bool, n_objects: tuple[int, int] = (1, 4)):
    from ..data.world import TRAIN_SEED_BASE, sample_scene

    rng = np.random.default_rng([TRAIN_SEED_BASE, 1000 + seed, i])
    return rng, sample_scene(rng, canvas=224, n_objects=n_objects, words=words, split="train")


def _single_round_groups(key: str, scene, qa: list, rng: np.random.Generator, per_image: int) -> list[ImageGroup]:
    """One scene's questions (None = not askable) shuffled and packed `per_image` single-round blocks a group."""
    qa = [x for x in qa if x is not None]
    qa = [qa[j] for j in rng.permutation(len(qa))]
    return [ImageGroup(key, lambda s=scene: _render(s), tuple(((q, a),) for q, a in qa[c:c + per_image]))
            for c in range(0, len(qa), per_image)]


def _bind_scene(i: int, seed: int):
    """world-bind's i-th scene of `seed` (2-4 objects, no words) and the generator that continues it."""
    return _world_scene(i, 1000 + seed, words=False, n_objects=(2, 4))


def _render(scene):
    from ..data.world import render
    return render(scene)


def _world_instruction(src: DataSource) -> list[ImageGroup]:
    from ..data.world import caption, instructions

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed, words=bool(i % 10 < 3))
        blocks = [(("Describe the image briefly.", caption(scene, rng)),)]
        for _ in range(3):
            rounds = tuple(instructions(scene, rng, int(rng.integers(1, 5))))
            if rounds:
                blocks.append(rounds)
        out.append(ImageGroup(f"world-instruction:{src.seed}:{i}", lambda s=scene: _render(s), tuple(blocks)))
    return out


def _world_bind(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import (attribute_check, colour_question, exists_question, position_question,
                                       shape_question)

    out = []
    for i in range(src.n or 1000):
        rng, scene = _bind_scene(i, src.seed)
        qa = []
        for o in scene.objects:
            qa += [colour_question(scene, o, rng, refs=[("shape",)]), shape_question(scene, o, rng, refs=[("colour",)]),
                   position_question(scene, o, rng, refs=[("colour", "shape")]),
                   attribute_check(scene, o, rng, answer=True), attribute_check(scene, o, rng, answer=False)]
        asked: set[str] = set()
        for answer in (True, True, False, False):
            q = exists_question(scene, rng, answer=answer)
            if q is not None and q[0] not in asked:
                asked.add(q[0])
                qa.append(q)
        out += _single_round_groups(f"world-bind:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


def _world_position(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import position_question

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 5003, words=False)
        qa = []
        for o in scene.objects:
            qa.append(position_question(scene, o, rng))
            qa.append(position_question(scene, o, rng, refs=(("shape",), ("colour",))))
        seen: set[str] = set()
        qa = [x for x in qa if x is not None and not (x[0] in seen or seen.add(x[0]))]  # one of each question
        out += _single_round_groups(f"world-position:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


def _world_check(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import POSITION_PHRASES, count_question, describe
    from ..data.world.report import CORRUPTIONS, report, report_answer, report_question, statement_checks
    from ..data.world.scene import POSITIONS

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 15485863, words=False, n_objects=(1, 5))
        qa = statement_checks(scene, rng)
        taken = {scene.position(o): o for o in scene.objects}
        free = [p for p in POSITIONS if p not in taken]
        qa += [(f"What is {POSITION_PHRASES[p]}?", describe(scene, o, position=False, word=False))
               for p, o in taken.items()]
        qa += [(f"What is {POSITION_PHRASES[free[j]]}?", "nothing")
               for j in rng.permutation(len(free))[:len(taken)]]
        qa.append(count_question(scene, rng, total_only=True))
        allowed = [c for c in CORRUPTIONS
                   if not (c == "remove" and len(taken) < 2) and not (c == "insert" and not free)]
        wrong = [allowed[j] for j in rng.permutation(len(allowed))[:2]]
        wrong += wrong[:2 - len(wrong)]  # a one-object scene allows one kind only: use it twice
        for label in ("none", "none", *wrong):
            text, got = report(scene, rng, None if label == "none" else label)
            qa.append((report_question(text, "simple", rng), report_answer(got, "simple")))
        out += _single_round_groups(f"world-check:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


def _world_omit(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import count_question
    from ..data.world.report import omission_checks

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 49979687, words=False, n_objects=(2, 5))
        qa = omission_checks(scene, rng) + [count_question(scene, rng, total_only=True)]
        out += _single_round_groups(f"world-omit:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


_ROWS = ("top row", "middle row", "bottom row")
_COLUMNS = ("left column", "middle column", "right column")


def _world_count(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import COUNT_TEMPLATES, count_question
    from ..data.world.scene import POSITIONS, SIZES

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 32452843, words=False, n_objects=(1, 5))
        n = str(len(scene.objects))
        cells = [POSITIONS.index(scene.position(o)) for o in scene.objects]
        qa = [(COUNT_TEMPLATES[j], n) for j in rng.permutation(len(COUNT_TEMPLATES))[:2]]
        qa += [(f"How many {size} shapes are there?", str(sum(o.size == size for o in scene.objects)))
               for size in SIZES]
        qa += [(f"How many shapes are in the {name}?", str(sum(c // 3 == r for c in cells)))
               for r, name in enumerate(_ROWS)]
        qa += [(f"How many shapes are in the {name}?", str(sum(c % 3 == k for c in cells)))
               for k, name in enumerate(_COLUMNS)]
        while len(qa) < 12:  # two colour or shape counts (count_question's kinds 1 and 2)
            q = count_question(scene, rng)
            if q[0] not in COUNT_TEMPLATES and q[0] not in {x for x, _ in qa}:
                qa.append(q)
        out += _single_round_groups(f"world-count:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


def _world_caption(src: DataSource) -> list[ImageGroup]:
    from ..data.world import caption

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 7919, words=bool(i % 10 < 3))
        out.append(ImageGroup(f"world-caption:{src.seed}:{i}", lambda s=scene: _render(s),
                              ((("Describe the image briefly.", caption(scene, rng)),),)))
    return out


def _world_qa(src: DataSource) -> list[ImageGroup]:
    from ..data.world.language import (colour_question, count_question, exists_question, position_question,
                                       read_question, shape_question)

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 3, words=bool(i % 10 < 3))
        qa = [count_question(scene, rng, total_only=True), count_question(scene, rng),
              exists_question(scene, rng, answer=True), exists_question(scene, rng, answer=False)]
        for o in scene.objects:
            qa += [colour_question(scene, o, rng), shape_question(scene, o, rng), position_question(scene, o, rng),
                   read_question(scene, o, rng)]
        out += _single_round_groups(f"world-qa:{src.seed}:{i}", scene, qa, rng, src.questions_per_image)
    return out


def _world_report(src: DataSource) -> list[ImageGroup]:
    from ..data.world.report import report, report_answer, report_question

    out = []
    for i in range(src.n or 1000):
        rng, scene = _world_scene(i, src.seed + 104729, words=False)
        if not 2 <= len(scene.objects) <= 8:
            continue
        blocks = []
        wrong = ("insert", "remove", "substitute")[int(rng.integers(3))]
        for label, level in (("none", "simple"), (wrong, "simple"), ("none", "complex"), ("insert", "complex"),
                             ("remove", "complex"), ("substitute", "complex")):
            text, lab = report(scene, rng, None if label == "none" else label)
            blocks.append(((report_question(text, level, rng), report_answer(lab, level)),))
        out.append(ImageGroup(f"world-report:{src.seed}:{i}", lambda s=scene: _render(s), tuple(blocks)))
    return out


def _llava_json(src: DataSource) -> list[ImageGroup]:
    from ..data.conversation import read_llava_json
    from ..data.images import load_image

    out = []
    for s in read_llava_json(src.path, src.image_root):
        if len(s.images) != 1:
            raise InputError(f"{src.path}: sample {s.id!r} has {len(s.images)} images; packed training "
                             f"takes exactly one image per sample")
        turns = [(r, t) for r, t in s.turns if r != "system"]
        rounds = tuple((q.replace("<image>", "").strip(), a) for (_, q), (_, a) in zip(turns[0::2], turns[1::2]))
        img = s.images[0]
        out.append(ImageGroup(f"llava-json:{img}", lambda p=img: load_image(p), (rounds,)))
    return out[: src.n] if src.n else out


def mix(groups_per_source: Sequence[tuple[list[ImageGroup], float]], steps_groups: int, seed: int) -> list[int]:
    """Deterministic order of (source, index) draws by weight: returns flat indices into the concatenation."""
    offsets = np.cumsum([0] + [len(g) for g, _ in groups_per_source])
    weights = np.array([w for _, w in groups_per_source], dtype=float)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    perms = [list(rng.permutation(len(g))) for g, _ in groups_per_source]
    cursors = [0] * len(perms)
    order = []
    for src in rng.choice(len(perms), size=steps_groups, p=weights):
        if cursors[src] == len(perms[src]):
            perms[src], cursors[src] = list(rng.permutation(len(perms[src]))), 0
        order.append(int(offsets[src] + perms[src][cursors[src]]))
        cursors[src] += 1
    return order
