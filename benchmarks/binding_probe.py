"""Can one attention hop over the frozen vision features bind a colour to a named shape?

Issue 3's default model names *a* colour in the scene rather than the colour of the object asked about
(world-colour ~45 %), although linear probes read colour and shape from each object's patch at 98-99 %
(`benchmarks/feature_probe.py`). This probe separates "the features cannot support binding" from "the
language model has not learnt to do it": a single learned query per asked-about attribute (shape ->
colour, and colour -> shape) attends over the 256 standardised patch features of a synthetic-world
training scene (one softmax attention layer, `--heads` heads, value projection, linear read-out), trained
with Adam on 80 % of the scenes and scored on the held-out 20 %. Only objects with a unique shape
(resp. colour) in their scene are asked about, as in `world-colour` / `world-shape`; accuracy is reported
overall and for scenes with 2+ objects (where binding is needed).

The probe is ours (not from a paper). Features come from a training run's feature cache (keys
`world-instruction:SEED:i`, as `feature_probe.py`).

    python benchmarks/binding_probe.py --cache ~/.cache/llavakit/runs/default-instruct/features \
        --out docs/eval/binding-probe.json
    python benchmarks/binding_probe.py --tower-layer 8 --steps 250 --out docs/eval/binding-probe-250-layer8.json
        # features computed from a middle layer of the tower instead of read from a cache
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_probe import cached_features, save_report, tower_features  # noqa: E402


class AttentionProbe(nn.Module):
    """One learned query per asked value; softmax attention over patches; linear read-out."""

    def __init__(self, dim: int, n_queries: int, n_classes: int, heads: int = 4, inner: int = 32,
                 context: int = 0):
        super().__init__()
        self.heads, self.inner = heads, inner
        # context > 0: each patch also sees its 3x3 neighbourhood (a conv to `context` channels) before
        # the attention, as a projector with local context would give the LM.
        self.ctx = nn.Conv2d(dim, context, 3, padding=1) if context else None
        dim += context
        self.q = nn.Embedding(n_queries, heads * inner)
        self.k = nn.Linear(dim, heads * inner)
        self.v = nn.Linear(dim, heads * inner)
        self.out = nn.Linear(heads * inner, n_classes)

    def forward(self, feats: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, n, d = feats.shape  # (B, N, D)
        if self.ctx is not None:
            side = int(round(n ** 0.5))
            grid = feats.transpose(1, 2).reshape(b, d, side, side)  # (B, D, S, S)
            c = torch.nn.functional.gelu(self.ctx(grid)).flatten(2).transpose(1, 2)  # (B, N, C)
            feats = torch.cat([feats, c], -1)  # (B, N, D + C)
        q = self.q(query).view(b, self.heads, 1, self.inner)  # (B, H, 1, d)
        k = self.k(feats).view(b, n, self.heads, self.inner).transpose(1, 2)  # (B, H, N, d)
        v = self.v(feats).view(b, n, self.heads, self.inner).transpose(1, 2)  # (B, H, N, d)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d)
        return self.out(att.reshape(b, -1))  # (B, C)


def fit(feats, query, target, multi, n_q, n_c, train, steps, seed, context=0) -> dict:
    torch.manual_seed(seed)
    model = AttentionProbe(feats.shape[-1], n_q, n_c, context=context)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, train, (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(feats[idx], query[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.cat([model(feats[i:i + 512], query[i:i + 512]).argmax(1)
                          for i in range(train, len(feats), 512)])
    ok = pred == target[train:]
    m = multi[train:]
    return {"accuracy": round(100 * float(ok.float().mean()), 1),
            "accuracy_2plus_objects": round(100 * float(ok[m].float().mean()), 1),
            "held_out": int(len(ok)), "held_out_2plus": int(m.sum()), "final_train_loss": round(float(loss.detach()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="a training run's features/ directory")
    src.add_argument("--tower-layer", type=int,
                     help="compute the features instead, from this layer of the default model's tower (1-based)")
    p.add_argument("--seed", type=int, default=0, help="the world-instruction data source's seed")
    p.add_argument("--scenes", type=int, default=3000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--context", type=int, default=0,
                   help="channels of a 3x3 neighbourhood conv added to each patch before the attention (0: none)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from llavakit.data.world.scene import COLOURS, SHAPES
    from llavakit.training.data import _world_scene

    t0 = time.perf_counter()
    scenes = [_world_scene(i, a.seed, words=bool(i % 10 < 3))[1] for i in range(a.scenes)]
    if a.cache:
        feats = torch.stack(cached_features(Path(a.cache).expanduser(),
                                            [f"world-instruction:{a.seed}:{i}" for i in range(a.scenes)]))  # (S, N, D)
    else:
        feats = torch.stack(tower_features(scenes, a.tower_layer))  # (S, N, D)
    mu, sd = feats.mean((0, 1)), feats.std((0, 1)).clamp_min(1e-4)
    feats = (feats - mu) / sd
    train_scenes = int(0.8 * a.scenes)
    results = {}
    for name, key, ask, vocab_q, vocab_a in (("colour of a named shape", "shape", "colour", SHAPES, COLOURS),
                                             ("shape of a named colour", "colour", "shape", COLOURS, SHAPES)):
        rows = []  # (scene index, query id, answer id, 2+ objects)
        for s, sc in enumerate(scenes):
            for o in sc.objects:
                if sum(getattr(x, key) == getattr(o, key) for x in sc.objects) == 1:
                    rows.append((s, vocab_q.index(getattr(o, key)), vocab_a.index(getattr(o, ask)),
                                 len(sc.objects) > 1))
        rows.sort(key=lambda r: r[0] >= train_scenes)
        train = sum(r[0] < train_scenes for r in rows)
        idx = torch.tensor([r[0] for r in rows])
        res = fit(feats[idx], torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]),
                  torch.tensor([r[3] for r in rows]), len(vocab_q), len(vocab_a), train, a.steps, 0, a.context)
        results[name] = res
        print(f"{name}: held-out {res['accuracy']} % ({res['held_out']}), 2+ objects {res['accuracy_2plus_objects']} %"
              f" ({res['held_out_2plus']}); chance {100 / len(vocab_a):.1f} %")
    save_report(a.out, "binding_probe.py", argv, {"scenes": a.scenes, "steps": a.steps, "context": a.context,
                                                  "features": a.cache or f"tower layer {a.tower_layer}",
                                                  "results": results, "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
