"""YOPO prefill wall time: the LM prefill with and without `yopo` (llavakit/llm_hooks/yopo.py).

Input: the shipped sample image (llavakit/assets/sample.png) and a short question through the model's
processor and vision side (the default model: 256 visual tokens); the image embeddings are computed
once, outside the timing (YOPO changes only the LM). What is timed: the LM prefill into a fresh KV
cache through the compression runner, plus the last position's logits (what generation needs),
batch 1, torch.inference_mode, `--threads` intra-op threads. Median (and minimum) of `--reps` runs;
the specs alternate within each round so machine drift affects all alike. Each row also gives the
largest last-position logit difference from the uncompressed prefill and whether the next (greedy)
token is the same (YOPO is training-free here; the paper fine-tunes after pruning), the KV cache
entries of each layer, and YOPO's analytic "visual compute in the LM" skipped
(`YOPO.visual_compute`, cost.py's FLOP convention).

Specs: none; `yopo:window=5:ffn_ratio=2:layercut=<L/2>`; the same with `:heads=<file>` when a heads
file is given (`--heads`) or calibrated here (`--calibrate N`: `yopo.calibrate` on the first N
easy-vqa train questions (seed 1) at `--tau`, written to `--heads-out`); with `--components`, each
component alone too, so the saving can be attributed; each `--spec S` adds the yopo spec S.

Usage (repo root):
    python benchmarks/yopo_speed.py --calibrate 8 --out docs/compression/yopo_speed.json     # the default model
    python benchmarks/yopo_speed.py --model <tiny dir> --reps 2 --components --out /tmp/y.json  # a check
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

QUESTION = "What shape is in the image, and what colour is it?"
SAMPLE = Path(__file__).resolve().parents[1] / "llavakit" / "assets" / "sample.png"


def specs_for(num_layers: int, heads: str | None, components: bool,
              extra: list[str] | None = None) -> dict[str, str | None]:
    cut = max(1, num_layers // 2)
    full = f"yopo:window=5:ffn_ratio=2:layercut={cut}"
    out = {"none": None, "yopo": full}
    if heads:
        out["yopo+heads"] = f"{full}:heads={heads}"
    if components:
        out.update({"window=5 only": "yopo:window=5:ffn_ratio=1", "ffn_ratio=2 only": "yopo:window=0:ffn_ratio=2",
                    f"layercut={cut} only": f"yopo:window=0:ffn_ratio=1:layercut={cut}"})
        if heads:
            out["heads only"] = f"yopo:window=0:ffn_ratio=1:heads={heads}"
    for spec in extra or []:
        out[spec] = spec
    return out


def calibrate_heads(vlm, n: int, tau: float, path: str) -> dict:
    from llavakit.data.easyvqa import easyvqa_items
    from llavakit.llm_hooks import yopo

    items = easyvqa_items("train", limit=n, seed=1)
    table = yopo.calibrate(vlm, [(it.question, it.image) for it in items], tau=tau, n=n)
    yopo.save_heads(table, path)
    return table


def prepare(vlm, image: str):
    inp = vlm.processor(text=[vlm.build_prompt(QUESTION, [image])], images=[image])
    with torch.inference_mode():
        embeds = vlm.model.embed_inputs(inp["input_ids"], inp["pixel_values"].to(vlm.dtype))  # (1, T, D)
    return inp["input_ids"], inp["attention_mask"], embeds


def prefill(vlm, comp, ids, mask, embeds):
    lm = vlm.model.language_model
    with torch.inference_mode():
        cache = lm.new_cache(1, ids.shape[1] + 1)
        run = comp.lm_run(vlm.model, ids, mask) if comp is not None else None
        hidden = lm(embeds, mask, None, cache, run=run)
        logits = lm.logits(hidden[:, -1:])[:, 0]
    return logits, [cache.seq_len(l) for l in range(lm.num_layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--image", default=str(SAMPLE))
    ap.add_argument("--heads", default=None, help="a calibration JSON (yopo.save_heads) to add inactive heads")
    ap.add_argument("--calibrate", type=int, default=0, help="calibrate heads on N easy-vqa questions first")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--heads-out", default=None, help="where --calibrate writes the heads (default: a temp file)")
    ap.add_argument("--components", action="store_true", help="also time each component alone")
    ap.add_argument("--spec", action="append", default=[],
                    help="also time this yopo spec (repeatable), e.g. yopo:window=0:ffn_ratio=2:layercut=20")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/compression/yopo_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llavakit
    from llavakit.compression import Compression

    vlm = llavakit.load(args.model)
    heads, heads_info = args.heads, None
    if args.calibrate:
        import tempfile

        heads = args.heads_out or str(Path(tempfile.mkdtemp()) / "yopo_heads.json")
        t0 = time.perf_counter()
        table = calibrate_heads(vlm, args.calibrate, args.tau, heads)
        active = [a for row in table["active"] for a in row]
        heads_info = {"samples": table["num_samples"], "tau": args.tau, "active_fraction": sum(active) / len(active),
                      "calibration_s": round(time.perf_counter() - t0, 1), "file": heads}
    ids, mask, embeds = prepare(vlm, args.image)
    n_vis = int((ids == vlm.config.image_token_id).sum())
    first = int((ids[0] == vlm.config.image_token_id).nonzero()[0])
    lc = vlm.config.lm
    specs = specs_for(lc.num_hidden_layers, heads, args.components, args.spec)
    comps = {}
    for name, spec in specs.items():
        comps[name] = Compression.parse(spec)
        if comps[name] is not None:
            comps[name].check(vlm.model)
    ref, _ = prefill(vlm, None, ids, mask, embeds)
    times: dict[str, list[float]] = {k: [] for k in specs}
    kv: dict[str, list[int]] = {}
    diff: dict[str, float] = {}
    same: dict[str, bool] = {}
    for name, comp in comps.items():  # warm-up + correctness figures
        logits, kv[name] = prefill(vlm, comp, ids, mask, embeds)
        diff[name] = float((logits - ref).abs().max())
        same[name] = bool((logits.argmax(-1) == ref.argmax(-1)).all())
    for _ in range(args.reps):
        for name, comp in comps.items():
            t0 = time.perf_counter()
            prefill(vlm, comp, ids, mask, embeds)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    rows = []
    for name, spec in specs.items():
        med = statistics.median(times[name])
        hook = comps[name].layer_hooks[0] if comps[name] is not None else None
        vc = hook.visual_compute(lc, n_vis, first, ids.shape[1] - first - n_vis) if hook is not None else None
        rows.append({"name": name, "spec": spec or "none", "prefill_ms_median": round(med * 1e3, 2),
                     "prefill_ms_min": round(min(times[name]) * 1e3, 2), "speedup": round(base / med, 3),
                     "max_abs_logit_diff": diff[name], "next_token_same": same[name],
                     "kv_entries_per_layer": kv[name],
                     "visual_compute_skipped": None if vc is None else round(vc["skipped"], 4)})
    out = {"model": args.model, "prompt_tokens": int(ids.shape[1]), "visual_tokens": n_vis,
           "lm_layers": lc.num_hidden_layers, "threads": args.threads, "reps": args.reps,
           "dtype": str(vlm.dtype), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "heads": heads_info, "rows": rows,
           "command": " ".join(["python benchmarks/yopo_speed.py", *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"{r['name']:>22}: {r['prefill_ms_median']:9.2f} ms  x{r['speedup']:.2f}  "
              f"visual compute skipped {r['visual_compute_skipped']}  logit diff {r['max_abs_logit_diff']:.3g}")


if __name__ == "__main__":
    main()
