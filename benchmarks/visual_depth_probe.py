"""Where in the LM does a world question find its object, and what is left of the object there?

Two measurements on one model (ours, not from a paper):

1. **Attention.** For world-colour items with 2+ objects, the last prompt token's attention (head mean,
   recomputed from each layer's q/k as `LlamaLM.layer_attention_rows` does) over the visual tokens, split
   into the asked object's patches, the other objects' patches and the background; per layer, as mass and
   as the per-token mean relative to the mean over all visual tokens (1.0 = no preference).
2. **Decodability.** For world-bind scenes, the hidden state at each object's centre patch entering
   each LM layer; a linear probe (softmax regression, Adam, on 75 % of the scenes, scored on the rest)
   reads the object's colour and shape from it. `--visual-attention self` repeats it with visual tokens
   that attend only to the text before them and to themselves (no visual-to-visual attention);
   `--tower-layers` probes the vision tower's own layer outputs (before the projector) the same way.

    python benchmarks/visual_depth_probe.py --out docs/eval/visual-depth-stageD.json              # ~6 min
    python benchmarks/visual_depth_probe.py --weights RUN/trained.safetensors --out docs/eval/visual-depth-X.json
    python benchmarks/visual_depth_probe.py --items 0 --visual-attention none --tower-layers 2,4,6,8,10,12 \
        --out docs/eval/visual-depth-tower.json                                           # ~2 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch



def probe_layers(n_layers: int) -> tuple[int, ...]:
    """Every third LM layer and the last one (0, 3, ..., 27, 29 for the default's 30)."""
    return tuple(sorted(set(range(0, n_layers, 3)) | {n_layers - 1}))


def patches_of(box: tuple[float, float, float, float], canvas: int, side: int) -> list[int]:
    """Raster indices of the `side` x `side` patches that a (left, top, right, bottom) box overlaps."""
    left, top, right, bottom = box
    s = canvas / side
    return [r * side + c for r in range(side) for c in range(side)
            if (c + 1) * s > left and c * s < right and (r + 1) * s > top and r * s < bottom]


def _layer_inputs(vlm, image, question: str, visual_attention: str = "causal"):
    """(input ids (T,), [hidden entering each layer (T, D)], visual positions (256,)) for one prompt."""
    m, lm = vlm.model, vlm.model.language_model
    enc = vlm.processor(text=[vlm.build_prompt(question, [image])], images=[image])
    ids = enc["input_ids"]
    caps: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, args, i=i: caps.__setitem__(i, args[0]))
             for i, blk in enumerate(lm.layers)]
    try:
        emb = m.embed_inputs(ids, enc["pixel_values"].to(vlm.dtype))
        t = ids.shape[1]
        visual = ids[0] == m.config.image_token_id
        mask = None
        if visual_attention == "self":
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            mask &= ~(visual[:, None] & visual[None, :] & ~torch.eye(t, dtype=torch.bool))
            mask = mask[None, None]
        lm(emb, attention_mask=mask, position_ids=torch.arange(t)[None] if mask is not None else None,
           inject=m.injection(ids, emb))
    finally:
        for h in hooks:
            h.remove()
    return ids[0], [caps[i][0] for i in range(lm.num_layers)], torch.nonzero(visual).flatten()


def attention_split(vlm, n_items: int) -> dict[str, Any]:
    from llavakit.data.world.tasks import eval_items

    lm = vlm.model.language_model
    n_layers = lm.num_layers
    mass = torch.zeros(n_layers, 3)
    rel = torch.zeros(n_layers, 3)
    n = 0
    for it in eval_items("world-colour", 4 * n_items):
        sc = it.scene
        asked = [o for o in sc.objects if o.colour == it.answer and o.shape in it.question]
        if len(sc.objects) < 2 or len(asked) != 1:
            continue
        side = vlm.model.config.view_grid
        pa = set(patches_of(asked[0].box(sc.font_px), sc.canvas, side))
        po = {p for o in sc.objects if o is not asked[0] for p in patches_of(o.box(sc.font_px), sc.canvas, side)} - pa
        groups = [sorted(pa), sorted(po), sorted(set(range(side * side)) - pa - po)]
        ids, inputs, vis = _layer_inputs(vlm, it.image(), it.question)
        last = torch.tensor([ids.shape[0] - 1])
        for i in range(n_layers):
            p = lm.layer_attention_rows(i, inputs[i][None], None, last)[0, :, 0].mean(0)[vis]  # (256,)
            for g, idx in enumerate(groups):
                if idx:
                    mass[i, g] += float(p[idx].sum())
                    rel[i, g] += float(p[idx].mean() / p.mean().clamp_min(1e-12))
        n += 1
        if n == n_items:
            break
    names = ("asked object", "other objects", "background")
    return {"items": n, "layers": [
        {"layer": i, "visual_mass": round(float(mass[i].sum()) / n, 4),
         **{f"{k} mass": round(float(mass[i, g]) / n, 4) for g, k in enumerate(names)},
         **{f"{k} per-token vs mean": round(float(rel[i, g]) / n, 3) for g, k in enumerate(names)}}
        for i in range(n_layers)]}


