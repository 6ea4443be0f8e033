"""benchmarks/average_runs.py: the merged LoRA update of the average is the mean of the runs' updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.benchmarks import load_benchmark


def _module():
    return load_benchmark("average_runs")


def _run(path: Path, seed: int, mean: torch.Tensor, meta: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {"feature_mean": mean, "multi_modal_projector.linear_1.weight": torch.randn(4, 3, generator=g),
             "lora.layers.0.q_proj.lora_A.weight": torch.randn(2, 5, generator=g),  # (r, in)
             "lora.layers.0.q_proj.lora_B.weight": torch.randn(6, 2, generator=g)}  # (out, r)
    path.mkdir()
    save_file(state, str(path / "trained.safetensors"),
              metadata=meta or {"stage": "instruct", "lora": json.dumps({"r": 2, "alpha": 4, "targets": ["q_proj"]})})
    return path / "trained.safetensors"


def _load(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_average_is_exact_for_the_lora_update_and_the_projector(tmp_path):
    mod = _module()
    mean = torch.arange(3.0)
    files = [_run(tmp_path / f"r{i}", i, mean) for i in range(3)]
    assert mod.main([str(f.parent) for f in files] + ["--out", str(tmp_path / "avg")]) == 0
    out, meta = _load(tmp_path / "avg" / "trained.safetensors")
    runs = [_load(f)[0] for f in files]
    a, b = "lora.layers.0.q_proj.lora_A.weight", "lora.layers.0.q_proj.lora_B.weight"
    spec = json.loads(meta["lora"])
    assert (spec["r"], spec["alpha"]) == (6, 12) and out[a].shape == (6, 5) and out[b].shape == (6, 6)
    merged = spec["alpha"] / spec["r"] * out[b] @ out[a]
    expected = sum(2.0 * r[b] @ r[a] for r in runs) / 3  # each run's alpha / r = 2
    torch.testing.assert_close(merged, expected)
    proj = "multi_modal_projector.linear_1.weight"
    torch.testing.assert_close(out[proj], sum(r[proj] for r in runs) / 3)
    assert torch.equal(out["feature_mean"], mean) and meta["stage"] == "instruct"
    assert len(json.loads(meta["averaged_from"])) == 3


def test_mismatched_runs_are_refused_and_nothing_is_written(tmp_path, capsys):
    mod = _module()
    one = _run(tmp_path / "a", 0, torch.zeros(3))
    other_stats = _run(tmp_path / "b", 1, torch.ones(3))
    other_meta = _run(tmp_path / "c", 2, torch.zeros(3), {"stage": "pretrain", "lora": "null"})
    for bad in (other_stats, other_meta, tmp_path / "missing"):
        assert mod.main([str(one), str(bad), "--out", str(tmp_path / "avg")]) == 1
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()
    from llavakit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="two or more"):
        mod.average([one])
