"""benchmarks/binding_probe.py: the attention probe learns a colour-shape binding, with and without its context branch."""

from __future__ import annotations

import torch

from tests.benchmarks import load_benchmark


def _probe_module():
    return load_benchmark("binding_probe")


def _scenes(n: int, g: torch.Generator, shape_at_centre_only: bool):
    """Synthetic 4x4 patch grids, 2 objects per scene (2x2 patches each, distinct colour and shape).
    Colour is one-hot in channels 0-5 of every patch of an object; shape one-hot in channels 6-10, on
    every patch or only on the object's top-left patch."""
    feats = torch.zeros(n, 16, 12)
    query, target = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        colours = torch.randperm(6, generator=g)[:2]
        shapes = torch.randperm(5, generator=g)[:2]
        for k, (r0, c0) in enumerate(((0, 0), (2, 2))):
            for dr in range(2):
                for dc in range(2):
                    p = (r0 + dr) * 4 + c0 + dc
                    feats[i, p, colours[k]] = 1
                    if not shape_at_centre_only or dr == dc == 0:
                        feats[i, p, 6 + shapes[k]] = 1
        k = int(torch.randint(0, 2, (1,), generator=g))
        query[i], target[i] = shapes[k], colours[k]  # "what colour is the <shape>?"
    return feats + 0.05 * torch.randn(feats.shape, generator=g), query, target


def test_probe_binds_colour_to_a_named_shape_and_neighbourhood_context_helps():
    mod = _probe_module()
    g = torch.Generator().manual_seed(0)
    feats, q, t = _scenes(600, g, shape_at_centre_only=False)
    multi = torch.ones(600, dtype=torch.bool)
    res = mod.fit(feats, q, t, multi, 5, 6, 480, 300, 0)
    assert res["accuracy"] >= 90 and res["held_out"] == 120 and res["held_out_2plus"] == 120
    # Shape on one patch of each object only; the probe with its 3x3 context branch still binds.
    feats, q, t = _scenes(600, g, shape_at_centre_only=True)
    with_ctx = mod.fit(feats, q, t, multi, 5, 6, 480, 300, 0, context=16)
    assert with_ctx["accuracy"] >= 90
    probe = mod.AttentionProbe(12, 5, 6, context=16)
    assert probe(feats[:3], q[:3]).shape == (3, 6)  # (B, classes)
