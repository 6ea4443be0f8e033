"""Scene reports with synthetic errors: the radiology report error-checking protocol on the world.

Protocol from "Exploring Multimodal Large Language Models for Radiology Report Error-checking"
(techniques.md #25, abstract level): an image and its report; some reports carry a synthetic error
(insert / remove / substitute). SIMPLE asks whether the report contains an error (yes/no); COMPLEX asks
which kind (none / insert / remove / substitute).

Here a report is one statement per object, in reading order of the 3x3 grid ("There is a large red
circle in the top left. There is a small blue star at the bottom."). The corruptions:

- insert: a statement about an object that is NOT in the image (random shape/colour/size, placed in
  an empty grid cell, in reading order like the others);
- remove: the statement about one object that IS in the image is dropped (the report misses it);
- substitute: one real object's statement gets a wrong colour or a wrong shape (50/50).

Ours: every corrupted report reads like a clean one (same templates, one statement per cell, reading
order, no object count stated), so the text alone cannot tell them apart. `sample_report_case` also
removes the length shortcut for SIMPLE: with n objects in the image and k statements in the report,
insert draws n uniform in 1..4 (k = n + 1), remove n uniform in 2..5 (k = n - 1), and none and
substitute n from (1, 2, 2, 2, 1)/8 over 1..5 (k = n). Then the distributions of n and of k are the
same for correct and erroneous reports; only comparing the two (or the attributes) tells. For COMPLEX
the ends still leak a little (k = 1 is never insert, k = 5 never remove).
"""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from .language import POSITION_PHRASES, describe
from .scene import COLOURS, POSITIONS, SHAPES, SIZES, RngLike, Scene, as_rng, pick, sample_scene

REPORT_LABELS = ("none", "insert", "remove", "substitute")
CORRUPTIONS = REPORT_LABELS[1:]

# One template per report (all statements use it); {phrase} = "large red circle", {where} = "in the top left".
STATEMENT_TEMPLATES = (
    "There is a {phrase} {where}.",
    "A {phrase} is {where}.",
    "{Where}, there is a {phrase}.",
)
SIMPLE_TEMPLATES = (
    "Does this report contain an error?",
    "Is there a mistake in this report?",
    "Does the following report contain an error?",
)
COMPLEX_TEMPLATE = "Which kind of error does this report contain: none, insert, remove or substitute?"
CHECK_TEMPLATE = "Is this statement about the image true? {statement}"
MISSING_TEMPLATE = "Which shape in the image does this report leave out?"
MENTIONS_TEMPLATE = "Does this report mention the shape {where}?"
STATEMENTS_TEMPLATE = "How many shapes does this report describe?"

# n (objects in the image) per label, see the module docstring.
_N_WEIGHTS = {
    "none": (1, 2, 2, 2, 1),
    "substitute": (1, 2, 2, 2, 1),
    "insert": (1, 1, 1, 1, 0),
    "remove": (0, 1, 1, 1, 1),
}


def _statement(template: str, size: str, colour: str, shape: str, position: str) -> str:
    where = POSITION_PHRASES[position]
    return template.format(phrase=f"{size} {colour} {shape}", where=where, Where=where[0].upper() + where[1:])


def report(scene: Scene, rng: RngLike = None, corrupt: str | None = None) -> tuple[str, str]:
    """(report text, label) for `scene`; label is "none" or the corruption applied (see module doc).

    Raises InputError for an unknown `corrupt`, "remove" on a one-object scene (the report would be
    empty) and "insert" on a scene with all 9 cells taken.
    """
    rng = as_rng(rng)
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise InputError(f"corrupt must be None or one of {CORRUPTIONS}, got {corrupt!r}")
    # (cell, size, colour, shape) per statement
    rows = [(POSITIONS.index(scene.position(o)), o.size, o.colour, o.shape) for o in scene.objects]
    if corrupt == "insert":
        free = [c for c in range(len(POSITIONS)) if c not in {r[0] for r in rows}]
        if not free:
            raise InputError("cannot insert a statement: every grid cell already holds an object")
        rows.append((pick(rng, free), pick(rng, SIZES), pick(rng, COLOURS), pick(rng, SHAPES)))
    elif corrupt == "remove":
        if len(rows) < 2:
            raise InputError("cannot remove a statement from a one-object scene (the report would be empty)")
        rows.pop(int(rng.integers(len(rows))))
    elif corrupt == "substitute":
        i = int(rng.integers(len(rows)))
        cell, size, colour, shape = rows[i]
        if rng.random() < 0.5:
            colour = pick(rng, [c for c in COLOURS if c != colour])
        else:
            shape = pick(rng, [s for s in SHAPES if s != shape])
        rows[i] = (cell, size, colour, shape)
    template = pick(rng, STATEMENT_TEMPLATES)
    return _report_text(template, rows), corrupt or "none"


def _report_text(template: str, rows: list[tuple[int, str, str, str]]) -> str:
    """A report: one statement per (cell, size, colour, shape) row, in the grid's reading order."""
    return " ".join(_statement(template, size, colour, shape, POSITIONS[cell])
                    for cell, size, colour, shape in sorted(rows, key=lambda r: r[0]))


def _with_report(head: str, text: str) -> str:
    return f"{head}\nReport: {text}"


