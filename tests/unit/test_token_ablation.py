"""benchmarks/token_ablation.py: object-only vs without-object scoring of easy-vqa."""

from __future__ import annotations

import pytest
import torch

from llavakit.compression.base import StageContext
from llavakit.visual.fastervlm import FasterVLM
from tests.benchmarks import load_benchmark


def test_split_scores_separates_open_and_yes_no():
    mod = load_benchmark("token_ablation")
    s = mod.split_scores([{"answer": "red", "score": 1.0}, {"answer": "circle", "score": 0.0},
                          {"answer": "yes", "score": 1.0}, {"answer": "no", "score": 1.0}])
    assert s == {"all": {"n": 4, "accuracy": 75.0}, "open": {"n": 2, "accuracy": 50.0},
                 "yes/no": {"n": 2, "accuracy": 100.0}}


def test_hide_top_cls_keeps_exactly_what_fastervlm_drops():
    mod = load_benchmark("token_ablation")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 5, generator=g)  # (N, T, D)
    rows = torch.arange(16)
    pos = torch.stack([rows // 4, rows % 4], -1)[None].expand(2, 16, 2).contiguous()  # (N, T, 2)
    ctx = StageContext(grid=(4, 4), cls_attention={3: torch.rand(2, 2, 16, generator=g)}, feature_layer=3,
                       num_layers=4)
    _, kept = FasterVLM(keep=0.25)(tokens, pos, ctx)
    _, rest = mod.HideTopCls(drop=0.25)(tokens, pos, ctx)
    assert kept.shape[1] == 4 and rest.shape[1] == 12
    for i in range(2):
        a = {tuple(p) for p in kept[i].tolist()}
        b = {tuple(p) for p in rest[i].tolist()}
        assert not a & b and len(a | b) == 16
    with pytest.raises(ValueError, match="drop"):
        mod.HideTopCls(drop=1.0)


def test_bad_keeps_are_refused_before_any_model_loads(capsys):
    mod = load_benchmark("token_ablation")
    with pytest.raises(SystemExit):
        mod.main(["--keeps", "0.1,1.5"])
    assert "--keeps" in capsys.readouterr().err


def test_grid_by_kind_counts_the_wrong_open_answers(tmp_path, capsys):
    import json

    mod = load_benchmark("grid_by_kind")
    rows = [{"config": "a", "answer": "red", "prediction": "Blue.", "score": 0.0},
            {"config": "a", "answer": "green", "prediction": "blue", "score": 0.0},
            {"config": "a", "answer": "circle", "prediction": "circle", "score": 1.0},
            {"config": "a", "answer": "yes", "prediction": "no", "score": 0.0}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dict(mod.wrong_open(str(path))["a"]) == {"blue": 2}
    assert mod.main([str(path), "--wrong", "2"]) == 0
    assert "2: blue 2" in capsys.readouterr().out
    assert mod.main([str(path), "--wrong"]) == 2
    (tmp_path / "grid").mkdir()
    path.rename(tmp_path / "grid" / "grid_predictions.jsonl")
    assert mod.main([str(tmp_path / "grid")]) == 0  # a grid's directory reads its predictions file
    assert "open" in capsys.readouterr().out
    assert mod.main([str(tmp_path / "nowhere")]) == 2
    assert "no predictions file" in capsys.readouterr().err


def test_grid_by_kind_help(capsys):
    mod = load_benchmark("grid_by_kind")
    assert mod.main(["--help"]) == 0
    assert "--wrong" in capsys.readouterr().out
