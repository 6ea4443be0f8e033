"""Analytic cost accounting: hand-computed values on a tiny config, properties, the default-like model."""

import json

import pytest

from llavakit.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig
from llavakit.cost import (
    RequestCost,
    kv_cache_bytes,
    lm_decode_token_flops,
    lm_head_flops,
    lm_layer_prefill_flops,
    projector_flops,
    request_cost,
    tokens_per_image,
    vision_flops,
    vision_layers_run,
)
from llavakit.errors import InputError

# Tiny model: CLIP-style tower (CLS), 8x8 px image, patch 4 -> 2x2 patches + CLS = 5 tokens, width 8,
# 2 heads of 4, MLP 16, 2 layers (feature layer -2 -> 1 layer runs). LM: width 8, 2 layers, 2 heads,
# 1 KV head, head_dim 4, MLP 16, vocab 10. Projector mlp2x_gelu 8 -> 8 -> 8.
TINY_VISION = VisionConfig(family="clip", hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, image_size=8, patch_size=4, num_channels=3)
TINY_LM = LMConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=4)
TINY = VLMConfig(vision=TINY_VISION, lm=TINY_LM,
                 projector=ProjectorConfig(kind="mlp2x_gelu", in_features=8, out_features=8))

# Hand-computed pieces (multiply-add = 2 FLOPs).
PATCH_EMBED = 4 * (3 * 4 * 4) * 8 * 2  # 4 patches x 48 pixels x 8 out x 2 = 3072
VIT_LAYER = (4 * (2 * 5 * 8 * 8)  # q,k,v,o: 4 x 640 = 2560
             + 2 * (5 * 5 * 8 * 2)  # QK^T and AV: 25 pairs x (2 heads x 4 dims) x 2, each 400 -> 800
             + 2 * (2 * 5 * 8 * 16))  # fc1 + fc2: 2 x 1280 = 2560   -> layer = 5920
LM_LINEAR_PER_TOKEN = (2 * 8 * 8  # q: 8 -> 2 heads x 4 = 128
                       + 2 * 8 * 4  # k: 8 -> 1 kv head x 4 = 64
                       + 2 * 8 * 4  # v = 64
                       + 2 * 8 * 8  # o = 128
                       + 3 * 2 * 8 * 16)  # gate, up, down = 768   -> 1152 per token
LM_PER_PAIR = 2 * 2 * 4 * 2  # (QK^T + AV) x 2 FLOPs x head_dim 4 x 2 query heads = 32 per (q, k) pair
LM_HEAD_PER_POS = 2 * 8 * 10  # 160


def test_tiny_pieces_written_out():
    assert PATCH_EMBED == 3072 and VIT_LAYER == 5920
    assert LM_LINEAR_PER_TOKEN == 1152 and LM_PER_PAIR == 32 and LM_HEAD_PER_POS == 160


def test_vision_flops_tiny():
    assert vision_layers_run(TINY) == 1  # -2 of 2 layers
    assert vision_flops(TINY_VISION, 1, num_layers_run=1) == 3072 + 5920
    assert vision_flops(TINY_VISION, 3, num_layers_run=1) == 3 * 8992
    assert vision_flops(TINY_VISION, 1) == 3072 + 2 * 5920  # default: every layer
    # A 1x2 grid: 2 patches + CLS = 3 tokens.
    emb = 2 * 48 * 8 * 2  # 1536
    layer = 4 * (2 * 3 * 8 * 8) + 2 * (3 * 3 * 8 * 2) + 2 * (2 * 3 * 8 * 16)  # 1536 + 288 + 1536
    assert vision_flops(TINY_VISION, 1, num_layers_run=1, grid=(1, 2)) == emb + layer == 4896


