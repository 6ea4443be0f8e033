"""easy-vqa: package counts, Sample building, packing, the test-split guard, deterministic eval items."""

from __future__ import annotations

import collections
import os

import pytest

pytest.importorskip("easy_vqa")

from llavakit import InputError  # noqa: E402
from llavakit.data.easyvqa import (ANSWERS, COLORS, COUNTS, SHAPES, _load, answer_kind,  # noqa: E402
                                   easyvqa_items, easyvqa_samples)


@pytest.mark.parametrize("split", ["train", "test"])
def test_package_counts_and_phrasing(split):
    qs, ans, ids, paths = _load(split)
    assert (len(qs), len(paths)) == COUNTS[split]
    assert len(set(ids)) == len(paths)  # every image has questions
    assert all(q.endswith("?") and q == q.lower() and q == q.strip() for q in qs)
    assert set(ans) <= set(ANSWERS)
    n_yes_no = sum(a in ("yes", "no") for a in ans)
    assert n_yes_no == {"train": 28_407, "test": 7_136}[split]
    assert len(set(zip(qs, ids))) == len(qs)  # no duplicate (question, image) pairs


def test_answers_match_the_package():
    from easy_vqa import get_answers

    assert ANSWERS == tuple(get_answers())
    assert sorted(SHAPES + COLORS + ("yes", "no")) == sorted(ANSWERS)
    assert [answer_kind(a) for a in ("yes", "triangle", "teal")] == ["yes/no", "shape", "color"]
    with pytest.raises(InputError, match="not an easy-vqa answer"):
        answer_kind("purple")


def test_samples_one_question_each():
    samples = easyvqa_samples("train", limit=20, seed=3)
    assert len(samples) == 20 and len({s.id for s in samples}) == 20
    qs, ans, ids, paths = _load("train")
    for s in samples:
        i = int(s.id.split("-q")[1])
        assert s.turns == (("user", "<image>\n" + qs[i]), ("assistant", ans[i]))
        assert s.images == (paths[ids[i]],) and os.path.exists(s.images[0])
    assert easyvqa_samples("train", limit=20, seed=3) == samples
    assert easyvqa_samples("train", limit=20, seed=4) != samples
    assert easyvqa_samples("train", limit=5, seed=3) == samples[:5]


def test_pack_per_image_covers_every_question():
    packed = easyvqa_samples("train", pack_per_image=True)
    qs, ans, ids, _ = _load("train")
    assert len(packed) == 4_000 and sum(s.rounds() for s in packed) == 38_575
    per_image = collections.Counter(ids)
    s = packed[0]
    image_id = int(s.id.split("-img")[1])
    assert s.rounds() == per_image[image_id]
    assert s.turns[0][1].startswith("<image>\n") and sum("<image>" in t for _, t in s.turns) == 1
    want = sorted((q, a) for q, a, im in zip(qs, ans, ids) if im == image_id)
    got = sorted((s.turns[k][1].removeprefix("<image>\n"), s.turns[k + 1][1]) for k in range(0, len(s.turns), 2))
    assert got == want
    assert [x.id for x in easyvqa_samples("train", limit=3, pack_per_image=True)] == [x.id for x in packed[:3]]


def test_test_split_is_guarded():
    with pytest.raises(InputError, match="evaluation only"):
        easyvqa_samples("test")
    with pytest.raises(InputError, match="evaluation only"):
        easyvqa_samples("test", pack_per_image=True, limit=1)
    assert len(easyvqa_samples("test", limit=2, allow_test=True)) == 2


def test_eval_items_are_deterministic():
    items = easyvqa_items(limit=50)
    assert len(items) == 50 and all(x.id.startswith("easyvqa-test-q") for x in items)
    assert easyvqa_items(limit=50) == items and easyvqa_items(limit=10) == items[:10]
    assert easyvqa_items(limit=50, seed=1) != items
    x = items[0]
    qs, ans, ids, paths = _load("test")
    i = int(x.id.split("-q")[1])
    assert (x.question, x.answer, x.image_id, x.image) == (qs[i], ans[i], ids[i], paths[ids[i]])
    assert x.kind == answer_kind(x.answer)
    everything = easyvqa_items()
    assert len(everything) == 9_673 and len({e.id for e in everything}) == 9_673
    kinds = collections.Counter(e.kind for e in everything)
    assert kinds["yes/no"] == 7_136 and kinds["shape"] == 450 + 416 + 391


@pytest.mark.parametrize("kw,match", [({"split": "val"}, "unknown easy-vqa split"), ({"limit": 0}, "limit"),
                                      ({"limit": 2.5}, "limit")])
def test_bad_arguments(kw, match):
    with pytest.raises(InputError, match=match):
        easyvqa_items(**kw)