def _probe(x: torch.Tensor, labels: list[str], train: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy % of a softmax regression on standardised features."""
    classes = sorted(set(labels))
    x = x.clone()  # a normal tensor (the features were computed under inference_mode)
    y = torch.tensor([classes.index(v) for v in labels])
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-4
    x = (x - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((lin(x[~train]).argmax(-1) == y[~train]).float().mean())


def _probe_scenes(vlm, scenes: int, layers, patch_states, key: str) -> dict[str, Any]:
    """Colour / shape probes per layer at each object's centre patch of world-bind seed 9's first `scenes`
    scenes (no recipe trains on that seed). `patch_states(image)` -> {layer: (side * side, D)} states in
    raster patch order."""
    from llavakit.training.data import _bind_scene, _render

    side = vlm.model.config.view_grid
    feats: dict[int, list] = {l: [] for l in layers}
    colours, shapes, scene_of = [], [], []
    for i in range(scenes):
        _, sc = _bind_scene(i, 9)
        with torch.inference_mode():
            states = patch_states(_render(sc))
        s = sc.canvas / side
        for o in sc.objects:
            j = int(o.y // s) * side + int(o.x // s)  # the object's centre patch
            for l in layers:
                feats[l].append(states[l][j].float().clone())
            colours.append(o.colour)
            shapes.append(o.shape)
            scene_of.append(i)
    train = torch.tensor(scene_of) < int(0.75 * scenes)
    return {"scenes": scenes, "objects": len(colours), "held_out_objects": int((~train).sum()),
            "layers": [{key: l, "colour": round(_probe(torch.stack(feats[l]), colours, train), 1),
                        "shape": round(_probe(torch.stack(feats[l]), shapes, train), 1)} for l in layers]}


def tower_decodability(vlm, scenes: int, layers: tuple[int, ...]) -> dict[str, Any]:
    """The same probes on the vision tower's own layer outputs (1-based, before the projector), same scenes."""
    m = vlm.model
    first = int(m.vision_tower.has_cls)  # the [CLS] token comes first in the tower's sequence

    def states(image):
        pv = vlm.processor(text=["<image>"], images=[image])["pixel_values"].to(vlm.dtype)
        return {l: h[0, first:] for l, h in zip(layers, m.vision_tower(pv, layers=layers).hidden_states)}

    return _probe_scenes(vlm, scenes, layers, states, "tower_layer")


def decodability(vlm, scenes: int, visual_attention: str) -> dict[str, Any]:
    """The probes on the hidden states entering each probed LM layer, at the visual positions."""
    layers = probe_layers(vlm.model.language_model.num_layers)

    def states(image):
        _, inputs, vis = _layer_inputs(vlm, image, "What colour is the object?", visual_attention)
        return {l: inputs[l][vis] for l in layers}

    return {"visual_attention": visual_attention, **_probe_scenes(vlm, scenes, layers, states, "layer")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a run's trained.safetensors or out_dir (default: shipped)")
    p.add_argument("--items", type=int, default=30, help="world-colour items with 2+ objects for the attention split")
    p.add_argument("--scenes", type=int, default=200, help="world-bind scenes for the decodability probes")
    p.add_argument("--visual-attention", choices=("causal", "self", "both", "none"), default="both",
                   help="LM decodability with causal visual attention, without visual-to-visual attention, both, or skip")
    p.add_argument("--tower-layers", default="",
                   help="comma-separated vision-tower layers (1-based) to probe as well, e.g. 2,4,6,8,10,12")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import llavakit

    torch.set_num_threads(args.threads)
    t0 = time.time()
    vlm = llavakit.load("default", trained=args.weights) if args.weights else llavakit.load("default")
    argv = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {"command": "python benchmarks/visual_depth_probe.py " + " ".join(argv),
                           "weights": args.weights or "shipped"}
    modes = {"both": ("causal", "self"), "none": ()}.get(args.visual_attention, (args.visual_attention,))
    if args.items:
        with torch.inference_mode():
            res["attention"] = attention_split(vlm, args.items)
        for row in res["attention"]["layers"]:
            print(f"layer {row['layer']:2d} visual mass {row['visual_mass']:.3f}  "
                  f"asked x{row['asked object per-token vs mean']:.2f}  "
                  f"other x{row['other objects per-token vs mean']:.2f}  "
                  f"background x{row['background per-token vs mean']:.2f}")
    for mode in modes:
        res[f"decodability_{mode}"] = decodability(vlm, args.scenes, mode)
        for row in res[f"decodability_{mode}"]["layers"]:
            print(f"{mode:6s} layer {row['layer']:2d}: colour {row['colour']:.1f}  shape {row['shape']:.1f}")
    if args.tower_layers:
        layers = tuple(int(x) for x in args.tower_layers.split(","))
        res["decodability_tower"] = tower_decodability(vlm, args.scenes, layers)
        for row in res["decodability_tower"]["layers"]:
            print(f"tower layer {row['tower_layer']:2d}: colour {row['colour']:.1f}  shape {row['shape']:.1f}")
    res["wall_s"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
