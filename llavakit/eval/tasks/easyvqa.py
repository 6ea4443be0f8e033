"""easy-VQA (PyPI `easy-vqa`, MIT): 9,673 test questions about 1,000 64x64 single-shape images.

Items come from `llavakit.data.easyvqa.easyvqa_items("test", limit, seed)` (a seeded shuffle, then the
first `limit`; default: the whole test split). The prompt is the question verbatim plus
" Answer with one word."; the answer is the package's single lower-case word.
`choices` is the answer set of the question's kind (yes/no: 2, shape: 3, colour: 8), so the chance
baseline is the mean of 1/2, 1/3 and 1/8 over the evaluated questions, not 1/13; `kind` ("yes/no",
"shape", "color") drives the per-kind breakdown. easy-vqa's wording alone predicts yes/no ~80 % of the
time: compare with the shuffled-image control before believing a yes/no score.
"""

from __future__ import annotations

from ...data.easyvqa import COLORS, SHAPES, easyvqa_items
from .. import EvalItem, answer_suffix
from ..scoring import exact_match

INSTRUCTION = "Answer with one word."
KIND_CHOICES = {"yes/no": ("yes", "no"), "shape": SHAPES, "color": COLORS}


class EasyVQATask:
    """The easy-vqa test split as single-question items."""

    name = "easyvqa"
    description = "easy-vqa test split: colour / shape / yes-no questions about one shape (64x64)"

    def items(self, limit: int | None, seed: int) -> list[EvalItem]:
        return [EvalItem(id=q.id, images=(q.image,), prompt=answer_suffix(q.question, INSTRUCTION), answer=q.answer,
                         choices=tuple(KIND_CHOICES[q.kind]), kind=q.kind)
                for q in easyvqa_items("test", limit=limit, seed=seed)]

    def score(self, prediction: str, item: EvalItem) -> float:
        return exact_match(prediction, item.answer, item.choices)
