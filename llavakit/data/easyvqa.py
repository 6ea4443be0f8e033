"""The easy-VQA dataset (PyPI `easy-vqa` 1.0, MIT, github.com/vzhou842/easy-VQA) as Samples and eval items.

What the package ships (checked against its files; the tests re-check the counts):

- 4,000 train / 1,000 test images, 64x64 RGB PNGs, each one coloured shape on a white background;
- 38,575 train / 9,673 test questions (2 to 21 per image), no duplicate (question, image) pairs;
- 13 answers (`ANSWERS`, in the package's `answers.txt` order): yes/no (28,407 train / 7,136 test
  questions), 3 shapes (circle, rectangle, triangle) and 8 colours;
- questions are lower case and every one ends with "?" ("what is the blue shape?", "does the image not
  contain a gray shape?"); answers are single lower-case words.

Choices that are ours:

- A question becomes the user turn `"<image>\\n" + question` (verbatim), the answer the assistant turn
  (verbatim) — what `VLM.chat(question, images=path)` renders at inference.
- Ids: `easyvqa-{split}-q{question index}` (one question per sample) or `easyvqa-{split}-img{image id}`
  (`pack_per_image=True`: all of an image's questions as one multi-round sample, in a seeded order).
  Caveat of packing: later rounds can see earlier answers ("is there a red shape?" -> "yes" before
  "what color is the shape?"), a shortcut that does not exist when questions are asked one at a time;
  it trades that for speed.
- Order: a seeded permutation (numpy `default_rng(seed)`), then the first `limit`; same seed, same list.
- The test split is for evaluation only: `easyvqa_samples("test")` raises unless `allow_test=True`;
  evaluation uses `easyvqa_items`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .conversation import Sample
from .templates import IMAGE_TAG

ANSWERS = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
           "brown", "blue", "no")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SPLITS = ("train", "test")
# Sizes of easy-vqa 1.0 (data/README.md of the package): split -> (questions, images).
COUNTS = {"train": (38_575, 4_000), "test": (9_673, 1_000)}


@dataclass(frozen=True)
class EasyVQAItem:
    """One evaluation question. `kind` is "yes/no", "shape" or "color" (from the answer)."""

    id: str
    image: str  # path to the 64x64 PNG
    image_id: int
    question: str
    answer: str
    kind: str


def answer_kind(answer: str) -> str:
    """"yes/no", "shape" or "color" for one of the 13 answers."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise InputError(f"{answer!r} is not an easy-vqa answer; valid: {', '.join(ANSWERS)}")


@functools.lru_cache(maxsize=2)
def _load(split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], dict[int, str]]:
    """(questions, answers, image ids, image id -> path) of a split, read once from the package."""
    if split not in SPLITS:
        raise InputError(f"unknown easy-vqa split {split!r}; valid: {', '.join(SPLITS)}")
    try:
        import easy_vqa
    except ImportError:
        raise InputError("the easy-vqa dataset needs the `easy-vqa` package: pip install easy-vqa") from None
    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    missing = sorted(set(ids) - set(paths))
    if missing:
        raise InputError(f"easy-vqa {split}: questions refer to images {missing[:5]} that are not installed")
    return tuple(qs), tuple(ans), tuple(int(i) for i in ids), dict(paths)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise InputError(f"limit must be a positive int or None, got {limit!r}")


def easyvqa_samples(split: str = "train", limit: int | None = None, seed: int = 0, pack_per_image: bool = False,
                    *, allow_test: bool = False) -> list[Sample]:
    """Training samples: one per question, or one multi-round sample per image (`pack_per_image`).

    `limit` counts samples (questions, or images when packing), taken after a seeded shuffle.
    Raises InputError for the test split unless `allow_test=True`.
    """
    if split == "test" and not allow_test:
        raise InputError("the easy-vqa test split is for evaluation only (use easyvqa_items('test')); "
                         "pass allow_test=True if you really mean to train on it")
    _check_limit(limit)
    qs, ans, ids, paths = _load(split)
    rng = np.random.default_rng(seed)
    if not pack_per_image:
        order = rng.permutation(len(qs))[:limit]
        return [Sample(id=f"easyvqa-{split}-q{i}", images=(paths[ids[i]],),
                       turns=(("user", f"{IMAGE_TAG}\n{qs[i]}"), ("assistant", ans[i]))) for i in order]
    by_image: dict[int, list[int]] = {}
    for i, im in enumerate(ids):
        by_image.setdefault(im, []).append(i)
    images = sorted(by_image)
    out = []
    for j in rng.permutation(len(images))[:limit]:
        im = images[j]
        qidx = [by_image[im][k] for k in rng.permutation(len(by_image[im]))]
        turns: list[tuple[str, str]] = []
        for n, i in enumerate(qidx):
            turns += [("user", (f"{IMAGE_TAG}\n" if n == 0 else "") + qs[i]), ("assistant", ans[i])]
        out.append(Sample(id=f"easyvqa-{split}-img{im}", images=(paths[im],), turns=tuple(turns)))
    return out


def easyvqa_items(split: str = "test", limit: int | None = None, seed: int = 0) -> list[EasyVQAItem]:
    """Evaluation questions: a seeded shuffle of the split, then the first `limit` (deterministic)."""
    _check_limit(limit)
    qs, ans, ids, paths = _load(split)
    order = np.random.default_rng(seed).permutation(len(qs))[:limit]
    return [EasyVQAItem(id=f"easyvqa-{split}-q{i}", image=paths[ids[i]], image_id=ids[i], question=qs[i],
                        answer=ans[i], kind=answer_kind(ans[i])) for i in order]