def statement_checks(scene: Scene, rng: RngLike = None) -> list[tuple[str, str]]:
    """Single-statement checks in a report's own wording, one template per scene: each object's true
    statement ("yes") and one false statement per object ("no"), made like a report error: a substitute
    (the object with a wrong colour or shape, 50/50) or an insert (a random object in an empty cell),
    each half the time (substitute only when every cell is taken).

    Ours: a curriculum for SIMPLE report checking, which needs every statement checked against the image
    (docs/default-model-training.md, stage I).
    """
    rng = as_rng(rng)
    template = pick(rng, STATEMENT_TEMPLATES)
    cells = {POSITIONS.index(scene.position(o)) for o in scene.objects}
    free = [c for c in range(len(POSITIONS)) if c not in cells]
    out = []
    for o in scene.objects:
        where = scene.position(o)
        out.append((CHECK_TEMPLATE.format(statement=_statement(template, o.size, o.colour, o.shape, where)), "yes"))
        if free and rng.random() < 0.5:
            false = _statement(template, pick(rng, SIZES), pick(rng, COLOURS), pick(rng, SHAPES),
                               POSITIONS[pick(rng, free)])
        elif rng.random() < 0.5:
            false = _statement(template, o.size, pick(rng, [c for c in COLOURS if c != o.colour]), o.shape, where)
        else:
            false = _statement(template, o.size, o.colour, pick(rng, [s for s in SHAPES if s != o.shape]), where)
        out.append((CHECK_TEMPLATE.format(statement=false), "no"))
    return out


def omission_checks(scene: Scene, rng: RngLike = None) -> list[tuple[str, str]]:
    """Questions that teach finding a removed statement, for a scene of 2+ objects: two complete reports
    and two with one object's statement dropped (two different objects), each asked SIMPLE ("no" / "yes");
    "Which shape in the image does this report leave out?" for one complete report ("none") and one
    incomplete one (the dropped object, "a large red circle in the top left"); "Does this report mention
    the shape in the top left?" for the dropped object ("no") and for one kept object ("yes"); and "How
    many shapes does this report describe?" (the incomplete report's statement count).

    Ours: a curriculum for the remove error, which single-statement checks cannot teach (every statement
    of an incomplete report is true): the report has to be compared with the image object by object.
    """
    rng = as_rng(rng)
    if len(scene.objects) < 2:
        raise InputError("omission checks need a scene of 2 or more objects")
    template = pick(rng, STATEMENT_TEMPLATES)
    objs = sorted(scene.objects, key=lambda o: POSITIONS.index(scene.position(o)))
    rows = [(POSITIONS.index(scene.position(o)), o.size, o.colour, o.shape) for o in objs]

    def text(skip: int | None) -> str:
        return _report_text(template, [r for j, r in enumerate(rows) if j != skip])

    dropped = [int(j) for j in rng.permutation(len(objs))[:2]]
    complete, partial = text(None), [text(j) for j in dropped]
    qa = [(report_question(complete, "simple", rng), "no"), (report_question(complete, "simple", rng), "no")]
    qa += [(report_question(t, "simple", rng), "yes") for t in partial]
    o = objs[dropped[0]]
    qa += [(_with_report(MISSING_TEMPLATE, complete), "none"),
           (_with_report(MISSING_TEMPLATE, partial[0]), describe(scene, o, word=False))]
    kept = pick(rng, [p for j, p in enumerate(objs) if j != dropped[0]])
    for obj, answer in ((o, "no"), (kept, "yes")):
        where = POSITION_PHRASES[scene.position(obj)]
        qa.append((_with_report(MENTIONS_TEMPLATE.format(where=where), partial[0]), answer))
    qa.append((_with_report(STATEMENTS_TEMPLATE, partial[1]), str(len(objs) - 1)))
    return qa


def report_question(text: str, level: str, rng: RngLike = None) -> str:
    """The SIMPLE (yes/no) or COMPLEX (error kind) question about report `text`."""
    rng = as_rng(rng)
    if level == "simple":
        head = pick(rng, SIMPLE_TEMPLATES)
    elif level == "complex":
        head = COMPLEX_TEMPLATE
    else:
        raise InputError(f"level must be 'simple' or 'complex', got {level!r}")
    return _with_report(head, text)


def report_answer(label: str, level: str) -> str:
    """"yes"/"no" for SIMPLE, the label itself for COMPLEX."""
    if label not in REPORT_LABELS:
        raise InputError(f"label must be one of {REPORT_LABELS}, got {label!r}")
    if level == "simple":
        return "no" if label == "none" else "yes"
    return label


def sample_report_case(
    rng: RngLike, label: str, *, canvas: int = 224, split: str | None = None
) -> tuple[Scene, str, str]:
    """(scene, report text, label) with the object count drawn for `label` as in the module docstring."""
    rng = as_rng(rng)
    if label not in REPORT_LABELS:
        raise InputError(f"label must be one of {REPORT_LABELS}, got {label!r}")
    w = np.array(_N_WEIGHTS[label], dtype=float)
    n = 1 + int(rng.choice(len(w), p=w / w.sum()))
    scene = sample_scene(rng, canvas=canvas, n_objects=n, split=split)
    text, got = report(scene, rng, None if label == "none" else label)
    return scene, text, got
