"""`llavakit <verb>`: one typed function per verb; `--help` on every verb.

    llavakit generate --model default --image photo.png "What is in the image?"
    llavakit info --model default
    llavakit convert --model default --out ./my-llava-hf
    llavakit eval --model default --tasks easyvqa,world-colour --limit 200 --shuffled-control
    llavakit serve --model default --port 8000
    llavakit web --model default --port 7860
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .errors import InputError


def cmd_generate(model: str, prompt: str, images: Sequence[str], max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, dtype: str | None, stream: bool,
                 compression: str | None = None) -> int:
    from . import load

    vlm = load(model, dtype=dtype, compression=compression)  # a bad spec fails before any weight is read
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if stream:
        for piece in vlm.stream_chat(prompt, list(images), **kw):
            print(piece, end="", flush=True)
        print()
    else:
        print(vlm.chat(prompt, list(images), **kw))
    return 0


def cmd_info(model: str, image_size: Sequence[int] | None, prompt_tokens: int, new_tokens: int,
             as_json: bool, compression: str | None = None) -> int:
    from . import load

    vlm = load(model, compression=compression)
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
        info["visual_tokens_per_image"] = vlm.model.num_image_tokens((int(h), int(w)), compression=vlm.compression)
    if vlm.compression is not None:
        info["compression"] = vlm.compression.spec
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
    if vlm.compression is not None:
        print(f"compression:    {info['compression']}")
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
             progress: bool, keep: str | None = None, weights: str | None = None) -> int:
    import time
    from pathlib import Path

    from . import load
    from .eval.harness import evaluate, resolve_tasks
    from .eval.report import markdown_table, write_report

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    resolved = resolve_tasks(names)  # unknown names fail here, before the model loads
    if keep is not None:
        from .eval.grid import plan_grid

        if not compression:
            raise InputError("--keep needs --compression with the methods to run at each keep ratio, "
                             "e.g. --compression fastervlm,fastv:layer=2 --keep 1,0.5,0.1")
        if shuffled_control:
            raise InputError("--shuffled-control is not available with --keep (the grid compares configs on the "
                             "real images); run it on a single spec without --keep")
        plan_grid(compression, keep)  # unknown methods, bad parameters, bad ratios: before the model loads
    elif compression is not None:
        from .compression import Compression

        Compression.parse(compression)  # a bad spec fails before the model loads
    vlm = load(model, dtype=dtype, trained=weights if weights else True)
    if out is None:
        name = Path(str(model).rstrip("/\\")).name or "model"
        out = str(Path("eval_out") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if keep is not None:
        from .eval.grid import evaluate_grid, markdown_table as grid_table

        plan_grid(compression, keep, vlm.model)  # checked against the model before any compute
        grid = evaluate_grid(vlm, resolved, compression, keep, limit=limit, seed=seed, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress, out=out)
        print(grid_table(grid.summary()))
        print(f"\nwrote {Path(out) / 'grid.json'}, grid.md, pareto_tflops.png, pareto_prefill.png, kept_tokens.png, "
              f"grid_predictions.jsonl")
        return 0
    if compression is not None:
        vlm.resolve_compression(compression)  # checked against the model before any compute
    results = evaluate(vlm, resolved, limit=limit, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       shuffled_control=shuffled_control, compression=compression, progress=progress)
    paths = write_report(results, out)
    print(markdown_table(results))
    print(f"\nwrote {paths['json']}, {paths['markdown'].name}, {paths['plot'].name}, {paths['predictions'].name}")
    return 0


def cmd_chat(model: str, image: str | None, max_new_tokens: int, temperature: float,
             compression: str | None = None) -> int:
    from . import load
    from .chat import run

    return run(load(model, compression=compression), image, max_new_tokens=max_new_tokens, temperature=temperature)


def cmd_train(config: str, resume: bool, steps: int | None, out_dir: str | None, seed: int | None = None) -> int:
    from .training.trainer import train

    overrides = {k: v for k, v in (("steps", steps), ("out_dir", out_dir), ("seed", seed)) if v is not None}
    out = train(config, resume=resume, overrides=overrides)
    print(f"trained weights: {out / 'trained.safetensors'}  (loss log: {out / 'loss.jsonl'}, plot: {out / 'loss.png'})")
    return 0


def cmd_serve(model: str, host: str, port: int, dtype: str | None, settings_kw: dict) -> int:
    try:
        from .serve import ServeSettings, run
    except ImportError as e:
        raise InputError(f"`llavakit serve` needs fastapi, uvicorn and httpx ({e}); "
                         "pip install fastapi uvicorn httpx") from e
    from . import load

    settings = ServeSettings(host=host, port=port, **settings_kw)  # checked before the model loads
    vlm = load(model, dtype=dtype)
    print(f"serving {vlm.source or model} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    run(vlm, settings)
    return 0


def cmd_web(model: str, host: str, port: int, dtype: str | None, max_new_tokens: int) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise InputError(f"`llavakit web` needs gradio ({e}); pip install gradio") from e
    from . import load
    from .serve.web import launch

    vlm = load(model, dtype=dtype)
    print(f"web demo for {vlm.source or model} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    launch(vlm, host, port, max_new_tokens=max_new_tokens)
    return 0


COMPRESSION_HELP = "visual-token compression for every answer, e.g. fastervlm:keep=0.1 (see the README)"


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
    g.add_argument("--compression", default=None, help=COMPRESSION_HELP)
    g.set_defaults(fn=lambda a: cmd_generate(a.model, a.prompt, a.images, a.max_new_tokens, a.temperature,
                                             a.top_p, a.top_k, a.seed, a.dtype, a.stream, a.compression))

    i = sub.add_parser("info", help="architecture, parameters, tokens per image, cost of one request",
                       description="Describe a model and the analytic cost of one request.")
    i.add_argument("--model", default="default")
    i.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="image size for the token count (default: the model's input size)")
    i.add_argument("--prompt-tokens", type=int, default=30, help="text tokens in the request")
    i.add_argument("--new-tokens", type=int, default=32, help="generated tokens in the request")
    i.add_argument("--json", action="store_true", dest="as_json")
    i.add_argument("--compression", default=None, help="count tokens and cost under this compression spec")
    i.set_defaults(fn=lambda a: cmd_info(a.model, a.image_size, a.prompt_tokens, a.new_tokens, a.as_json,
                                         a.compression))

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
    ch.add_argument("--compression", default=None, help=COMPRESSION_HELP)
    ch.set_defaults(fn=lambda a: cmd_chat(a.model, a.image, a.max_new_tokens, a.temperature, a.compression))

    t = sub.add_parser("train", help="run a training recipe (YAML config)",
                       description="Run a training recipe: `llavakit train recipes/default-instruct.yaml`. "
                                   "Multi-process: torchrun --nproc_per_node=N -m llavakit.cli train CONFIG.")
    t.add_argument("config", help="YAML recipe (see recipes/)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    t.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    t.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    t.add_argument("--seed", type=int, default=None,
                   help="override the recipe's training seed (LoRA initialisation, batch order): a seed study "
                        "of one recipe; give each seed its own --out-dir")
    t.set_defaults(fn=lambda a: cmd_train(a.config, a.resume, a.steps, a.out_dir, a.seed))

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
                   help="visual-token compression: one spec, e.g. fastervlm:keep=0.1 or a composition "
                        "'[hired:rho=0.2, fastv:layer=2:keep=0.5]'; with --keep, a comma list of methods "
                        "(each ONE method, fixed params allowed, e.g. fastervlm,fastv:layer=2,random)")
    e.add_argument("--keep", default=None,
                   help="budget-matched grid: comma list of keep ratios in (0, 1], e.g. 1,0.5,0.25,0.1; every "
                        "--compression method runs at each ratio, plus one uncompressed reference; writes "
                        "grid.json, grid.md and accuracy-vs-cost plots")
    e.add_argument("--dtype", default=None)
    e.add_argument("--weights", default=None,
                   help="a training run's trained.safetensors (or its out_dir) to evaluate instead of the shipped "
                        "default weights, e.g. ~/.cache/llavakit/runs/default-bind")
    e.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    e.set_defaults(fn=lambda a: cmd_eval(a.model, a.tasks, a.limit, a.batch_size, a.max_new_tokens, a.seed,
                                         a.shuffled_control, a.out, a.compression, a.dtype, a.progress, a.keep,
                                         a.weights))

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, streaming, batching)",
                        description="Serve a model over an OpenAI-compatible API: POST /v1/chat/completions "
                                    "(text and image_url parts, stream), GET /v1/models, GET /health. Requests "
                                    "with compatible settings are batched dynamically.")
    sv.add_argument("--model", default="default", help="'default', a local HF-format directory, or a hub id")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dtype", default=None)
    sv.add_argument("--model-name", default=None, help="the model id clients see (default: from --model)")
    sv.add_argument("--api-key", default=None, help="required bearer token (default: $LLAVAKIT_API_KEY; unset = none)")
    sv.add_argument("--max-batch-size", type=int, default=8)
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request waits for batch-mates")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    sv.add_argument("--request-timeout", type=float, default=120.0, dest="request_timeout_s", help="seconds (504)")
    sv.add_argument("--max-tokens-limit", type=int, default=1024)
    sv.add_argument("--max-image-bytes", type=int, default=10_000_000)
    sv.add_argument("--max-images-per-request", type=int, default=8)
    sv.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
    sv.add_argument("--image-root", default=None, help="allow local image paths inside this directory")
    sv.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; on a busy CPU leave a core to the HTTP side)")
    sv.set_defaults(fn=lambda a: cmd_serve(a.model, a.host, a.port, a.dtype, dict(
        model_name=a.model_name, api_key=a.api_key, max_batch_size=a.max_batch_size, max_wait_ms=a.max_wait_ms,
        max_queue=a.max_queue, request_timeout_s=a.request_timeout_s, max_tokens_limit=a.max_tokens_limit,
        default_max_tokens=min(256, a.max_tokens_limit), max_image_bytes=a.max_image_bytes,
        max_body_bytes=max(16_000_000, a.max_image_bytes * 4 // 3 + 1_000_000),  # one image, base64, fits
        max_images_per_request=a.max_images_per_request, allow_remote_images=a.allow_remote_images,
        image_root=a.image_root, torch_threads=a.torch_threads)))

    w = sub.add_parser("web", help="web demo (Gradio): ask about an image, see tokens, cost and the token map",
                       description="Serve a Gradio page: upload an image, ask a question, see the answer, the "
                                   "number of visual tokens, the analytic cost and which image tokens were kept.")
    w.add_argument("--model", default="default", help="'default', a local HF-format directory, or a hub id")
    w.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--dtype", default=None)
    w.add_argument("--max-new-tokens", type=int, default=64, help="greedy answer length cap")
    w.set_defaults(fn=lambda a: cmd_web(a.model, a.host, a.port, a.dtype, a.max_new_tokens))
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
