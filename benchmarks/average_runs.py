"""Average several training runs' weights files into one (a uniform "model soup").

Wortsman et al. 2022 (Model soups) average the weights of fine-tunes that share one initialisation; here
the runs are seeds of one recipe (docs/compression/README.md, "YOPO fine-tuned"). Every float tensor
outside LoRA (the projector) is averaged. LoRA factors cannot be averaged one by one (mean(B) @ mean(A)
is not mean(B @ A)), so the LoRA factors are concatenated along the rank: A = [A_1; ...; A_N],
B = [B_1, ..., B_N] / N, rank N * r and alpha N * alpha (the same alpha / r scale), whose merged
update B @ A is exactly the mean of the runs' updates. Ours: the uniform weights and the rank
concatenation. The runs must share their LoRA spec, keys and metadata (feature layers, stage), and their
feature statistics; otherwise it stops with a message and writes nothing.

    python benchmarks/average_runs.py ~/.cache/llavakit/runs/default-yopo6 \
        ~/.cache/llavakit/runs/default-yopo6s2 --out ~/.cache/llavakit/runs/default-yopo6-avg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def average(paths: list[Path]) -> tuple[dict, dict]:
    """(state, metadata) of the average of the weights files `paths` (see the module docstring)."""
    import torch
    from safetensors import safe_open

    from llavakit.errors import CheckpointError

    if len(paths) < 2:
        raise CheckpointError("averaging needs two or more weights files")
    states, metas = [], []
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"weights file {p} does not exist")
        with safe_open(str(p), "pt") as f:
            metas.append(dict(f.metadata() or {}))
            states.append({k: f.get_tensor(k) for k in f.keys()})
    for p, s, m in zip(paths[1:], states[1:], metas[1:]):
        if set(s) != set(states[0]):
            raise CheckpointError(f"{p} holds other tensors than {paths[0]}")
        if m != metas[0]:
            raise CheckpointError(f"{p}'s metadata differs from {paths[0]}'s: {m} vs {metas[0]}")
    n = len(states)
    out: dict = {}
    for k, v in states[0].items():
        vs = [s[k] for s in states]
        if k.endswith(".lora_A.weight"):
            out[k] = torch.cat(vs, dim=0).contiguous()  # (N r, in)
        elif k.endswith(".lora_B.weight"):
            out[k] = (torch.cat([x.float() for x in vs], dim=1) / n).to(v.dtype).contiguous()  # (out, N r)
        elif k in ("feature_mean", "feature_std") or not v.is_floating_point():
            if any(not torch.equal(x, v) for x in vs):
                raise CheckpointError(f"{k} differs between the runs; they were not trained on the same features")
            out[k] = v
        else:
            out[k] = (sum(x.float() for x in vs) / n).to(v.dtype).contiguous()
    meta = dict(metas[0])
    if meta.get("lora"):
        spec = json.loads(meta["lora"])
        spec["r"], spec["alpha"] = spec["r"] * n, spec["alpha"] * n
        meta["lora"] = json.dumps(spec)
    meta["averaged_from"] = json.dumps([str(p) for p in paths])
    return out, meta


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    from llavakit.errors import InputError
    from llavakit.fileio import atomic_path
    from llavakit.training.apply import TRAINED, trained_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or their trained.safetensors files")
    ap.add_argument("--out", required=True, help="directory to write trained.safetensors into")
    args = ap.parse_args(argv)
    try:
        state, meta = average([trained_file(r) for r in args.runs])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out).expanduser()
    with atomic_path(out / TRAINED) as tmp:  # never a half-written file
        save_file(state, str(tmp), metadata=meta)
    print(f"wrote {out / TRAINED} (average of {len(args.runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
