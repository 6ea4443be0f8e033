"""Load benchmark of `llavakit serve`: throughput and latency at 1, 4 and 16 concurrent clients.

Starts the OpenAI-compatible server in this process on 127.0.0.1 (a free port; nothing leaves loopback)
and sends `--requests` chat completions per concurrency level. Each client is a thread that sends its
share of the requests one after another over its own keep-alive connection; a level's clients start
together. Every request carries one image (the shipped sample image, or `--image`, as a data: URI) and
one of four short questions, greedy, at most `--max-tokens` new tokens.

Reported per level: requests/s and completion tokens/s (over the level's wall time), p50 / p95 / max
latency (seconds, request sent -> full answer received), mean batch size the scheduler ran the requests
in, mean visual tokens and analytic FLOPs per request (the server's `usage`), error count.

`--compression SPEC` sends `compression` (the llavakit extra body field, e.g. "fastervlm:keep=0.1") in
every request; give it several times to run every level once per spec in one command ("none" = no
compression). The spec is checked against the model before the server starts (a bad one stops the run
with the message). Without it, requests carry no compression field.
Before timing, `--warmup` untimed requests per spec are sent. The clients run in this process too
(threads, mostly waiting on sockets); `--torch-threads` sets torch's intra-op threads (see
ServeSettings.torch_threads on why one core left to the HTTP side matters on a small or busy CPU).
The JSON record goes to `--out` and, in full, to stdout when `--out` is not given.

Usage (from the repo root): the issue's runs, 1 / 4 / 16 clients without and with FasterVLM at 10 %:
    python benchmarks/serve_load.py --model default --out docs/serve_load.json
    python benchmarks/serve_load.py --model default --compression fastervlm:keep=0.1 \
        --out docs/serve_load_fastervlm.json
    python benchmarks/serve_load.py --model default --compression none --compression fastervlm:keep=0.1  # both
    python benchmarks/serve_load.py --model /path/to/tiny --requests 8 --out /tmp/serve_load.json
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import platform
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

import llavakit
from llavakit.compression import Compression
from llavakit.errors import InputError
from llavakit.serve import BackgroundServer, ServeSettings, create_app

QUESTIONS = ["What is in the image?", "What colour is the main object?", "Describe the image in one sentence.",
             "How many objects are there?"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def request_body(i: int, image_uri: str, max_tokens: int, compression: str | None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_uri}},
               {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    if compression is not None:
        body["compression"] = compression
    return body


def run_level(url: str, clients: int, requests: int, image_uri: str, max_tokens: int,
              compression: str | None, timeout: float) -> dict:
    shares = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]
    latencies: list[float] = []
    tokens: list[int] = []
    batch_sizes: list[int] = []
    visual: list[int] = []
    flops: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=60)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            start.wait()
            for k in range(shares[c]):
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/chat/completions", json=request_body(c + k, image_uri, max_tokens, compression))
                    dt = time.perf_counter() - t0
                    body = r.json()
                except (httpx.HTTPError, ValueError) as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {body.get('error', {}).get('message')}")
                        continue
                    latencies.append(dt)
                    tokens.append(body["usage"]["completion_tokens"])
                    visual.append(body["usage"].get("visual_tokens", 0))
                    flops.append(body["usage"].get("flops", 0))
                    batch_sizes.append(body.get("llavakit", {}).get("batch_size", 1))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout * max(shares) + 30)
    wall = time.perf_counter() - t0
    row = {"clients": clients, "requests": requests, "ok": len(latencies), "errors": len(errors),
           "error_samples": errors[:3], "wall_s": round(wall, 3),
           "requests_per_s": round(len(latencies) / wall, 3) if wall else None,
           "completion_tokens_per_s": round(sum(tokens) / wall, 2) if wall else None,
           "mean_completion_tokens": round(statistics.mean(tokens), 2) if tokens else None,
           "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else None,
           "mean_visual_tokens": round(statistics.mean(visual), 2) if visual else None,
           "mean_flops": round(statistics.mean(flops)) if flops else None}
    if latencies:
        row.update(latency_p50_s=round(percentile(latencies, 50), 4), latency_p95_s=round(percentile(latencies, 95), 4),
                   latency_max_s=round(max(latencies), 4))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default', a local HF-format directory, or a hub id")
    ap.add_argument("--out", default=None, help="path of the JSON result (default: print it)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--image", default=None, help="image file (default: llavakit/assets/sample.png)")
    ap.add_argument("--compression", action="append", default=None, metavar="SPEC",
                    help="compression spec sent with every request (e.g. fastervlm:keep=0.1; 'none' = off); "
                         "repeat to run every level once per spec")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        ap.error("--concurrency needs positive integers and --requests must be >= 1")

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    image = Path(args.image) if args.image else Path(llavakit.__file__).parent / "assets" / "sample.png"
    image_uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    t_load = time.perf_counter()
    vlm = llavakit.load(args.model)
    load_s = time.perf_counter() - t_load
    specs: list[str | None] = args.compression or [None]
    for spec in specs:  # a bad spec stops here, before any request, with the server's own check
        try:
            comp = Compression.parse(spec)
            if comp is not None:
                comp.check(vlm.model)
        except InputError as e:
            ap.error(f"--compression {spec!r}: {e}")
    settings = ServeSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue=max(64, max(levels) * 2), request_timeout_s=args.timeout,
                             max_tokens_limit=max(1024, args.max_tokens))
    record: dict = {
        "benchmark": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "source": vlm.source, "model_load_s": round(load_s, 2),
        "image": str(image), "max_tokens": args.max_tokens, "requests_per_level": args.requests,
        "compression": specs,
        "settings": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                     "max_queue": settings.max_queue},
        "runtime": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(vlm.device),
                    "dtype": str(vlm.dtype), "platform": platform.platform(), "cpu": platform.processor()},
        "runs": [],
    }
    with BackgroundServer(create_app(vlm, settings)) as srv:
        for spec in specs:
            with httpx.Client(base_url=srv.url, timeout=args.timeout) as http:
                for i in range(args.warmup):
                    r = http.post("/v1/chat/completions", json=request_body(i, image_uri, args.max_tokens, spec))
                    if r.status_code != 200:
                        raise SystemExit(f"warmup request failed (HTTP {r.status_code}): {r.text[:500]}")
            for clients in levels:
                row = run_level(srv.url, clients, args.requests, image_uri, args.max_tokens, spec, args.timeout)
                row["compression"] = spec if spec is not None else "(none sent)"
                record["runs"].append(row)
                print(f"compression={row['compression']} clients={clients:3d}: {row['requests_per_s']} req/s, "
                      f"p50 {row.get('latency_p50_s')} s, p95 {row.get('latency_p95_s')} s, "
                      f"batch {row['mean_batch_size']}, visual tokens {row['mean_visual_tokens']}, "
                      f"errors {row['errors']}", flush=True)
        record["scheduler_stats"] = dict(srv.app.state.scheduler.stats)
    text = json.dumps(record, indent=2)
    if args.out is None:
        print(text)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
