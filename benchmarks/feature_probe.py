"""Linear probes on the default vision features: do DINOv2's patch features carry colour, shape and position?

For synthetic-world training scenes (`llavakit.training.data._world_scene`, the scenes of the
`world-instruction` data source), take the feature of the patch under each object's centre (the
tower output after feature selection, what the projector reads; standardised per channel) and fit a
linear softmax classifier (Adam, 300 full-batch steps, small L2) for: the object's 3x3 grid cell
(what world-position asks), its colour, its shape, and its patch row and column (16-way). Scenes are
split 80/20 by object order; accuracy is on the held-out 20 %.

Features come from a training run's feature cache (`--cache`, the trainer's `features/` directory, keys
`world-instruction:SEED:i`) or, without it, are computed with the default model's tower (slower).

    python benchmarks/feature_probe.py --cache ~/.cache/llavakit/runs/default-instruct/features \
        --out docs/eval/feature-probe.json
    python benchmarks/feature_probe.py --scenes 300      # no cache: runs the tower on 300 scenes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def cached_features(cache: Path, keys: list[str]) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((cache / "index.json").read_text())
    missing = [k for k in keys if k not in index]
    if missing:
        raise SystemExit(f"error: {len(missing)} scenes are not in {cache} (first: {missing[0]}); use fewer --scenes")
    shards = {s: load_file(str(cache / f"features-{s:04d}.safetensors"))["features"]
              for s in sorted({index[k][0] for k in keys})}
    return [shards[index[k][0]][index[k][1]].float() for k in keys]


@torch.inference_mode()
def tower_features(scenes, layer: int | None = None) -> list[torch.Tensor]:
    """Patch features (N, D) of each scene: the default model's feature selection, or (`layer`, 1-based)
    that layer of its tower without the [CLS] token."""
    import llavakit
    from llavakit.data.world import render

    vlm = llavakit.load("default", trained=False)  # the tower and its feature selection only
    tower = vlm.model.vision_tower
    if layer is not None and not 1 <= layer <= vlm.model.config.vision.num_hidden_layers:
        raise SystemExit(f"error: the tower layer must be in 1..{vlm.model.config.vision.num_hidden_layers}, "
                         f"got {layer}")
    out = []
    for b in range(0, len(scenes), 16):
        imgs = [render(s) for s in scenes[b:b + 16]]
        pv = vlm.processor(text=["<image>"] * len(imgs), images=imgs)["pixel_values"]
        if layer is None:
            feats = vlm.model._select(pv)
        else:
            feats = tower(pv, layers=(layer,)).hidden_states[0][:, int(tower.has_cls):]  # (B, N, D)
        out += list(feats.float().unbind(0))
    return out


def save_report(out: str | None, script: str, argv, doc: dict) -> dict:
    """`doc` with the command that produced it first; written as JSON to `out` when given."""
    doc = {"command": " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]),
           **doc}
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
    return doc


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, train: int, steps: int = 300) -> float:
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:train] @ w + b, y[:train]) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[train:] @ w + b).argmax(1) == y[train:]).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="a training run's features/ directory")
    p.add_argument("--seed", type=int, default=0, help="the world-instruction data source's seed")
    p.add_argument("--scenes", type=int, default=3000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    from llavakit.data.world.scene import COLOURS, SHAPES
    from llavakit.training.data import _world_scene

    t0 = time.perf_counter()
    scenes = [_world_scene(i, a.seed, words=bool(i % 10 < 3))[1] for i in range(a.scenes)]
    keys = [f"world-instruction:{a.seed}:{i}" for i in range(a.scenes)]
    feats = cached_features(Path(a.cache).expanduser(), keys) if a.cache else tower_features(scenes)
    side = int(round(feats[0].shape[0] ** 0.5))
    x, labels = [], {"cell (3x3)": [], "colour": [], "shape": [], "patch row": [], "patch col": []}
    for scene, f in zip(scenes, feats):
        for obj, cell in zip(scene.objects, scene.cells()):
            r, c = min(obj.y * side // scene.canvas, side - 1), min(obj.x * side // scene.canvas, side - 1)
            x.append(f[r * side + c])
            for k, v in zip(labels, (cell, COLOURS.index(obj.colour), SHAPES.index(obj.shape), r, c)):
                labels[k].append(v)
    xs = torch.stack(x)
    xs = (xs - xs.mean(0)) / xs.std(0).clamp_min(1e-4)
    train = int(0.8 * len(xs))
    classes = {"cell (3x3)": 9, "colour": len(COLOURS), "shape": len(SHAPES), "patch row": side, "patch col": side}
    results = {}
    for k, y in labels.items():
        acc = probe(xs, torch.tensor(y), classes[k], train)
        results[k] = {"accuracy": round(100 * acc, 1), "chance": round(100 / classes[k], 1)}
        print(f"{k:>11}: held-out linear probe accuracy {100 * acc:5.1f} % (chance {100 / classes[k]:.1f} %)")
    save_report(a.out, "feature_probe.py", argv,
                {"scenes": a.scenes, "objects": len(xs), "held_out": len(xs) - train, "feature_dim": xs.shape[1],
                 "source": "cache" if a.cache else "tower", "results": results,
                 "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
