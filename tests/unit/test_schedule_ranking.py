"""benchmarks/schedule_ranking.py: P-Sigmoid's schedule with other choices of the tokens kept (a diagnostic)."""

from __future__ import annotations

import pytest
import torch

from llavakit.compression.base import METHODS
from llavakit.errors import InputError
from llavakit.llm_hooks.schedule import PSigmoid
from tests.benchmarks import load_benchmark


def _att() -> tuple[torch.Tensor, torch.Tensor]:
    """(H=2, R=2, T=10) attention rows; visual positions 1..8, text positions 0 and 9.

    per position:      text (mean, mean)  last (row 1)  headmax  rowmax
      1: head 0 row 0 .8       .2             0           .4       .4
      2: head 1 row 1 .7       .175           .35         .35      .35
      3: every entry .3        .3             .3          .3       .3
      4: row 0, both heads .5  .25            0           .25      .5
    """
    visual = torch.zeros(10, dtype=torch.bool)
    visual[1:9] = True
    att = torch.zeros(2, 2, 10)  # (H, R, T)
    att[0, 0, 1] = 0.8
    att[1, 1, 2] = 0.7
    att[:, :, 3] = 0.3
    att[:, 0, 4] = 0.5
    att[:, :, 0] = 1.0  # a text position: never chosen
    return att, visual


def test_each_rank_picks_its_own_top_token():
    mod = load_benchmark("schedule_ranking")
    att, visual = _att()
    top = {r: mod.RankedPSigmoid(rank=r).select(att, visual, 1).tolist() for r in mod.RANKS}
    assert top == {"text": [3], "last": [2], "headmax": [1], "rowmax": [4]}
    for k in (1, 3, 8):  # rank=text is the paper's rule, as psigmoid itself selects
        assert mod.RankedPSigmoid(rank="text").select(att, visual, k).tolist() == \
            PSigmoid().select(att, visual, k).tolist()
    assert 0 not in mod.RankedPSigmoid(rank="rowmax").select(att, visual, 8).tolist()  # visual only


def test_anchors_spread_evenly_in_raster_order_then_rank():
    mod = load_benchmark("schedule_ranking")
    att, visual = _att()
    grid = mod.RankedPSigmoid(anchors=1).select(att, visual, 3)
    assert sorted(grid.tolist()) == [1, 5, 8]  # positions 1..8 at indices 0, 3.5 -> 4, 7: no attention used
    half = mod.RankedPSigmoid(anchors=0.5).select(att, visual, 2)
    assert sorted(half.tolist()) == [1, 3]  # one anchor (the first visual position), then text's best (3)
    assert sorted(mod.RankedPSigmoid(anchors=0.5).select(att, visual, 4).tolist()) == [1, 3, 4, 8]
    assert len(mod.RankedPSigmoid(anchors=1).select(att, visual, 8).unique()) == 8  # k = n: every token once


def test_bad_input_is_named_and_importing_leaves_the_registry_alone():
    mod = load_benchmark("schedule_ranking")
    with pytest.raises(InputError, match="rank must be one of text, last, headmax, rowmax"):
        mod.RankedPSigmoid(rank="cls")
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(InputError, match=r"anchors must be a share in \[0, 1\]"):
            mod.RankedPSigmoid(anchors=bad)
    with pytest.raises(InputError, match="k must be"):
        mod.RankedPSigmoid(k=-1)  # psigmoid's own checks still apply
    with pytest.raises(InputError, match="unknown"):
        mod._build(k=0.1, window=3)
    assert mod.parse_configs("rank=last, anchors=0.25") == ["rank=last", "anchors=0.25"]
    for bad in ("rank=cls", "anchors=2", "anchors=x", "keep=0.5", ""):
        with pytest.raises(InputError, match="--configs"):
            mod.parse_configs(bad)
    assert mod.main(["--configs", "rank=cls", "--out", "unused"]) == 2  # before any model is loaded
    assert "psigmoid_rank" not in METHODS


def test_run_evals_runs_one_eval_per_spec_and_stops_at_the_first_failure(monkeypatch):
    import llavakit.cli

    mod = load_benchmark("diagnostic_evals")
    calls = []
    monkeypatch.setattr(llavakit.cli, "main", lambda args: calls.append(args) or (3 if "bad" in args else 0))
    assert mod.run_evals([("a:x=1", "OUT/a"), ("b", "OUT/b")], "world-count", 8, "W.safetensors") == 0
    assert calls[0] == ["eval", "--model", "default", "--dtype", "bfloat16", "--no-progress", "--tasks",
                        "world-count", "--limit", "8", "--compression", "a:x=1", "--out", "OUT/a",
                        "--weights", "W.safetensors"]
    assert calls[1][-4:] == ["--out", "OUT/b", "--weights", "W.safetensors"]
    calls.clear()
    assert mod.run_evals([("bad", "OUT/1"), ("c", "OUT/2")], "world-count", 8) == 3  # its exit code
    assert len(calls) == 1 and "--weights" not in calls[0]  # stopped; no weights given, none passed
