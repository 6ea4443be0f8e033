"""benchmarks/schedule_shapes.py: probe schedules with a searched P-Sigmoid's budget in other shapes."""

from __future__ import annotations

import json

import pytest

from llavakit.errors import InputError
from llavakit.llm_hooks.schedule import PSigmoid
from tests.benchmarks import load_benchmark

K, L0, L = 0.09892200218030213, 7.402418687079346, 30


def _mean(ratios):  # a stand-in for relative LM prefill FLOPs: the mean keep ratio
    return sum(ratios) / len(ratios)


def _nonincreasing(r):
    return all(b <= a for a, b in zip(r, r[1:]))


def test_late_and_flat_shapes_keep_the_searched_sum_of_ratios():
    mod = load_benchmark("schedule_shapes")
    total = sum(PSigmoid(K, L0).ratios(L))
    late = mod.late_sigmoid(K, total, 4, L)
    assert late[:4] == [1.0] * 4 and late[4] < 1 and _nonincreasing(late) and len(late) == L
    assert sum(late) == pytest.approx(total, abs=1e-9)
    for whole in (1, 8):
        flat = mod.late_flat(total, whole, L)
        assert flat[:whole] == [1.0] * whole and len(set(flat[whole:])) == 1
        assert sum(flat) == pytest.approx(total, abs=1e-9)


def test_budget_moves_l0_to_the_largest_value_within_the_budget():
    mod = load_benchmark("schedule_shapes")
    l0 = mod.psigmoid_at_budget(K, L, _mean, 0.5)
    assert _mean(PSigmoid(K, l0).ratios(L)) <= 0.5
    assert _mean(PSigmoid(K, l0 + 1e-6).ratios(L)) > 0.5  # no later midpoint fits
    assert l0 > L0  # a larger budget than the searched schedule's: more tokens, a later midpoint


def test_shapes_prints_specs_that_parse_to_the_shapes():
    mod = load_benchmark("schedule_shapes")
    specs = mod.shapes(K, L0, L, _mean, 0.5)
    assert set(specs) == {"searched", "late", "flat", "late-flat", "budget"}
    assert mod.ratios_of(specs["searched"], L) == PSigmoid(K, L0).ratios(L)
    flat = mod.ratios_of(specs["flat"], L)
    assert specs["flat"] == "gsearch:ratios=1/0.3434" and flat[1:] == [0.3434] * (L - 1)  # padded
    assert mod.ratios_of(specs["late-flat"], L)[:8] == [1.0] * 8
    assert _mean(mod.ratios_of(specs["budget"], L)) <= 0.5
    assert "budget" not in mod.shapes(K, L0, L, None, None)


def test_impossible_shapes_are_clear_errors(tmp_path):
    mod = load_benchmark("schedule_shapes")
    with pytest.raises(InputError, match="cannot sum"):
        mod.late_flat(5.0, 8, L)  # 8 whole layers already exceed a sum of 5
    with pytest.raises(InputError, match="whole layers"):
        mod.late_sigmoid(K, 10.0, 0, L)
    with pytest.raises(InputError, match="no value"):
        mod.psigmoid_at_budget(K, L, _mean, 0.0)  # a budget no schedule meets
    with pytest.raises(SystemExit, match="no schedule file"):
        mod.main(["--schedule", str(tmp_path / "missing.json")])
    gs = tmp_path / "gsearch.json"
    gs.write_text(json.dumps({"method": "gsearch", "ratios": [1.0, 0.5]}))
    with pytest.raises(SystemExit, match="not psigmoid"):
        mod.main(["--schedule", str(gs)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not JSON"):
        mod.main(["--schedule", str(bad)])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"method": "psigmoid", "k": 0.1, "l0": 7.0}))
    with pytest.raises(SystemExit, match="lacks num_visual, num_text"):
        mod.main(["--schedule", str(bare)])
    bare.write_text(json.dumps({"method": "psigmoid", "k": "steep", "l0": 7.0, "num_visual": 256, "num_text": 43}))
    with pytest.raises(SystemExit, match="must be numbers"):
        mod.main(["--schedule", str(bare)])
    bare.write_text(json.dumps({"method": "psigmoid", "k": 0.1, "l0": 7.0, "num_visual": 256, "num_text": 43}))
    with pytest.raises(SystemExit, match="--model"):
        mod.main(["--schedule", str(bare), "--model", str(tmp_path / "no-model")])
