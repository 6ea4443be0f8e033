"""HF-format checkpoints: config mapping, weight reading, key normalisation, export.

Reads the llava-hf formats of LLaVA-1.5 (`LlavaForConditionalGeneration`), LLaVA-NeXT
(`LlavaNextForConditionalGeneration`), LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`) and
plain `LlamaForCausalLM` / `Qwen2ForCausalLM`. Config parsing goes through transformers' own config
classes (they fill defaults and legacy fields exactly as transformers would); weights are read with
safetensors first, a `.bin` only through `torch.load(weights_only=True)`.

Two key layouts exist in the wild: the legacy one (`language_model.model.*`, `vision_tower.vision_model.*`,
what llava-hf repos hold) and transformers-5's (`model.language_model.*`, `lm_head.*`). Both load;
export writes what transformers' own `save_pretrained` writes, so transformers reloads it unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .config import LMConfig, ProjectorConfig, VLMConfig
from .errors import CheckpointError
from .fileio import atomic_write_text
from .models.lm.hf_config import lm_config_from_hf, lm_config_to_hf
from .models.vision.hf_config import convert_hf_vision_state_dict, vision_config_from_hf, vision_config_to_hf

HF_ARCHITECTURES = {
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "llama": ("lm", "LlamaForCausalLM"),
    "qwen2": ("lm", "Qwen2ForCausalLM"),
}

# Chat template per text family when the checkpoint ships none (see llavakit.data.templates).
_DEFAULT_TEMPLATE = {"llama": "vicuna_v1", "qwen2": "chatml"}


def read_config_json(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; expected an HF-format model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    mt = raw.get("model_type")
    if mt not in HF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture model_type={mt!r} (architectures={raw.get('architectures')}); "
            f"supported model types: {', '.join(HF_ARCHITECTURES)}")
    return raw


def _full_hf_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults through transformers' config class of that model type."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(**raw)
    except Exception as e:  # transformers raises many kinds here
        raise CheckpointError(f"config.json could not be parsed as {raw.get('model_type')}: {e}") from None
    return cfg.to_dict()


def vlm_config_from_hf(raw: Mapping[str, Any]) -> VLMConfig:
    full = _full_hf_config(raw)
    arch, _ = HF_ARCHITECTURES[raw["model_type"]]
    if arch == "lm":
        lm = lm_config_from_hf(full)
        return VLMConfig(architecture="lm", lm=lm, chat_template=_DEFAULT_TEMPLATE[lm.family])
    text = full["text_config"]
    lm = lm_config_from_hf(text)
    vision = vision_config_from_hf(full["vision_config"])
    layers = full.get("vision_feature_layer", -2)
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else int(layers)
    n_layers = len(layers) if isinstance(layers, tuple) else 1
    projector = ProjectorConfig(
        kind="mlp2x_gelu", in_features=vision.hidden_size * n_layers, out_features=lm.hidden_size,
        bias=bool(full.get("multimodal_projector_bias", True)), hidden_act=full.get("projector_hidden_act", "gelu"))
    image_token = full.get("image_token_index", full.get("image_token_id"))
    if image_token is None:
        raise CheckpointError("config.json names no image_token_index")
    image_size = None
    # transformers writes image_seq_length=576 for every LLaVA config, so it only tells the input size
    # for towers that interpolate positions to any size (DINOv2); CLIP/SigLIP run at their native size.
    seq = raw.get("image_seq_length")
    if arch == "llava" and seq and vision.family == "dinov2":
        side = int(round(math.sqrt(int(seq) - (1 if full.get("vision_feature_select_strategy") == "full"
                                               and vision.has_cls else 0)))) * vision.patch_size
        image_size = side if side != vision.image_size else None
    return VLMConfig(
        image_size=image_size,
        architecture=arch, vision=vision, lm=lm, projector=projector, image_token_id=int(image_token),
        vision_feature_layer=layers,
        vision_feature_select_strategy=full.get("vision_feature_select_strategy", "default"),
        image_grid_pinpoints=tuple(tuple(int(v) for v in p) for p in full.get("image_grid_pinpoints") or ()),
        vision_aspect_ratio=full.get("vision_aspect_ratio", "anyres_max_9"),
        chat_template=_DEFAULT_TEMPLATE[lm.family])


def vlm_config_to_hf(cfg: VLMConfig) -> dict[str, Any]:
    if cfg.architecture == "lm":
        out = lm_config_to_hf(cfg.lm)
        out["architectures"] = [HF_ARCHITECTURES[cfg.lm.family][1]]
        return out
    if cfg.projector.kind != "mlp2x_gelu":
        raise CheckpointError(f"HF LLaVA formats have only the mlp2x_gelu projector, not {cfg.projector.kind!r}")
    if cfg.projector.context_kernel:
        raise CheckpointError(f"HF LLaVA formats cannot hold the projector's local-context branch "
                              f"(context_kernel={cfg.projector.context_kernel}); keep this model in llavakit's "
                              f"trained-weights form (llavakit.load('default') + its .safetensors)")
    if cfg.visual_inject_layers:
        raise CheckpointError(f"HF LLaVA formats cannot hold the visual re-injection branch (layers "
                              f"{list(cfg.visual_inject_layers)}); keep this model in llavakit's trained-weights form "
                              f"(llavakit.load('default') + its .safetensors)")
    model_type = cfg.architecture
    out: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [HF_ARCHITECTURES[model_type][1]],
        "text_config": lm_config_to_hf(cfg.lm),
        "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_id,
        "vision_feature_layer": list(cfg.vision_feature_layer) if isinstance(cfg.vision_feature_layer, tuple)
        else cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector.hidden_act,
        "multimodal_projector_bias": cfg.projector.bias,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings,
    }
    if cfg.architecture == "llava":
        extra = 1 if cfg.vision_feature_select_strategy == "full" and cfg.vision.has_cls else 0
        out["image_seq_length"] = cfg.view_grid ** 2 + extra
    if cfg.is_anyres:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cfg.architecture == "llava_onevision":
        out["vision_aspect_ratio"] = cfg.vision_aspect_ratio
    return out


# ---------------------------------------------------------------------- weights
def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory: model.safetensors(.index.json) first, else pytorch_model.bin."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: missing shard file(s) {', '.join(missing)} listed in {index_name}")
            out: dict[str, Tensor] = {}
            for s in shards:
                out.update(_read_one(path / s, loader))
            return out
    for name, loader in (("model.safetensors", "st"), ("pytorch_model.bin", "pt")):
        if (path / name).is_file():
            return _read_one(path / name, loader)
    raise CheckpointError(f"{path}: no weights found (model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin)")


def _read_one(file: Path, kind: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        if kind == "st":
            return load_file(str(file))
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read weights from {file}: {e}") from None


def normalize_keys(state: Mapping[str, Tensor], config: VLMConfig) -> dict[str, Tensor]:
    """Map legacy and transformers-5 key layouts onto llavakit's module names."""
    out: dict[str, Tensor] = {}
    vision: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key
        if config.architecture == "lm":
            out["language_model." + k] = value
            continue
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("model."):
            k = k[len("model."):]
        if k.startswith("vision_tower."):
            vision[k[len("vision_tower."):]] = value
        else:
            out[k] = value
    if vision:
        for k, v in convert_hf_vision_state_dict(config.vision.family, vision).items():
            out["vision_tower." + k] = v
    return out


def export_state_dict(model: torch.nn.Module, arch: str, tied: bool) -> dict[str, Tensor]:
    """Our state dict in the layout transformers' save_pretrained writes (contiguous, no tied copy)."""
    out = {}
    for k, v in model.state_dict().items():
        if tied and k.endswith("lm_head.weight"):
            continue
        if arch == "lm":
            k = k[len("language_model."):]
        out[k] = v.detach().contiguous()
    return out


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
