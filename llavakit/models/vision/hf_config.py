"""Mapping between transformers vision configs / weights and llavakit's `VisionConfig` / towers.

Config dicts are as in an HF `config.json` (`vision_config` of a LLaVA checkpoint, or a stand-alone
vision model): `model_type` is clip_vision_model | siglip_vision_model | dinov2. Missing fields take
the defaults of transformers' config classes (CLIPVisionConfig, SiglipVisionConfig, Dinov2Config);
fields that do not change the forward pass (dropouts, initializer_range, projection_dim, backbone
out_features, ...) are ignored. Settings llavakit cannot reproduce raise `InputError`.

State dicts: our towers' keys equal transformers 5.x in-memory names. Checkpoints written by
transformers 4.x (most of the Hub) use older names; `convert_hf_vision_state_dict` maps them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ...config import VisionConfig
from ...errors import InputError

MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dinov2"}
_FAMILY_TO_TYPE = {v: k for k, v in MODEL_TYPES.items()}

# transformers 5.24 config-class defaults for the fields we read.
_COMMON = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
           "patch_size", "hidden_act", "layer_norm_eps")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
    "dinov2": dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                   image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                   layerscale_value=1.0),
}


def _square(name: str, value: Any) -> int:
    """HF allows image_size/patch_size as [h, w]; llavakit towers are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise InputError(f"{name} {list(value)} is not square; llavakit vision towers need a single size")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf_config_dict: Mapping[str, Any]) -> VisionConfig:
    """`VisionConfig` from an HF vision config dict (needs `model_type`)."""
    model_type = hf_config_dict.get("model_type")
    if model_type not in MODEL_TYPES:
        raise InputError(f"unsupported vision model_type {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    hf = {**_DEFAULTS[family], **{k: v for k, v in hf_config_dict.items() if k in _DEFAULTS[family]}}
    kw: dict[str, Any] = {k: hf[k] for k in _COMMON}
    kw["image_size"] = _square("image_size", kw["image_size"])
    kw["patch_size"] = _square("patch_size", kw["patch_size"])
    kw["layer_norm_eps"] = float(kw["layer_norm_eps"])
    if family == "dinov2":
        if hf_config_dict.get("use_swiglu_ffn", False):
            raise InputError("DINOv2 with use_swiglu_ffn=True (ViT-g) is not supported")
        ratio = float(hf["mlp_ratio"])
        if not ratio.is_integer():
            raise InputError(f"DINOv2 mlp_ratio {hf['mlp_ratio']} must be a whole number")
        kw.update(mlp_ratio=int(ratio), intermediate_size=int(kw["hidden_size"] * ratio),
                  qkv_bias=bool(hf["qkv_bias"]), layerscale_value=float(hf["layerscale_value"]))
    else:
        kw["intermediate_size"] = hf["intermediate_size"]
    return VisionConfig(family=family, **kw)


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """HF vision config dict (as in config.json) for `cfg`; loadable by transformers' config classes."""
    out: dict[str, Any] = {"model_type": _FAMILY_TO_TYPE[cfg.family]}
    out.update({k: getattr(cfg, k) for k in _COMMON})
    if cfg.family == "dinov2":
        if cfg.intermediate_size != cfg.hidden_size * cfg.mlp_ratio:
            raise InputError("DINOv2 intermediate_size must equal hidden_size * mlp_ratio")
        out.update(mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, layerscale_value=cfg.layerscale_value,
                   use_swiglu_ffn=False)
    else:
        if not cfg.qkv_bias:
            raise InputError(f"{cfg.family} vision towers always have q/k/v biases; qkv_bias=False has no HF form")
        out["intermediate_size"] = cfg.intermediate_size
        if cfg.family == "siglip":
            out["vision_use_head"] = False
    return out


_DINOV2_LEGACY = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def convert_hf_vision_state_dict(family: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a vision-model state dict in transformers 4.x or 5.x naming to our tower's keys.

    The caller strips the checkpoint's own prefix first (e.g. `vision_tower.` in a LLaVA checkpoint).
    - clip / siglip: a leading `vision_model.` (4.x `CLIPVisionModel`/`SiglipVisionModel`) is removed;
      SigLIP's attention-pooling `head.*` is dropped (LLaVA does not use it).
    - dinov2: 4.x attention names (`attention.attention.query`, `attention.output.dense`) are renamed;
      a missing `embeddings.mask_token` (unused in forward) is filled with zeros.
    """
    if family not in _FAMILY_TO_TYPE:
        raise InputError(f"unknown vision family {family!r}; valid: {', '.join(_FAMILY_TO_TYPE)}")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if family in ("clip", "siglip"):
            key = key.removeprefix("vision_model.")
            if family == "siglip" and key.startswith("head."):
                continue
        else:
            for old, new in _DINOV2_LEGACY:
                key = key.replace(old, new)
        out[key] = value
    if family == "dinov2" and "embeddings.mask_token" not in out and "embeddings.cls_token" in out:
        out["embeddings.mask_token"] = torch.zeros_like(out["embeddings.cls_token"][0])  # (1, D)
    return out
