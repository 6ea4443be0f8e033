"""Decoder language models. `build_lm(config)` picks the implementation by exact family name."""

from __future__ import annotations

from ...config import LMConfig
from ...errors import InputError
from .llama import LlamaLM
from .qwen2 import Qwen2LM

LM_CLASSES: dict[str, type[LlamaLM]] = {"llama": LlamaLM, "qwen2": Qwen2LM}


def build_lm(config: LMConfig) -> LlamaLM:
    """A randomly initialised language model for `config` (load weights with `load_state_dict`)."""
    try:
        cls = LM_CLASSES[config.family]
    except KeyError:
        valid = ", ".join(sorted(LM_CLASSES))
        raise InputError(f"unknown language-model family {config.family!r}; valid: {valid}") from None
    return cls(config)


__all__ = ["LM_CLASSES", "LlamaLM", "Qwen2LM", "build_lm"]
