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


def grow_lora_state(module: nn.Module, state: dict[str, Tensor], old: dict, new: LoraSpec) -> dict[str, Tensor]:
    """Embed a trained adapter (`state`, spec `old`: r, alpha, targets) in `module`'s larger adapter (`new`).

    Ours, so a later recipe can add rank or target modules and still start from an earlier run: the old
    A fills the first r_old rows of the new A, B * (s_old / s_new) the first r_old columns of the new B
    (s = alpha / r), the rest keeps peft's fresh init (B = 0). The product s B A, hence the model's
    output, is unchanged. Shrinking the rank or dropping a target is an error (it would lose weights).
    """
    r_old, r_new = int(old["r"]), new.r
    missing = sorted(set(old["targets"]) - set(new.targets))
    if r_new < r_old or missing:
        raise ValueError(f"cannot grow LoRA r={r_old} {list(old['targets'])} into r={r_new} {list(new.targets)}"
                         + (f": targets {missing} would be dropped" if missing else ": the rank would shrink"))
    ratio = (old["alpha"] / r_old) / (new.alpha / r_new)
    own = {k.replace(f".{ADAPTER}.", "."): v for k, v in module.state_dict().items() if ".lora_" in k}
    out = {}
    for k, v in state.items():
        if k not in own:
            raise KeyError(f"LoRA tensor {k} has no matching adapter")
        t = own[k].detach().clone()
        if ".lora_A." in k:  # (r, in)
            t[:r_old] = v.to(t.dtype)
        else:  # lora_B: (out, r)
            t[:, :r_old] = v.to(t.dtype) * ratio
        out[k] = t
    return out


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
