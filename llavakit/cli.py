"""`llavakit <verb>`: one typed function per verb; `--help` on every verb.

    llavakit generate --model default --image photo.png "What is in the image?"
    llavakit info --model default
    llavakit convert --model default --out ./my-llava-hf
    llavakit eval --model default --tasks easyvqa,world-colour --limit 200 --shuffled-control
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .errors import InputError


def cmd_generate(model: str, prompt: str, images: Sequence[str], max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, dtype: str | None, stream: bool) -> int:
    from . import load

    vlm = load(model, dtype=dtype)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if stream:
        for piece in vlm.stream_chat(prompt, list(images), **kw):
            print(piece, end="", flush=True)
        print()
    else:
        print(vlm.chat(prompt, list(images), **kw))
    return 0


def cmd_info(model: str, image_size: Sequence[int] | None, prompt_tokens: int, new_tokens: int,
             as_json: bool) -> int:
    from . import load

    vlm = load(model)
    cfg = vlm.config
    n_params = sum(p.numel() for p in vlm.model.parameters())
    info: dict = {"source": vlm.source, "architecture": cfg.architecture, "parameters": n_params,
                  "language_model": {"family": cfg.lm.family, "layers": cfg.lm.num_hidden_layers,
                                     "hidden_size": cfg.lm.hidden_size, "vocab_size": cfg.lm.vocab_size,
                                     "parameters": sum(p.numel() for p in vlm.model.language_model.parameters())}}
    sizes: list[tuple[int, int]] = []
    if cfg.has_vision:
        proc = vlm.processor.image_config
        side = proc.tile_size if proc is not None else cfg.vision.image_size
        h, w = image_size if image_size else (side, side)
        sizes = [(int(h), int(w))]
        info["vision_tower"] = {"family": cfg.vision.family, "layers": cfg.vision.num_hidden_layers,
                                "hidden_size": cfg.vision.hidden_size, "patch_size": cfg.vision.patch_size,
                                "parameters": sum(p.numel() for p in vlm.model.vision_tower.parameters())}
        info["projector"] = {"kind": cfg.projector.kind, "in": cfg.projector.in_features,
                             "out": cfg.projector.out_features}
        info["image_size"] = [int(h), int(w)]
        info["visual_tokens_per_image"] = vlm.model.num_image_tokens((int(h), int(w)))
    cost = vlm.cost(prompt_tokens=prompt_tokens, new_tokens=new_tokens, image_sizes=sizes)
    info["request"] = {"text_tokens": prompt_tokens, "new_tokens": new_tokens, "images": len(sizes),
                       **cost.to_dict()}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model:          {info['source']}")
    print(f"architecture:   {cfg.architecture}  ({n_params / 1e6:.1f} M parameters)")
    if cfg.has_vision:
        v = info["vision_tower"]
        print(f"vision tower:   {v['family']}  {v['layers']} layers x {v['hidden_size']}  patch {v['patch_size']}  "
              f"({v['parameters'] / 1e6:.1f} M)")
        print(f"projector:      {cfg.projector.kind}  {cfg.projector.in_features} -> {cfg.projector.out_features}")
    lm = info["language_model"]
    print(f"language model: {lm['family']}  {lm['layers']} layers x {lm['hidden_size']}  vocab {lm['vocab_size']}  "
          f"({lm['parameters'] / 1e6:.1f} M)")
    if cfg.has_vision:
        print(f"visual tokens:  {info['visual_tokens_per_image']} per {sizes[0][1]}x{sizes[0][0]} px image")
    print(f"one request ({len(sizes)} image, {prompt_tokens} text tokens, {new_tokens} new tokens):")
    print("  " + cost.summary().replace("\n", "\n  "))
    return 0


def cmd_convert(model: str, out: str, dtype: str | None) -> int:
    from . import load

    vlm = load(model, dtype=dtype)
    path = vlm.save_pretrained(out)
    print(f"wrote {vlm.config.architecture} model in HF format to {path}")
    return 0


def cmd_eval(model: str, tasks: str, limit: int | None, batch_size: int, max_new_tokens: int, seed: int,
             shuffled_control: bool, out: str | None, compression: str | None, dtype: str | None,
             progress: bool) -> int:
    import time
    from pathlib import Path

    from . import load
    from .eval.harness import evaluate, resolve_tasks
    from .eval.report import markdown_table, write_report

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    resolved = resolve_tasks(names)  # unknown names fail here, before the model loads
    vlm = load(model, dtype=dtype)
    results = evaluate(vlm, resolved, limit=limit, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       shuffled_control=shuffled_control, compression=compression, progress=progress)
    if out is None:
        name = Path(str(model).rstrip("/\\")).name or "model"
        out = str(Path("eval_out") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_report(results, out)
    print(markdown_table(results))
    print(f"\nwrote {paths['json']}, {paths['markdown'].name}, {paths['plot'].name}, {paths['predictions'].name}")
    return 0


def cmd_chat(model: str, image: str | None, max_new_tokens: int, temperature: float) -> int:
    from . import load
    from .chat import run

    return run(load(model), image, max_new_tokens=max_new_tokens, temperature=temperature)


def cmd_train(config: str, resume: bool, steps: int | None, out_dir: str | None) -> int:
    from .training.trainer import train

    overrides = {k: v for k, v in (("steps", steps), ("out_dir", out_dir)) if v is not None}
    out = train(config, resume=resume, overrides=overrides)
    print(f"trained weights: {out / 'trained.safetensors'}  (loss log: {out / 'loss.jsonl'}, plot: {out / 'loss.png'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavakit", description="LLaVA-family models: run, inspect, convert.")
    sub = p.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images",
                       description="Answer one prompt about zero or more images.")
    g.add_argument("prompt", help="the question; <image> tags place images, else they are prepended")
    g.add_argument("--model", default="default", help="'default', a local HF-format directory, or a hub id")
    g.add_argument("--image", action="append", default=[], dest="images", help="image path (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16, auto")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.set_defaults(fn=lambda a: cmd_generate(a.model, a.prompt, a.images, a.max_new_tokens, a.temperature,
                                             a.top_p, a.top_k, a.seed, a.dtype, a.stream))

    i = sub.add_parser("info", help="architecture, parameters, tokens per image, cost of one request",
                       description="Describe a model and the analytic cost of one request.")
    i.add_argument("--model", default="default")
    i.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="image size for the token count (default: the model's input size)")
    i.add_argument("--prompt-tokens", type=int, default=30, help="text tokens in the request")
    i.add_argument("--new-tokens", type=int, default=32, help="generated tokens in the request")
    i.add_argument("--json", action="store_true", dest="as_json")
    i.set_defaults(fn=lambda a: cmd_info(a.model, a.image_size, a.prompt_tokens, a.new_tokens, a.as_json))

    c = sub.add_parser("convert", help="export a model to HF format",
                       description="Export a llavakit model as an HF-format directory transformers loads.")
    c.add_argument("--model", default="default")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--dtype", default=None)
    c.set_defaults(fn=lambda a: cmd_convert(a.model, a.out, a.dtype))

    ch = sub.add_parser("chat", help="interactive multi-turn chat about an image",
                        description="Chat about an image in the terminal. Commands: /image PATH, /reset, "
                                    "/help, /quit.")
    ch.add_argument("--model", default="default")
    ch.add_argument("--image", default=None, help="the first image (switch with /image PATH)")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.set_defaults(fn=lambda a: cmd_chat(a.model, a.image, a.max_new_tokens, a.temperature))

    t = sub.add_parser("train", help="run a training recipe (YAML config)",
                       description="Run a training recipe: `llavakit train recipes/default-instruct.yaml`. "
                                   "Multi-process: torchrun --nproc_per_node=N -m llavakit.cli train CONFIG.")
    t.add_argument("config", help="YAML recipe (see recipes/)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    t.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    t.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    t.set_defaults(fn=lambda a: cmd_train(a.config, a.resume, a.steps, a.out_dir))

    e = sub.add_parser("eval", help="evaluate on benchmark tasks (accuracy, baselines, cost, speed)",
                       description="Evaluate a model on registered tasks; write results.json, report.md and "
                                   "accuracy.png, and print the summary table.")
    e.add_argument("--model", default="default", help="'default', a local HF-format directory, or a hub id")
    e.add_argument("--tasks", required=True,
                   help="comma-separated task names: easyvqa, world-colour, world-shape, world-count, "
                        "world-position, world-read, world-multiround, world-report-simple, world-report-complex")
    e.add_argument("--limit", type=int, default=None,
                   help="items per task (default: the task's own size: all 9,673 easy-vqa test questions, "
                        "360 world items)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=10, help="greedy answer length cap")
    e.add_argument("--seed", type=int, default=0, help="item order / world scenes / shuffled-control pairing")
    e.add_argument("--shuffled-control", action="store_true",
                   help="also score every question on another item's image (is the model seeing or guessing?)")
    e.add_argument("--out", default=None, help="output directory (default ./eval_out/<model-name>-<timestamp>)")
    e.add_argument("--compression", default=None,
                   help="visual-token compression spec (reserved: errors until the model supports it)")
    e.add_argument("--dtype", default=None)
    e.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    e.set_defaults(fn=lambda a: cmd_eval(a.model, a.tasks, a.limit, a.batch_size, a.max_new_tokens, a.seed,
                                         a.shuffled_control, a.out, a.compression, a.dtype, a.progress))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
