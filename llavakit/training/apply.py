"""Apply trained weights (a run's `trained.safetensors`) to a loaded model, without peft.

The file holds the projector (feature standardisation already folded into `linear_1`; the tower layers
it reads, when its metadata names them, are selected on the model first; a local-context
branch, when present, is added to the model with the file's kernel and width), the visual re-injection
branch when trained (added with the file's layers and rank), LoRA tensors
under `lora.<lm-relative name>.lora_A/B.weight` and the LoRA spec in its metadata. LoRA is merged as
W += (alpha / r) * B @ A, so the result is a plain model that exports as an ordinary HF checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from ..fileio import atomic_path

TRAINED = "trained.safetensors"  # a training run's weights file in its out_dir


def trained_file(src: str | Path) -> Path:
    """The weights file `src` names: the file itself, or a run's out_dir (its trained.safetensors).
    Existence is the caller's check, with its own message."""
    path = Path(src).expanduser()
    return path if path.suffix == ".safetensors" or path.is_file() else path / TRAINED


def apply_trained(model: torch.nn.Module, path: str | Path) -> dict:
    """Load projector + merged LoRA from `path` into `model` (a LlavaModel); returns the file's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trained weights {path} do not exist")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    proj = {k[len("multi_modal_projector."):]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    lm = model.language_model
    if meta.get("vision_feature_layer"):  # the tower layers this file's projector reads
        try:
            layers = json.loads(meta["vision_feature_layer"])
            model.set_feature_layers(layers)
        except (ValueError, TypeError, InputError) as e:
            raise CheckpointError(f"{path}: unusable vision_feature_layer {meta['vision_feature_layer']!r} in "
                                  f"its metadata ({e})") from None
    if "context.conv.weight" in proj and not model.multi_modal_projector.has_context:
        c, _, k, _ = proj["context.conv.weight"].shape  # (C, C, k, k): the branch this file was trained with
        model.add_projector_context(k, c)
    inject = {k[len("visual_inject."):]: v for k, v in state.items() if k.startswith("visual_inject.")}
    if inject and model.visual_inject is None:  # the branch this file was trained with: layers and rank
        try:
            downs = {int(k.split(".")[1]): v for k, v in inject.items() if k.startswith("down.")}
            model.add_visual_inject(sorted(downs), next(iter(downs.values())).shape[0])
        except (ValueError, IndexError, StopIteration, InputError) as e:
            raise CheckpointError(f"{path}: unreadable visual re-injection tensors ({e})") from None
    with torch.no_grad():
        if inject:
            try:
                model.visual_inject.load_state_dict(inject)
            except RuntimeError as e:
                raise CheckpointError(f"{path}: its visual re-injection branch does not match this model's "
                                      f"(layers {list(model.config.visual_inject_layers)}, rank "
                                      f"{model.config.visual_inject_rank}): {e}") from None
        try:
            model.multi_modal_projector.load_state_dict(proj)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: its projector does not match this model's (feature layers "
                                  f"{list(model.config.feature_layers)}, {model.config.projector.in_features} "
                                  f"input features): {e}") from None
        spec = json.loads(meta.get("lora") or "null")
        lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        if lora and not spec:
            raise CheckpointError(f"{path} has LoRA tensors but no LoRA spec in its metadata")
        params = dict(lm.named_parameters())
        for a_key in [k for k in lora if k.endswith(".lora_A.weight")]:
            base = a_key[: -len(".lora_A.weight")]
            name = base.replace(".lora_A", "") + ".weight"
            if name not in params:
                raise CheckpointError(f"{path}: LoRA for {base} but the model has no {name}")
            a, b = lora[a_key], lora[base + ".lora_B.weight"]  # (r, in), (out, r)
            params[name].add_((b.float() @ a.float()).to(params[name].dtype), alpha=spec["alpha"] / spec["r"])
    return meta


def compact_trained(src: str | Path, dst: str | Path) -> Path:
    """Write `src` (a run's trained.safetensors) to `dst` with LoRA and projector tensors in fp16.

    Ours, for shipping (half the bytes; the repository keeps tracked files under 20 MiB): fp16 keeps
    each weight to ~5e-4 relative; the feature statistics stay fp32 and `apply_trained` computes in
    the model's dtype. The metadata is kept. A `dst` ending in ".gz" is gzip-packed (the shipped
    default's form, unpacked by `llavakit.default.build.trained_weights`). Written to a temporary file
    and renamed, so `dst` is never half-written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"trained weights {src} do not exist")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    half = ("lora.", "multi_modal_projector.", "visual_inject.")
    out = {k: (v.half() if k.startswith(half) and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    with atomic_path(dst) as tmp:
        save_file(out, str(tmp), metadata=meta)
        if dst.name.endswith(".gz"):
            import gzip

            tmp.write_bytes(gzip.compress(tmp.read_bytes(), mtime=0))  # mtime 0: the same bytes on every run
    return dst
