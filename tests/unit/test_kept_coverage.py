"""benchmarks/kept_coverage.py: which object a world item asks about, and whether a kept mask covers it."""

from __future__ import annotations

import pytest
import torch

from llavakit.data.world import eval_items
from tests.benchmarks import load_benchmark


def test_asked_object_matches_each_item():
    mod = load_benchmark("kept_coverage")
    for task in mod.TASKS:
        for it in eval_items(task, 12, 0):
            objs = mod.asked_objects(task, it)
            if task == "world-count":
                assert len(objs) == int(it.answer)
            else:
                assert objs and all(it.answer in (o.colour, o.shape, it.scene.position(o)) for o in objs)


def test_coverage_counts_kept_patches_of_each_object():
    mod = load_benchmark("kept_coverage")
    it = eval_items("world-count", 4, 0)[3]  # several objects
    objs = mod.asked_objects("world-count", it)
    canvas, font = it.scene.canvas, it.scene.font_px
    full = torch.ones(16, 16, dtype=torch.bool)
    assert mod.coverage(full, objs, canvas, font) == (True, 1.0)
    assert mod.coverage(~full, objs, canvas, font) == (False, 0.0)
    one = torch.zeros(16, 16, dtype=torch.bool)  # one patch of the first object only
    first = mod.patches_of(objs[0].box(font), canvas, 16)[0]
    one.view(-1)[first] = True
    covered, share = mod.coverage(one, objs, canvas, font)
    assert covered == (len(objs) == 1) and 0.0 < share < 1.0
    with pytest.raises(ValueError, match="square"):
        mod.coverage(torch.ones(8, 16, dtype=torch.bool), objs, canvas, font)


def test_summary_splits_accuracy_by_coverage():
    mod = load_benchmark("kept_coverage")
    rows = [{"config": "c", "task": "world-count", "id": str(i), "objects": 2, "covered": i < 3, "share": 0.5}
            for i in range(4)]
    scores = {("c", "0"): 1.0, ("c", "1"): 1.0, ("c", "2"): 0.0, ("c", "3"): 0.0}
    (s,) = mod.summarise(rows, scores).values()
    assert (s["n"], s["covered_pct"], s["object_share_kept_pct"]) == (4, 75.0, 50.0)
    assert (s["acc_covered"], s["acc_uncovered"], s["acc_all"]) == (66.7, 0.0, 50.0)
