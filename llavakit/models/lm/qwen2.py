"""Qwen2 decoder language model (Qwen team 2024): Llama's blocks with biases on q/k/v (never on o).

Reuses `llavakit.models.lm.llama` wholesale; only the bias choice differs. Weight names match
transformers' `Qwen2ForCausalLM`. Sliding-window attention (`use_sliding_window`, off in every
released Qwen2/2.5 config) is not implemented; `lm_config_from_hf` refuses configs that enable it.
"""

from __future__ import annotations

from ...config import LMConfig
from .llama import LlamaLM


class Qwen2LM(LlamaLM):
    """Qwen2 causal LM (q/k/v bias, no o bias)."""

    @staticmethod
    def attention_biases(cfg: LMConfig) -> tuple[bool, bool]:
        return True, False
