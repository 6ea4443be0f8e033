"""benchmarks/column_anchor.py: FasterVLM's top tokens plus one forced patch column (a diagnostic stage)."""

from __future__ import annotations

import pytest
import torch

from llavakit.compression.base import METHODS, StageContext
from llavakit.errors import InputError
from tests.benchmarks import load_benchmark


def _ctx(score: torch.Tensor, rows: int, cols: int) -> StageContext:
    return StageContext(grid=(rows, cols), cls_attention={3: score[:, None]}, feature_layer=3, num_layers=4)


def _inputs(rows: int, cols: int):
    t = rows * cols
    tokens = torch.arange(t, dtype=torch.float32)[None, :, None].expand(1, t, 2).clone()  # (1, T, 2)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([r.flatten(), c.flatten()], -1)[None]  # (1, T, 2)
    score = torch.zeros(1, t)
    score[0, [5, 6, 10]] = torch.tensor([3.0, 2.0, 1.0])  # the three best patches: (1,1), (1,2), (2,2)
    return tokens, positions, score


def test_anchor_column_is_always_kept_and_the_rest_is_fastervlm():
    mod = load_benchmark("column_anchor")
    rows = cols = 4
    tokens, positions, score = _inputs(rows, cols)
    left = mod.AnchoredFasterVLM(count=2, anchors="left")
    out, pos = left(tokens, positions, _ctx(score, rows, cols))
    assert left.num_out(16) == out.shape[1] == 6
    assert out[0, :, 0].tolist() == [0, 4, 5, 6, 8, 12]  # column 0 (0, 4, 8, 12) + the two best, raster order
    assert pos[0].tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [3, 0]]
    right, _ = mod.AnchoredFasterVLM(count=2, anchors="right")(tokens, positions, _ctx(score, rows, cols))
    assert right[0, :, 0].tolist() == [3, 5, 6, 7, 11, 15]
    cls, _ = mod.AnchoredFasterVLM(count=2, anchors="cls")(tokens, positions, _ctx(score, rows, cols))
    assert cls.shape[1] == 6 and {5, 6, 10} <= set(cls[0, :, 0].tolist())  # FasterVLM's own top-6


def test_anchor_refuses_bad_input_and_registers_only_when_asked():
    mod = load_benchmark("column_anchor")
    with pytest.raises(InputError, match="anchors must be one of cls, left, right"):
        mod.AnchoredFasterVLM(count=2, anchors="middle")
    tokens, positions, score = _inputs(4, 4)
    with pytest.raises(InputError, match="full square grid"):
        mod.AnchoredFasterVLM(count=2)(tokens[:, :8], positions[:, :8], _ctx(score[:, :8], 2, 4))
    assert "fastervlm_anchor" not in METHODS  # importing the script leaves the registry alone
