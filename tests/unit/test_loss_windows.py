"""benchmarks/loss_windows.py: mean logged training loss over step windows."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_benchmark


def test_window_means_average_the_entries_inside_each_window_and_skip_nulls():
    mod = load_benchmark("loss_windows")
    recs = [{"step": 5, "loss": 0.4}, {"step": 10, "loss": None}, {"step": 15, "loss": 0.2},
            {"step": 20, "loss": 0.1}, {"step": 25, "loss": 0.3}]
    (m1, n1), (m2, n2), (m3, n3) = mod.window_means(recs, [(1, 15), (16, 25), (30, 40)])
    assert (m1, n1) == (pytest.approx(0.3), 2)  # 0.4 and 0.2; the null at step 10 is not an entry
    assert (m2, n2) == (pytest.approx(0.2), 2)
    assert (m3, n3) == (None, 0)


def test_windows_and_logs_are_checked(tmp_path, capsys):
    mod = load_benchmark("loss_windows")
    assert mod.parse_windows("1-100, 201-300") == [(1, 100), (201, 300)]
    for bad in ("5", "10-1", "a-b", ""):
        with pytest.raises(ValueError, match="--windows"):
            mod.parse_windows(bad)
    log = tmp_path / "loss.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": s / 100}) for s in (5, 10, 15)) + "\n")
    assert mod.main([str(log), "--windows", "1-10,11-20"]) == 0
    assert "1-10: 0.075 (2)\t11-20: 0.150 (1)" in capsys.readouterr().out
    assert mod.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "not a readable loss log" in capsys.readouterr().err
    assert mod.main([str(log), "--windows", "9"]) == 2
