"""Budget-matched compression figures for the docs: the accuracy/cost grid and a prefill-speed check.

Reproduces docs/compression/{grid.json, grid.md, pareto_tflops.png, pareto_prefill.png, kept_tokens.png,
speed.json} in one run:

1. The grid (`llavakit.eval.grid.evaluate_grid`, the same as `llavakit eval --keep`): the uncompressed
   model, then every method of `--methods` at every ratio of `--keeps`, on `--tasks` (default easyvqa and
   the four world question tasks), `--limit` items per task, greedy, batch `--batch-size`. See
   llavakit/eval/grid.py for every column's definition.
2. Speed (batch `--speed-batch`, default 1: copies of the shipped sample image and one short question;
   torch.inference_mode), for
   `--speed-method` (default fastervlm) at each of `--speed-keeps` (default 1.0 and 0.1) and uncompressed:
   - preprocess_s: the processor (image resize/normalise, tokenisation, placeholder expansion);
   - vision_s: tower + token stage + projector + embedding assembly (`embed_inputs`);
   - lm_prefill_s: the LM over the prompt embeddings into a fresh KV cache, plus last-position logits
     (what generation's prefill does);
   - ttft_s: time to first token through `chat_batch(..., max_new_tokens=1)` (all of the above plus
     sampling): vision included;
   - kv_cache_bytes: analytic fp16 KV cache of that request after `--new-tokens` tokens (`vlm.cost`).
   Median (and min) of `--speed-runs` runs after 2 warm-up runs; configs alternate within each run so
   machine drift affects them alike.

Usage (from the repo root):
    python benchmarks/compression.py --out docs/compression             # the default model; long on a CPU
    python benchmarks/compression.py --model /tmp/tiny --methods fastervlm,fastv:layer=1 --limit 4 --out /tmp/c
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "easyvqa,world-colour,world-shape,world-count,world-position"
DEFAULT_METHODS = "fastervlm,fastv:layer=2,random,pool,downsample"
DEFAULT_KEEPS = "1,0.5,0.25,0.1,0.05"
SPEED_PROMPT = "What shape is in the image, and what colour is it? Answer with one word."


@torch.inference_mode()
def speed_once(vlm, image, spec, prompt: str, batch: int = 1) -> dict[str, float]:
    """One timed pass of each phase (see the module docstring) for `batch` copies of one request."""
    comp = vlm.resolve_compression(spec)
    model, lm = vlm.model, vlm.model.language_model
    t0 = time.perf_counter()
    inputs = vlm.processor(text=[vlm.build_prompt(prompt, [image])] * batch, images=[image] * batch,
                           compression=comp)
    t1 = time.perf_counter()
    ids = inputs["input_ids"].to(vlm.device)
    embeds = model.embed_inputs(ids, inputs["pixel_values"].to(vlm.device, vlm.dtype), compression=comp)
    t2 = time.perf_counter()
    run = comp.lm_run(model, ids, None) if comp is not None else None
    cache = lm.new_cache(batch, ids.shape[1] + 1, dtype=embeds.dtype, device=embeds.device)
    hidden = lm(embeds, None, None, cache, run=run)
    lm.logits(hidden[:, -1:]).argmax(-1)
    t3 = time.perf_counter()
    stamps: list[float] = []
    t4 = time.perf_counter()
    vlm.chat_batch([prompt] * batch, [[image]] * batch, compression=spec, max_new_tokens=1, temperature=0.0,
                   on_token=lambda _r, _t: stamps.append(time.perf_counter()))
    return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "lm_prefill_s": t3 - t2, "ttft_s": stamps[0] - t4,
            "visual_tokens": int((ids[0] == model.config.image_token_id).sum()), "prompt_tokens": int(ids.shape[1])}


def measure_speed(vlm, image, specs: dict[str, str | None], runs: int, new_tokens: int,
                  prompt: str = SPEED_PROMPT, batch: int = 1) -> dict:
    """{label: {median/min of each phase, visual tokens, KV bytes}} for each spec (None = uncompressed)."""
    samples: dict[str, list[dict]] = {k: [] for k in specs}
    for i in range(runs + 2):
        for label, spec in specs.items():
            s = speed_once(vlm, image, spec, prompt, batch)
            if i >= 2:  # two warm-up runs
                samples[label].append(s)
    out = {}
    for label, spec in specs.items():
        ss = samples[label]
        row: dict = {"spec": spec, "visual_tokens": ss[0]["visual_tokens"], "prompt_tokens": ss[0]["prompt_tokens"]}
        for k in ("preprocess_s", "vision_s", "lm_prefill_s", "ttft_s"):
            vals = [s[k] for s in ss]
            row[k] = statistics.median(vals)
            row[k.replace("_s", "_min_s")] = min(vals)
        text = ss[0]["prompt_tokens"] - ss[0]["visual_tokens"]
        side = int(vlm.config.input_size)
        cost = vlm.cost(prompt_tokens=text, new_tokens=new_tokens, image_sizes=[(side, side)], compression=spec)
        row.update(kv_cache_bytes=cost.kv_cache_bytes, lm_prefill_tflops=cost.lm_prefill_flops / 1e12,
                   tflops=cost.total_flops / 1e12)
        out[label] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="one method per entry, fixed params allowed")
    p.add_argument("--keeps", default=DEFAULT_KEEPS)
    p.add_argument("--limit", type=int, default=100, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-method", default="fastervlm")
    p.add_argument("--speed-keeps", default="1,0.1")
    p.add_argument("--speed-runs", type=int, default=10)
    p.add_argument("--speed-batch", type=int, default=1, help="requests per timed batch (same image and prompt)")
    p.add_argument("--speed-image", default=None, help="default: llavakit/assets/sample.png")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--weights", default=None, help="a training run's trained.safetensors (default: the shipped weights)")
    p.add_argument("--skip-grid", action="store_true", help="only the speed measurement")
    p.add_argument("--skip-speed", action="store_true", help="only the grid (speed.json is left as it is)")
    p.add_argument("--out", default="docs/compression")
    a = p.parse_args(argv)

    import llavakit
    from llavakit.compression import with_budget
    from llavakit.errors import InputError
    from llavakit.eval.grid import evaluate_grid, markdown_table, parse_keeps, plan_grid
    from llavakit.eval.harness import resolve_tasks
    from llavakit.eval.kept_tokens import SAMPLE

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        tasks = resolve_tasks([t.strip() for t in a.tasks.split(",") if t.strip()])
        plan_grid(a.methods, a.keeps)
        speed_keeps = parse_keeps(a.speed_keeps)
        vlm = llavakit.load(a.model, dtype=a.dtype, trained=a.weights or True)
        plan_grid(a.methods, a.keeps, vlm.model)
        specs = {"none": None, **{f"{a.speed_method}@{k:g}": with_budget(a.speed_method, k) for k in speed_keeps}}
        for s in specs.values():
            vlm.resolve_compression(s)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not a.skip_grid:
        grid = evaluate_grid(vlm, tasks, a.methods, a.keeps, limit=a.limit, seed=a.seed, batch_size=a.batch_size,
                             max_new_tokens=a.max_new_tokens, out=out)
        print(markdown_table(grid.summary()))
    if a.skip_speed:
        print(f"wrote {out}/grid.json, grid.md, *.png (speed skipped)")
        return 0
    image = vlm.processor.load_images([a.speed_image or SAMPLE])[0]
    speed = measure_speed(vlm, image, specs, a.speed_runs, a.max_new_tokens, batch=a.speed_batch)
    command = " ".join(["python", "benchmarks/compression.py", *(argv if argv is not None else sys.argv[1:])])
    doc = {"model": str(vlm.source or a.model), "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
           "device": str(vlm.device), "dtype": str(vlm.dtype), "batch": a.speed_batch, "runs": a.speed_runs,
           "prompt": SPEED_PROMPT, "image": str(a.speed_image or SAMPLE.name), "new_tokens_for_kv": a.max_new_tokens,
           "conventions": "medians (and minima) of wall-clock seconds; see benchmarks/compression.py",
           "results": speed, "grid_wall_s": None if a.skip_grid else time.perf_counter() - t0}
    (out / "speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    for label, r in speed.items():
        print(f"{label:>16}: {r['visual_tokens']:4d} visual tokens  vision {1e3 * r['vision_s']:8.2f} ms  "
              f"LM prefill {1e3 * r['lm_prefill_s']:8.2f} ms  TTFT {1e3 * r['ttft_s']:8.2f} ms  "
              f"KV {r['kv_cache_bytes'] / 1e6:.3f} MB")
    print(f"wrote {out}/grid.json, grid.md, *.png, speed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
