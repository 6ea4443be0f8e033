"""Tiny random transformers checkpoints of every supported family, saved to a directory.

Used by the parity suite (our logits vs transformers' on the same files) and by API/CLI tests.
Each builder writes `save_pretrained` output plus a small word-level tokenizer whose `<image>` token
is the config's image token, so the whole processor path runs too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
IMAGE_TOKEN = 100
WORDS = ["what", "is", "in", "the", "image", "a", "red", "circle", "blue", "square", "describe", "colour",
         "shape", "?", "USER:", "ASSISTANT:", "yes", "no", "of", "and"]


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN
    del vocab[f"w{IMAGE_TOKEN}"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    fast.save_pretrained(str(path))


def _llama_cfg(**kw):
    from transformers import LlamaConfig
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    base.update(kw)
    return LlamaConfig(**base)


def _qwen2_cfg(**kw):
    from transformers import Qwen2Config
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    base.update(kw)
    return Qwen2Config(**base)


def _clip_cfg(image_size=32, patch_size=8):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size)


def _siglip_cfg(image_size=32, patch_size=8):
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, vision_use_head=False)


def _randomize(model: torch.nn.Module) -> None:
    """Give every parameter non-trivial values (HF inits some to zeros/ones, hiding bugs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def build(kind: str, path: Path) -> Path:
    """Write a tiny random checkpoint of `kind` to `path` and return it."""
    from transformers import (LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM)

    torch.manual_seed(0)
    if kind == "llava":
        cfg = LlavaConfig(vision_config=_clip_cfg(), text_config=_llama_cfg(), image_token_index=IMAGE_TOKEN,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
    elif kind == "llava_multilayer":
        cfg = LlavaConfig(vision_config=_clip_cfg(), text_config=_llama_cfg(), image_token_index=IMAGE_TOKEN,
                          vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
        model = LlavaForConditionalGeneration(cfg)
    elif kind == "llava_next":
        cfg = LlavaNextConfig(vision_config=_clip_cfg(), text_config=_llama_cfg(), image_token_index=IMAGE_TOKEN,
                              image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], vision_feature_layer=-2)
        model = LlavaNextForConditionalGeneration(cfg)
    elif kind == "llava_onevision":
        cfg = LlavaOnevisionConfig(vision_config=_siglip_cfg(), text_config=_qwen2_cfg(),
                                   image_token_index=IMAGE_TOKEN,
                                   image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [96, 96]],
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_2")
        model = LlavaOnevisionForConditionalGeneration(cfg)
    elif kind == "llama":
        model = LlamaForCausalLM(_llama_cfg())
    elif kind == "llama_tied":
        model = LlamaForCausalLM(_llama_cfg(tie_word_embeddings=True))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(_qwen2_cfg())
    else:
        raise ValueError(kind)
    _randomize(model)
    model.eval()
    model.save_pretrained(str(path))
    _write_tokenizer(path)
    if kind.startswith("llava"):
        size = 32
        pre = {"do_resize": True, "size": {"height": size, "width": size}, "do_center_crop": False,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3, "resample": 3, "do_convert_rgb": True}
        pre["image_processor_type"] = {"llava_next": "LlavaNextImageProcessor",
                                       "llava_onevision": "LlavaOnevisionImageProcessor"}.get(kind, "CLIPImageProcessor")
        pre["crop_size"] = {"height": size, "width": size}
        if kind in ("llava_next", "llava_onevision"):
            pre["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
            pre["do_pad"] = True
        (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


KINDS = ["llava", "llava_multilayer", "llava_next", "llava_onevision", "llama", "llama_tied", "qwen2"]


def noise_images(n: int, size: int = 32, seed: int = 0) -> list:
    """`n` RGB noise images (PIL) of `size` x `size`, deterministic in `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
