"""benchmarks/visual_depth_probe.py: patch lookup of object boxes and the held-out linear probe."""

from __future__ import annotations

import torch

from tests.benchmarks import load_benchmark


def test_patches_of_covers_exactly_the_overlapped_patches():
    mod = load_benchmark("visual_depth_probe")
    assert mod.patches_of((0, 0, 14, 14), 224, 16) == [0]
    assert mod.patches_of((10, 0, 20, 14), 224, 16) == [0, 1]  # straddles the first column edge
    assert mod.patches_of((210, 210, 224, 224), 224, 16) == [255]
    assert len(mod.patches_of((0, 0, 224, 224), 224, 16)) == 256


def test_probe_scores_held_out_items():
    mod = load_benchmark("visual_depth_probe")
    g = torch.Generator().manual_seed(0)
    labels = ["red", "blue"] * 40
    x = torch.randn(80, 6, generator=g)
    x[:, 0] += torch.tensor([6.0 if v == "red" else -6.0 for v in labels])  # separable on one channel
    train = torch.arange(80) < 60
    assert mod._probe(x, labels, train) >= 95.0
    noise = torch.randn(80, 6, generator=g)  # carries nothing: held-out accuracy near chance
    assert mod._probe(noise, labels, train) < 80.0


def test_probe_layers_cover_every_third_and_the_last():
    mod = load_benchmark("visual_depth_probe")
    assert mod.probe_layers(30) == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)
    assert mod.probe_layers(2) == (0, 1)
