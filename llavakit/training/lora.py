"""LoRA on the language model through peft, and merging it back into plain weights.

`apply_lora` injects peft LoRA layers into our LM (no PeftModel wrapper: our modules stay ours);
`lora_state` / `load_lora_state` read and write only the adapter tensors; `merge_lora` folds
W += B A * alpha / r into the base Linear and removes the adapter, so a trained model exports as an
ordinary HF checkpoint.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .config import LoraSpec

ADAPTER = "default"  # peft's adapter name


def apply_lora(module: nn.Module, spec: LoraSpec) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets))
    return inject_adapter_in_model(cfg, module)


def lora_state(module: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors named `<linear>.lora_A.weight` / `.lora_B.weight` (peft's adapter name dropped)."""
    return {k.replace(f".{ADAPTER}.", "."): v.detach().clone() for k, v in module.state_dict().items()
            if ".lora_" in k}


def load_lora_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    state = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
             for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise KeyError(f"LoRA tensors without a matching adapter: {missing[:4]}")
    module.load_state_dict(state, strict=False)


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA layer into its base Linear and put the base layer back; returns layers merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], child.get_base_layer())
            merged += 1
    return merged
