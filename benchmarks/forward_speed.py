"""Prefill and per-token decode speed: llavakit's LlamaLM vs transformers' LlamaForCausalLM.

Same weights in both: the embedded default model's language model (SmolLM2-135M-Instruct: 30 layers,
width 576, 9 heads / 3 KV heads, tied embeddings), copied into transformers' LlamaForCausalLM; the
input is the default request: 256 image-token embeddings (the shipped sample image through the DINOv2
tower and projector) followed by 30 text-token embeddings. `--random-init` uses a random model of
the same size instead. The script checks both compute the same function before timing.

What is timed (batch 1, no padding, torch.inference_mode, the process's default thread count):
  - prefill: `--prompt-len` input embeddings through the model into a fresh KV cache (ours:
    preallocated `KVCache`; transformers: the `DynamicCache` its forward creates), plus logits of the
    last position only (transformers: `logits_to_keep=1`), as generation does. Median of `--reps` runs.
  - decode: one token per step for `--decode-tokens` steps after a prefill: embed the token, run it
    through the cache, last-position logits, greedy argmax. Median step time, pooled over `--reps` runs.
  Medians are the headline; minima are reported too (on a shared machine they show the undisturbed cost).
Runs of the two implementations alternate so machine drift affects both alike.

Usage (from the repo root, llavakit installed):
    python benchmarks/forward_speed.py --out docs/forward_speed.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from llavakit.models.lm import build_lm
from llavakit.models.lm.hf_config import lm_config_from_hf

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_models(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_135M)
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).eval().to(dtype)
    ours = build_lm(lm_config_from_hf(cfg.to_dict())).eval().to(dtype)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def default_models_and_input(dtype: torch.dtype, text_tokens: int):
    """The default model's LM in both implementations + 256 image embeddings and `text_tokens` text ones."""
    import llavakit
    from llavakit.models.lm.hf_config import lm_config_to_hf

    vlm = llavakit.load("default")
    ours = vlm.model.language_model.eval().to(dtype)
    cfg = LlamaConfig(**lm_config_to_hf(ours.config))
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(ours.state_dict())
    hf = hf.to(dtype)
    prompt = "What shape is in the image, and what colour is it? Answer with one short sentence please."
    with torch.inference_mode():
        inputs = vlm.processor(text=["<image>" + prompt], images=["llavakit/assets/sample.png"])
        embeds = vlm.model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])  # (1, 256 + n, D)
        n_img = int((inputs["input_ids"] == vlm.config.image_token_id).sum())
        first = int((inputs["input_ids"][0] == vlm.config.image_token_id).nonzero()[0])
        img = embeds[:, first:first + n_img]
        text = vlm.model.language_model.embed(inputs["input_ids"][:, first + n_img:])
    text = text.repeat(1, text_tokens // text.shape[1] + 1, 1)[:, :text_tokens]
    return hf, ours, torch.cat([img, text], dim=1).to(dtype)  # (1, 256 + text_tokens, D)


# transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a warning).
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def hf_prefill(hf, x):
    out = hf(inputs_embeds=x, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], getattr(out, _CACHE_KW)


def hf_step(hf, tok, cache):
    out = hf(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{_CACHE_KW: cache})
    return out.logits[:, -1]


def ours_prefill(lm, x, max_len):
    cache = lm.new_cache(1, max_len)
    return lm.logits(lm(x, None, None, cache)[:, -1:])[:, 0], cache


def ours_step(lm, tok, cache):
    return lm.logits(lm(lm.embed(tok[:, None]), None, None, cache))[:, 0]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_once(name, model, x, n_decode):
    """One prefill + n_decode greedy steps; returns (prefill seconds, [step seconds], tokens)."""
    if name == "ours":
        (logits, cache), t_pre = timed(lambda: ours_prefill(model, x, x.shape[1] + n_decode + 1))
        step = lambda tok: ours_step(model, tok, cache)  # noqa: E731
    else:
        (logits, cache), t_pre = timed(lambda: hf_prefill(model, x))
        step = lambda tok: hf_step(model, tok, cache)  # noqa: E731
    steps, tokens = [], []
    for _ in range(n_decode):
        tok = logits.argmax(-1)
        tokens.append(tok.item())
        logits, dt = timed(lambda: step(tok))
        steps.append(dt)
    return t_pre, steps, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="path of the JSON result")
    ap.add_argument("--prompt-len", type=int, default=286, help="with --random-init: input embeddings")
    ap.add_argument("--text-tokens", type=int, default=30, help="default weights: text tokens after the image")
    ap.add_argument("--random-init", action="store_true", help="random SmolLM2-size weights, random input")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    if args.random_init:
        hf, ours = build_models(dtype)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(1, args.prompt_len, SMOLLM2_135M["hidden_size"], generator=g) * 0.05).to(dtype)
    else:
        hf, ours, x = default_models_and_input(dtype, args.text_tokens)
        args.prompt_len = x.shape[1]

    with torch.inference_mode():
        ref, _ = hf_prefill(hf, x)
        got, _ = ours_prefill(ours, x, args.prompt_len + 1)
        max_diff = (ref.float() - got.float()).abs().max().item()
        results = {"ours": {"prefill": [], "decode": [], "tokens": None},
                   "transformers": {"prefill": [], "decode": [], "tokens": None}}
        run_once("ours", ours, x, 4)  # warm-up both
        run_once("transformers", hf, x, 4)
        for rep in range(args.reps):
            order = ("ours", "transformers") if rep % 2 == 0 else ("transformers", "ours")
            for name in order:
                model = ours if name == "ours" else hf
                t_pre, steps, tokens = run_once(name, model, x, args.decode_tokens)
                results[name]["prefill"].append(t_pre)
                results[name]["decode"].extend(steps)
                results[name]["tokens"] = tokens

    summary = {}
    for name, r in results.items():
        summary[name] = {"prefill_ms": 1e3 * statistics.median(r["prefill"]),
                         "decode_ms_per_token": 1e3 * statistics.median(r["decode"]),
                         # minima: the least-disturbed run, useful on a shared (contended) machine
                         "prefill_ms_min": 1e3 * min(r["prefill"]),
                         "decode_ms_per_token_min": 1e3 * min(r["decode"]),
                         "prefill_ms_all": [1e3 * t for t in r["prefill"]]}
    ratio_pre = summary["ours"]["prefill_ms"] / summary["transformers"]["prefill_ms"]
    ratio_dec = summary["ours"]["decode_ms_per_token"] / summary["transformers"]["decode_ms_per_token"]
    same_tokens = results["ours"]["tokens"] == results["transformers"]["tokens"]

    weights = "random init" if args.random_init else "default model weights, 256 image + text embeddings"
    print(f"SmolLM2-135M ({weights}), {args.dtype}, batch 1, prompt {args.prompt_len} embeddings, "
          f"{args.decode_tokens} decode steps x {args.reps} reps, torch threads {torch.get_num_threads()}")
    print(f"prefill last-logit max abs diff ours vs transformers: {max_diff:.2e}; "
          f"greedy tokens identical: {same_tokens}")
    print(f"{'':14s}{'llavakit':>12s}{'transformers':>14s}{'ours/theirs':>13s}")
    print(f"{'prefill ms':14s}{summary['ours']['prefill_ms']:12.1f}"
          f"{summary['transformers']['prefill_ms']:14.1f}{ratio_pre:13.3f}")
    print(f"{'decode ms/tok':14s}{summary['ours']['decode_ms_per_token']:12.2f}"
          f"{summary['transformers']['decode_ms_per_token']:14.2f}{ratio_dec:13.3f}")
    for key, label in (("prefill_ms_min", "prefill min"), ("decode_ms_per_token_min", "decode min")):
        a, b = summary["ours"][key], summary["transformers"][key]
        print(f"{label:14s}{a:12.2f}{b:14.2f}{a / b:13.3f}")

    record = {
        "benchmark": "forward_speed",
        "command": "python benchmarks/forward_speed.py " + " ".join(
            f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items() if v is not False and k != "prompt_len"),
        "model": {"weights": weights, **SMOLLM2_135M},
        "dtype": args.dtype, "batch": 1, "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens, "reps": args.reps,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "prefill_logit_max_abs_diff": max_diff, "greedy_tokens_identical": same_tokens,
        "results": summary,
        "ratio_ours_over_transformers": {
            "prefill": ratio_pre, "decode": ratio_dec,
            "prefill_min": summary["ours"]["prefill_ms_min"] / summary["transformers"]["prefill_ms_min"],
            "decode_min": summary["ours"]["decode_ms_per_token_min"]
            / summary["transformers"]["decode_ms_per_token_min"]},
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
