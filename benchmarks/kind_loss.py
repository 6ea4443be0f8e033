"""Per-question-kind answer loss of trained default weights on held-out synthetic-world scenes.

A cheap learning-curve probe for a training run (one teacher-forced forward per scene, no generation):
for each weights file, the mean cross-entropy of the answer tokens and the fraction of questions whose
every answer token is the argmax ("forced accuracy"), per question kind (colour, shape, position,
count, exists, read). Scenes come from the `world-qa` training source with a seed no recipe uses
(default 99), so they are not the run's training scenes; they are drawn from the world's train hash
half, like every training scene, not from the evaluation half. Forced accuracy is close to, not the
same as, `llavakit eval` accuracy (greedy decoding may stop or continue differently).

    python benchmarks/kind_loss.py --weights "$(python -c 'from llavakit.default.build import trained_weights; print(trained_weights())')" \
        --weights ~/.cache/llavakit/runs/default-see/trained.safetensors --scenes 48 --out /tmp/kind_loss.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KINDS = (("count", ("how many",)), ("exists", ("is there", "can you see")), ("read", ("word", "label")),
         ("position", ("where", "which part")), ("colour", ("colour", "color")), ("shape", ("shape",)))  # first match wins


def question_kind(question: str) -> str:
    q = question.lower().split(" answer with ")[0]  # drop the answer-format suffix ("... one word.")
    for kind, keys in KINDS:
        if any(k in q for k in keys):
            return kind
    return "other"


@torch.inference_mode()
def kind_loss(weights: str, scenes: int, seed: int, dtype: torch.dtype) -> dict:
    import llavakit
    from llavakit.data.dataset import IGNORE_INDEX, TurnLabeler
    from llavakit.training.config import DataSource
    from llavakit.training.data import build_groups
    from llavakit.training.packing import block_mask, collate_packed, pack

    vlm = llavakit.load("default", trained=weights)
    model, lm = vlm.model, vlm.model.language_model
    labeler = TurnLabeler(vlm.processor)
    n_img = model.num_image_tokens()
    groups = build_groups(DataSource(kind="world-qa", n=scenes, seed=seed, questions_per_image=64))
    stats: dict[str, list[float]] = {}
    for g in groups:
        pv = vlm.processor(text=[vlm.build_prompt("x", [g.load()])], images=[g.load()])["pixel_values"]
        feats = model.get_image_features(pv.to(model.multi_modal_projector.linear_1.weight.dtype))  # [(T, D)]
        batch = collate_packed([pack(labeler, g.key, g.blocks, n_img)], vlm.processor._pad_id())
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            emb = model.embed_inputs(batch["input_ids"], image_features=feats)
            hidden = lm(emb, attention_mask=block_mask(batch["block_ids"], batch["valid"]),
                        position_ids=batch["position_ids"], inject=model.injection(batch["input_ids"], emb))
            logits = lm.logits(hidden[0, :-1]).float()  # (T-1, V)
        tgt, blk = batch["labels"][0, 1:], batch["block_ids"][0, 1:]
        for b, ((question, _),) in enumerate(g.blocks, start=1):
            sel = (blk == b) & (tgt != IGNORE_INDEX)
            loss = F.cross_entropy(logits[sel], tgt[sel]).item()
            right = float((logits[sel].argmax(-1) == tgt[sel]).all())
            s = stats.setdefault(question_kind(question), [0.0, 0.0, 0])
            s[0] += loss
            s[1] += right
            s[2] += 1
    return {k: {"loss": round(v[0] / v[2], 4), "forced_acc": round(v[1] / v[2], 4), "n": v[2]}
            for k, v in sorted(stats.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", action="append", required=True, help="trained .safetensors (repeatable)")
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--seed", type=int, default=99, help="world-qa seed (no recipe uses 99)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    out = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "scenes": a.scenes,
           "seed": a.seed, "dtype": a.dtype, "results": {}}
    for w in a.weights:
        t = time.perf_counter()
        out["results"][w] = kind_loss(w, a.scenes, a.seed, getattr(torch, a.dtype))
        print(f"{w} ({time.perf_counter() - t:.0f} s)")
        for k, v in out["results"][w].items():
            print(f"  {k:9s} loss {v['loss']:.3f}  forced acc {100 * v['forced_acc']:5.1f} %  (n={v['n']})")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
