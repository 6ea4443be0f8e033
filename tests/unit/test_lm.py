"""Language models: HF state_dict compatibility and logits parity (llama, qwen2; tied and untied),
padding, KV cache, attention-row recompute, RoPE variants and HF config mapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llavakit.config import LMConfig
from llavakit.errors import InputError
from llavakit.layers.kv_cache import KVCache
from llavakit.models.lm import LlamaLM, Qwen2LM, build_lm
from llavakit.models.lm.hf_config import lm_config_from_hf, lm_config_to_hf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _randomize(model: nn.Module) -> nn.Module:
    """Weights large enough that logits differ clearly between positions (HF init is std 0.02)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_pair(family: str = "llama", tie: bool = False, attn: str = "sdpa", **extra):
    """A tiny random HF model and our model with the same weights (fp32, eval)."""
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    hf_cfg = cfg_cls(**TINY, tie_word_embeddings=tie, **extra)
    hf_cfg._attn_implementation = attn
    hf = _randomize(model_cls(hf_cfg)).eval()
    ours = build_lm(lm_config_from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def padded_batch():
    """Two prompts of lengths 9 and 5, left-padded with 0 to (2, 9)."""
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


VARIANTS = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


@pytest.mark.parametrize("family,tie", VARIANTS)
def test_state_dict_keys_and_tying_match_hf(family, tie):
    hf, ours = make_pair(family, tie)
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert type(ours) is (LlamaLM if family == "llama" else Qwen2LM)
    shared = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert shared == tie
    if family == "qwen2":
        attn = ours.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None


@pytest.mark.parametrize("family,tie", VARIANTS)
@torch.no_grad()
def test_logits_parity_padded_and_unpadded(family, tie):
    hf, ours = make_pair(family, tie)
    ids, mask = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours.logits(ours(ours.embed(ids), mask))
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4

    ref = hf(input_ids=ids[:1]).logits
    got = ours.logits(ours(ours.embed(ids[:1]), None))
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_chunked_forward_through_cache_matches_one_shot(padded):
    _, ours = make_pair("llama")
    ids, mask = padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    embeds = ours.embed(ids)
    full = ours(embeds, mask if padded else None)
    cache = ours.new_cache(2, 16)
    parts = []
    for lo, hi in ((0, 5), (5, 8), (8, 9)):  # prefill, multi-token extension, one-token decode
        parts.append(ours(embeds[:, lo:hi], mask[:, :hi] if padded else None, None, cache))
    assert cache.seq_len() == 9 and cache.lengths == [9, 9]
    chunked = torch.cat(parts, dim=1)
    real = mask.bool()
    assert (chunked[real] - full[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_layer_attention_rows_match_hf_eager(family):
    hf, ours = make_pair(family, attn="eager")
    ids, mask = padded_batch()
    out = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask), output_attentions=True,
             output_hidden_states=True)
    rows = torch.tensor([4, 6, 8])  # real query rows in both prompts
    for layer in range(2):
        got = ours.layer_attention_rows(layer, out.hidden_states[layer], None, rows, mask)
        ref = out.attentions[layer][:, :, rows]
        assert got.shape == (2, 4, 3, 9)
        assert (got - ref).abs().max() <= 1e-5
        assert torch.allclose(got.sum(-1), torch.ones(2, 4, 3))


@torch.no_grad()
def test_llama3_rope_parity_and_unsupported_rope_raises():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf, ours = make_pair("llama", rope_parameters=rope)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    assert torch.allclose(ours.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    ids = torch.randint(1, 128, (1, 12))
    pos = torch.arange(100, 112)[None]  # beyond the original context, where scaling matters
    ref = hf(input_ids=ids, position_ids=pos).logits
    got = ours.logits(ours(ours.embed(ids), None, pos))
    assert (got - ref).abs().max() <= 1e-4
    with pytest.raises(InputError, match="rope type"):
        LlamaLM(LMConfig(**{**_small(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))


def _small() -> dict:
    return dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)


def test_build_lm_dispatch_and_cache_overflow():
    assert type(build_lm(LMConfig(family="qwen2", **_small()))) is Qwen2LM
    lm = build_lm(LMConfig(**_small()))
    cache = lm.new_cache(1, 4)
    assert isinstance(cache, KVCache) and cache.keys[0].shape == (1, 2, 4, 16)
    with pytest.raises(InputError, match="cache is full"):
        lm(torch.randn(1, 5, 64), None, None, cache)
    with pytest.raises(InputError, match="attention_mask"):
        lm(torch.randn(1, 3, 64), torch.ones(1, 4))


def test_hf_config_both_rope_styles_and_round_trip():
    base = {"model_type": "llama", **_small(), "eos_token_id": [5, 7], "tie_word_embeddings": True, "head_dim": 32}
    old = lm_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = lm_config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert old == new
    assert old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert old.eos_token_id == (5, 7) and old.tie_word_embeddings and old.dim_head == 32
    assert lm_config_from_hf(lm_config_to_hf(old)) == old
    hf = LlamaConfig(**lm_config_to_hf(old))  # transformers reads what we write
    assert hf.rope_parameters["rope_theta"] == 5e5 and hf.rope_parameters["rope_type"] == "linear"
    assert lm_config_from_hf(hf.to_dict()) == old
    plain = lm_config_from_hf({"model_type": "qwen2", **_small(), "eos_token_id": 3})
    assert plain.family == "qwen2" and plain.rope_scaling is None and plain.eos_ids == (3,)
    assert lm_config_from_hf(Qwen2Config(**_small()).to_dict()).family == "qwen2"
    with pytest.raises(InputError, match="model_type"):
        lm_config_from_hf({"model_type": "mistral", **_small()})
    with pytest.raises(InputError, match="sliding"):
        lm_config_from_hf({"model_type": "qwen2", **_small(), "use_sliding_window": True})
    with pytest.raises(InputError, match="rope type"):
        lm_config_from_hf({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


@torch.no_grad()
def test_bf16_cast_keeps_rope_fp32_and_tracks_fp32():
    _, ours = make_pair("llama")
    ids, mask = padded_batch()
    ref = ours.logits(ours(ours.embed(ids), mask))
    ours = ours.to(torch.bfloat16)
    assert ours.rotary.inv_freq.dtype == torch.float32
    cache = ours.new_cache(2, 12)
    assert cache.keys[0].dtype == torch.bfloat16
    got = ours.logits(ours(ours.embed(ids), mask, None, cache))
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    assert torch.allclose(got[real].float(), ref[real], atol=0.15 * ref.abs().max().item())