def test_vision_flops_siglip_has_no_cls_and_dinov2_uses_mlp_ratio():
    sig = VisionConfig(family="siglip", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, image_size=8, patch_size=4)
    # 4 tokens: q,k,v,o 4 x (2*4*8*8)=2048; attn 2 x (16 pairs x 8 x 2)=512; MLP 2 x (2*4*8*16)=2048
    assert vision_flops(sig, 1) == 3072 + 2048 + 512 + 2048
    dino = VisionConfig(family="dinov2", hidden_size=8, intermediate_size=999, mlp_ratio=2,
                        num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
    assert vision_flops(dino, 1) == 3072 + 5920  # MLP width 8 * 2 = 16, intermediate_size ignored


def test_feature_layers():
    assert vision_layers_run(VLMConfig(vision=TINY_VISION, vision_feature_layer=-1)) == 2
    assert vision_layers_run(VLMConfig(vision=TINY_VISION, vision_feature_layer=(0, -2))) == 1
    assert vision_layers_run(VLMConfig(vision=TINY_VISION, vision_feature_layer=2)) == 2
    with pytest.raises(InputError, match="out of range"):
        vision_layers_run(VLMConfig(vision=TINY_VISION, vision_feature_layer=-4))


def test_tokens_per_image():
    assert tokens_per_image(TINY) == 4
    assert tokens_per_image(VLMConfig(vision=TINY_VISION, vision_feature_select_strategy="full")) == 5
    assert tokens_per_image(VLMConfig(vision=TINY_VISION, vision_feature_layer=(-2, -1))) == 4
    sig = VisionConfig(family="siglip", image_size=8, patch_size=4, hidden_size=8, num_attention_heads=2)
    assert tokens_per_image(VLMConfig(vision=sig, vision_feature_select_strategy="full")) == 4
    with pytest.raises(InputError, match="llava"):
        tokens_per_image(VLMConfig(architecture="llava_next"))


def test_projector_flops_tiny():
    assert projector_flops(TINY.projector, 4) == 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8  # 1024
    assert projector_flops(ProjectorConfig(kind="linear", in_features=8, out_features=6), 4) == 2 * 4 * 8 * 6
    # the local-context branch (8 -> 2, 3x3 conv 2 -> 2, 2 -> 8) runs on the full grid (16 tokens) before pruning
    ctx = ProjectorConfig(kind="linear", in_features=8, out_features=6, context_kernel=3, context_channels=2)
    assert projector_flops(ctx, 4, 16) == 2 * 4 * 8 * 6 + 2 * 16 * (8 * 2 + 18 * 2 + 2 * 8)


def test_lm_layer_tiny():
    # 3 tokens, no past: causal pairs 1 + 2 + 3 = 6.
    assert lm_layer_prefill_flops(TINY_LM, 3) == 3 * 1152 + 6 * 32 == 3648
    # 2 new tokens after 5 cached: pairs 6 + 7 = 13.
    assert lm_layer_prefill_flops(TINY_LM, 2, past=5) == 2 * 1152 + 13 * 32
    # Decode with 7 keys: 2 layers x (1152 + 7 x 32) + lm_head 160.
    assert lm_decode_token_flops(TINY_LM, 7) == 2 * (1152 + 224) + 160 == 2912
    assert lm_head_flops(TINY_LM, 3) == 3 * 160


def test_kv_cache_bytes_tiny():
    # 2 (K,V) x 2 layers x 1 kv head x 4 dims x 8 tokens x 2 bytes
    assert kv_cache_bytes(TINY_LM, 8) == 2 * 2 * 1 * 4 * 8 * 2 == 256
    assert kv_cache_bytes(TINY_LM, 8, dtype_bytes=4, batch=3) == 256 * 2 * 3


def test_request_cost_tiny():
    rc = request_cost(TINY, visual_tokens=4, text_tokens=2, new_tokens=3)
    # prompt 6 tokens; per layer 6 x 1152 + 21 pairs x 32 = 6912 + 672 = 7584
    assert rc.vision_flops == 3072 + 5920  # 1 view, 1 of 2 layers run
    assert rc.projector_flops == 1024
    assert rc.lm_prefill_flops_per_layer == (7584, 7584)
    assert rc.lm_prefill_flops == 15168
    assert rc.lm_head_flops == 160  # last position only
    # decode steps: token 2 attends 7 keys, token 3 attends 8
    assert rc.decode_flops_per_token == (2 * (1152 + 7 * 32) + 160, 2 * (1152 + 8 * 32) + 160) == (2912, 2976)
    assert rc.decode_flops == 5888
    assert rc.total_flops == 8992 + 1024 + 15168 + 160 + 5888 == 31232
    # cache at the end: 6 prompt + 2 fed-back tokens = 8 per layer
    assert rc.kv_cache_bytes == 256
    assert rc.visual_tokens == {"vision": 4, "projector": 4, "llm": 4}
    assert rc.prompt_tokens == 6 and rc.new_tokens == 3

    all_logits = request_cost(TINY, visual_tokens=4, text_tokens=2, new_tokens=3, prefill_logits_all=True)
    assert all_logits.lm_head_flops == 6 * 160
    one = request_cost(TINY, visual_tokens=4, text_tokens=2, new_tokens=1)
    assert one.decode_flops_per_token == () and one.kv_cache_bytes == 2 * 2 * 4 * 6 * 2


def test_request_cost_stages_and_tokens_per_layer():
    rc = request_cost(TINY, visual_tokens=2, text_tokens=2, new_tokens=2, num_views=2,
                      visual_tokens_per_stage={"prune": 3, "projector": 3}, tokens_per_layer=[4, 1])
    assert list(rc.visual_tokens.items()) == [("vision", 8), ("prune", 3), ("projector", 3), ("llm", 2)]
    assert rc.vision_flops == 2 * 8992
    assert rc.projector_flops == 3 * 256
    assert rc.lm_prefill_flops_per_layer == (4 * 1152 + 10 * 32, 1152 + 1 * 32)
    # one decode step: layer 0 attends 5 keys, layer 1 attends 2
    assert rc.decode_flops_per_token == (2 * 1152 + (5 + 2) * 32 + 160,)
    assert rc.kv_cache_bytes == 2 * 1 * 4 * 2 * (5 + 2)  # per-layer caches of 5 and 2 positions
    with pytest.raises(InputError, match="2 layers"):
        request_cost(TINY, visual_tokens=2, text_tokens=2, new_tokens=2, tokens_per_layer=[4])
    with pytest.raises(InputError, match="disagrees"):
        request_cost(TINY, visual_tokens=2, text_tokens=2, new_tokens=2, visual_tokens_per_stage={"llm": 3})
    with pytest.raises(InputError):
        request_cost(TINY, visual_tokens=-1, text_tokens=2, new_tokens=2)


def test_properties():
    lm = TINY_LM
    d = [lm_decode_token_flops(lm, c) for c in range(1, 40)]
    steps = {b - a for a, b in zip(d, d[1:])}
    assert steps == {2 * LM_PER_PAIR}  # linear in context: constant increment (2 layers x 32)
    assert all(kv_cache_bytes(lm, t) == t * kv_cache_bytes(lm, 1) for t in range(0, 50))
    pre = [lm_layer_prefill_flops(lm, t) for t in range(0, 60)]
    assert all(a < b for a, b in zip(pre, pre[1:]))
    full = request_cost(TINY, visual_tokens=4, text_tokens=2, new_tokens=5)
    pruned = request_cost(TINY, visual_tokens=4, text_tokens=2, new_tokens=5, tokens_per_layer=[6, 3])
    assert pruned.lm_prefill_flops < full.lm_prefill_flops
    assert pruned.decode_flops < full.decode_flops and pruned.total_flops < full.total_flops
    assert pruned.kv_cache_bytes < full.kv_cache_bytes


def default_like() -> VLMConfig:
    """DINOv2 ViT-S/14 at 224 px + SmolLM2-135M + mlp2x_gelu 384 -> 576 -> 576."""
    vision = VisionConfig(family="dinov2", hidden_size=384, intermediate_size=1536, mlp_ratio=4,
                          num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=14)
    lm = LMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    return VLMConfig(vision=vision, lm=lm, projector=ProjectorConfig(in_features=384, out_features=576))


def test_request_cost_default_like():
    cfg = default_like()
    vt = tokens_per_image(cfg)
    assert vt == 256
    rc = request_cost(cfg, visual_tokens=vt, text_tokens=30, new_tokens=32)
    # Non-embedding params per layer: q,o 576*576 each; k,v 576*192 each; MLP 3*576*1536.
    n_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    n_nonembed = 30 * n_layer
    assert 100e6 < n_nonembed < 110e6 and 130e6 < n_nonembed + 49152 * 576 < 140e6  # ~135M params
    rule = 2 * n_nonembed * 286  # 2 N T
    assert rule < rc.lm_prefill_flops < 1.1 * rule  # attention adds a few percent at 286 tokens
    assert 0.05e12 < rc.lm_prefill_flops + rc.lm_head_flops < 0.1e12
    # ViT-S/14 at 224 px, 257 tokens, 11 of 12 layers: ~6 GMACs for all 12 layers -> ~11 GFLOPs here.
    assert 9e9 < rc.vision_flops < 13e9
    assert len(rc.decode_flops_per_token) == 31
    # KV cache: 2 x 30 layers x 3 heads x 64 x (286 + 31) tokens x 2 bytes
    assert rc.kv_cache_bytes == 2 * 30 * 3 * 64 * 317 * 2
    text = rc.summary()
    print(text)
    for word in ("GFLOPs", "MB", "vision 256", "llm 256", "30 layers", "31 steps"):
        assert word in text
    d = rc.to_dict()
    assert json.loads(json.dumps(d)) == d and isinstance(rc, RequestCost)
    with pytest.raises(Exception):
        rc.total_flops = 0  # frozen


def test_llava15_7b_defaults_report_tflops():
    cfg = VLMConfig()  # CLIP ViT-L/14-336 + 7B Llama: 576 visual tokens
    rc = request_cost(cfg, visual_tokens=tokens_per_image(cfg), text_tokens=64, new_tokens=1)
    assert 2 * 6.4e9 * 640 < rc.lm_prefill_flops < 1.1 * 2 * 6.6e9 * 640  # 2 N T, N ~ 6.5B non-embed
    assert "TFLOPs" in rc.summary()


def test_text_only_model():
    from llavakit import config as config_mod

    if "lm" not in config_mod.ARCHITECTURES:
        pytest.skip("no text-only architecture in this config version")
    cfg = VLMConfig(architecture="lm", lm=TINY_LM)
    rc = request_cost(cfg, visual_tokens=0, text_tokens=3, new_tokens=1)
    assert rc.vision_flops == rc.projector_flops == 0 and rc.visual_tokens == {}
    assert rc.total_flops == 2 * 3648 + 160  # two layers of the 3-token prefill + lm_head
    assert "visual tokens      none" in rc.summary()
    with pytest.raises(InputError, match="text-only"):
        request_cost(cfg, visual_tokens=4, text_tokens=3, new_tokens=1)
