"""Map transformers `text_config` dicts (LlamaConfig / Qwen2Config `to_dict()` or config.json) to
`LMConfig` and back.

Both RoPE spellings are read: transformers < 5 (`rope_theta` + `rope_scaling`) and transformers >= 5
(`rope_parameters = {"rope_type", "rope_theta", ...}`); when both are present `rope_parameters` wins,
as in transformers 5. `lm_config_to_hf` writes both spellings so either generation of transformers
reads the same model. Unknown keys in the input are ignored (HF configs carry many runtime fields).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...config import LMConfig
from ...errors import InputError
from ...layers.rope import SUPPORTED_ROPE_TYPES, rope_type

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Model-type defaults where a key is absent (transformers' LlamaConfig / Qwen2Config defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None),
}


def _rope(text_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either RoPE spelling."""
    params = text_config.get("rope_parameters")
    if params:
        if any(isinstance(v, Mapping) for v in params.values()):
            raise InputError("per-layer-type rope_parameters are not supported for llama/qwen2 language models")
        theta = float(params.get("rope_theta", text_config.get("rope_theta") or 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(text_config.get("rope_theta") or 10000.0)
        scaling = dict(text_config.get("rope_scaling") or {})
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise InputError(f"unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return theta, scaling


def _head_dim(d: Mapping[str, Any], heads: int) -> int | None:
    """Explicit head_dim, or None where it equals hidden_size // heads (so from/to round-trips)."""
    hd = d.get("head_dim")
    if not hd or int(hd) == int(d["hidden_size"]) // heads:
        return None
    return int(hd)


def lm_config_from_hf(text_config: Mapping[str, Any]) -> LMConfig:
    """LMConfig from a transformers llama/qwen2 config dict."""
    model_type = text_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise InputError(f"unsupported language model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    if model_type == "qwen2":
        types = text_config.get("layer_types") or ()
        if text_config.get("use_sliding_window") or any(t != "full_attention" for t in types):
            raise InputError("Qwen2 sliding-window attention (use_sliding_window=True) is not supported")
    d = {**_DEFAULTS[model_type], **{k: v for k, v in text_config.items() if v is not None or k.endswith("token_id")}}
    theta, scaling = _rope(text_config)
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = tuple(int(e) for e in eos)
    heads = int(d["num_attention_heads"])
    return LMConfig(
        family=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=_head_dim(d, heads),
        hidden_act=str(d.get("hidden_act", "silu")),
        rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d["max_position_embeddings"]),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)) if model_type == "llama" else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
    )


def lm_config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """A transformers config dict (`LlamaConfig(**d)` / `Qwen2Config(**d)` / config.json) for `cfg`."""
    rope_parameters = {"rope_type": "default", **dict(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    d: dict[str, Any] = {
        "model_type": cfg.family,
        "architectures": [MODEL_TYPES[cfg.family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,  # transformers < 5
        "rope_parameters": rope_parameters,  # transformers >= 5
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family == "llama":
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = cfg.mlp_bias
    else:
        d["use_sliding_window"] = False
    return d
