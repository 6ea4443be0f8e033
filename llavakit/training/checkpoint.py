"""Atomic training checkpoints: trainable weights, optimizer, scheduler, RNG state, step.

A checkpoint is written to a temporary file in the same directory, fsynced, and renamed over
`checkpoint.pt`; a kill -9 at any moment leaves either the previous complete checkpoint or the new
one, never a torn file. Each checkpoint carries a fingerprint of the model and recipe; resuming a run
of a different model is refused with a clear error. Loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..fileio import atomic_path

NAME = "checkpoint.pt"


def fingerprint(model_config: dict[str, Any], recipe: dict[str, Any]) -> str:
    """What must match to resume: the model's config and the recipe fields that shape the weights."""
    keep = {k: recipe.get(k) for k in ("model", "stage", "train", "lora", "standardize_features", "init_from")}
    blob = json.dumps({"model": model_config, "recipe": keep}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save(out_dir: Path, state: dict[str, Any]) -> Path:
    with atomic_path(out_dir / NAME) as tmp:
        torch.save(state, tmp)
    return out_dir / NAME


def load(out_dir: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The last checkpoint in `out_dir`, or None if there is none. Stray temp files are removed."""
    for stray in out_dir.glob(f".{NAME}.tmp-*"):
        stray.unlink(missing_ok=True)
    path = out_dir / NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path} is not a readable llavakit checkpoint: {e}") from None
    if state.get("fingerprint") != expected_fingerprint:
        raise InputError(f"{path} belongs to a different model or recipe (fingerprint "
                         f"{state.get('fingerprint')} != {expected_fingerprint}); use another out_dir "
                         f"or start without --resume")
    return state
