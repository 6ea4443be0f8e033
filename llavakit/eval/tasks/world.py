"""The synthetic world's held-out tasks (`llavakit.data.world.EVAL_TASKS`), one parametrised class.

`WorldTask(name)` wraps `eval_items(name, n, seed)`: `limit` is n (default `DEFAULT_SIZE`, a multiple of
every task's balancing block, so answers are exactly balanced and the majority baseline equals chance).
Images are rendered eagerly at the world's default canvas (224 px) when `items` is called.
Each question gets the task's answer instruction (`INSTRUCTIONS`); world-multiround gets it on every
round and keeps all rounds in `EvalItem.rounds` (the harness asks round k with rounds 0..k-1 and their
gold answers in context). Report tasks carry the corruption ("none", "insert", ...) as `kind`.
"""

from __future__ import annotations

from ...data.world import EVAL_TASKS, eval_items
from ...errors import InputError
from .. import EvalItem, answer_suffix
from ..scoring import exact_match

DEFAULT_SIZE = 360  # lcm of the block sizes (6 colours, 5 shapes, 4 counts, 9 positions, 12 words, 6, 4) = 180, x2
INSTRUCTIONS = {
    "world-colour": "Answer with one word.",
    "world-shape": "Answer with one word.",
    "world-count": "Answer with a number.",
    "world-position": "Answer with one or two words.",
    "world-read": "Answer with one word.",
    "world-multiround": "Answer with one or two words.",
    "world-report-simple": "Answer yes or no.",
    "world-report-complex": "Answer with one word.",
}
DESCRIPTIONS = {
    "world-colour": "colour of the object named by its shape",
    "world-shape": "shape of the object named by its colour",
    "world-count": "number of shapes (1-4)",
    "world-position": "3x3 grid position of an object",
    "world-read": "word written under an object",
    "world-multiround": "2-4 closed rounds about one scene (score: fraction of rounds; consistency: all)",
    "world-report-simple": "does a scene report contain an error (yes/no)",
    "world-report-complex": "which error a scene report contains (none/insert/remove/substitute)",
}


class WorldTask:
    """One of the world's evaluation tasks (all eight share this class; the name picks the task)."""

    def __init__(self, name: str) -> None:
        if name not in EVAL_TASKS:
            raise InputError(f"unknown world task {name!r}; valid: {', '.join(EVAL_TASKS)}")
        self.name = name
        self.description = f"synthetic world: {DESCRIPTIONS.get(name, name)}"

    def items(self, limit: int | None, seed: int) -> list[EvalItem]:
        instruction = INSTRUCTIONS.get(self.name, "Answer with one word.")
        out = []
        for it in eval_items(self.name, DEFAULT_SIZE if limit is None else limit, seed):
            image = it.image() if callable(it.image) else it.image
            rounds = tuple((answer_suffix(q, instruction), a) for q, a in it.rounds) if len(it.rounds) > 1 else ()
            out.append(EvalItem(id=it.id, images=(image,), prompt=answer_suffix(it.question, instruction),
                                answer=it.answer, choices=tuple(it.choices), kind=it.detail,
                                rounds=rounds))
        return out

    def score(self, prediction: str, item: EvalItem) -> float:
        return exact_match(prediction, item.answer, item.choices)
