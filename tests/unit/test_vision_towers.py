"""Vision towers vs transformers (tiny random configs, fp32, eager reference): weights load strictly,
every hidden-state index and recomputed attention rows match to 1e-5."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from llavakit.config import VisionConfig
from llavakit.errors import InputError
from llavakit.models.vision import VisionOutput, build_vision_tower
from llavakit.models.vision.hf_config import (convert_hf_vision_state_dict, vision_config_from_hf,
                                              vision_config_to_hf)

TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=8, num_channels=3)
HF_CONFIGS = {
    "clip": dict(model_type="clip_vision_model", intermediate_size=64, image_size=32, **TINY),
    "siglip": dict(model_type="siglip_vision_model", intermediate_size=64, image_size=32, vision_use_head=False,
                   **TINY),
    # 64 px / 8 = an 8x8 position grid; inputs of 32 px (4x4) exercise interpolation.
    "dinov2": dict(model_type="dinov2", mlp_ratio=4, image_size=64, layerscale_value=0.5, **TINY),
}
HF_CLASSES = {
    "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
    "siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig),
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config),
}
FAMILIES = list(HF_CONFIGS)


def _hf_model(family: str) -> nn.Module:
    model_cls, config_cls = HF_CLASSES[family]
    kw = {k: v for k, v in HF_CONFIGS[family].items() if k != "model_type"}
    config = config_cls(**kw, attn_implementation="eager")
    model = model_cls(config).eval()
    with torch.no_grad():  # HF init is near-identity (std 0.02, zero biases, unit norms): perturb every
        for p in model.parameters():  # weight so that each layer changes the hidden state visibly
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _pair(family: str):
    hf = _hf_model(family)
    cfg = vision_config_from_hf(HF_CONFIGS[family])
    ours = build_vision_tower(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _pixels(h: int = 32, w: int = 32, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, h, w)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_match_transformers(family):
    hf = _hf_model(family)
    ours = build_vision_tower(vision_config_from_hf(HF_CONFIGS[family]))
    assert set(ours.state_dict()) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers(family):
    hf, ours = _pair(family)
    x = _pixels()
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
        n = len(ref)
        assert n == ours.config.num_hidden_layers + 1
        indices = list(range(n)) + list(range(-n, 0))
        out = ours(x, layers=indices)
    assert isinstance(out, VisionOutput) and out.attentions == {}
    assert len(out.hidden_states) == len(indices)
    for i, h in zip(indices, out.hidden_states):
        assert _max_diff(h, ref[i]) <= TOL, (family, i)
    tokens = ours.num_patches(32, 32) + int(ours.has_cls)
    assert out.hidden_states[0].shape == (2, tokens, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_match_transformers(family):
    hf, ours = _pair(family)
    x = _pixels()
    rows = torch.tensor([0, 5, 3, 15])
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True).attentions  # per layer (B, H, T, T)
        out = ours(x, layers=[-1], attention_rows={0: slice(0, 1), 1: rows, -1: slice(2, 6)})
    assert set(out.attentions) == {0, 1, -1}
    assert _max_diff(out.attentions[0], ref[0][:, :, 0:1]) <= TOL
    assert _max_diff(out.attentions[1], ref[1][:, :, rows]) <= TOL
    assert _max_diff(out.attentions[-1], ref[-1][:, :, 2:6]) <= TOL
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(2, 4, 4))


def test_dinov2_interpolates_positions_like_transformers():
    hf, ours = _pair("dinov2")
    for h, w in [(32, 32), (32, 48), (80, 72), (64, 64)]:  # smaller, non-square, larger, native
        x = _pixels(h, w)
        with torch.no_grad():
            ref = hf(pixel_values=x, output_hidden_states=True, output_attentions=True)
            out = ours(x, layers=[0, 2, -1], attention_rows={2: slice(0, 1)})
        for i, got in zip([0, 2, -1], out.hidden_states):
            assert _max_diff(got, ref.hidden_states[i]) <= TOL, (h, w, i)
        assert _max_diff(out.attentions[2], ref.attentions[2][:, :, :1]) <= TOL
        assert out.hidden_states[0].shape[1] == ours.num_patches(h, w) + 1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_siglip_interpolate_pos_encoding_like_transformers(family):
    hf, ours = _pair(family)
    for h, w in [(48, 48), (32, 48), (32, 32)]:
        x = _pixels(h, w)
        with torch.no_grad():
            ref = hf(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
            out = ours(x, layers=[0, -1], interpolate_pos_encoding=True)
        assert _max_diff(out.hidden_states[0], ref[0]) <= TOL
        assert _max_diff(out.hidden_states[1], ref[-1]) <= TOL
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        ours(_pixels(48, 48), layers=[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_stops_after_deepest_requested_layer(family):
    ours = build_vision_tower(vision_config_from_hf(HF_CONFIGS[family])).eval()
    layers = ours.encoder.layer if family == "dinov2" else ours.encoder.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        ours(_pixels(), layers=[-2])
        assert calls == [1, 1, 0]
        ours(_pixels(), layers=[0])
        assert calls == [1, 1, 0]
        ours(_pixels(), layers=[1], attention_rows={2: slice(0, 1)})  # layer 2's attention needs layer 2
        assert calls == [2, 2, 1]


def test_invalid_requests_raise_input_error():
    ours = build_vision_tower(vision_config_from_hf(HF_CONFIGS["clip"]))
    with pytest.raises(InputError, match="out of range"):
        ours(_pixels(), layers=[4])
    with pytest.raises(InputError, match="out of range"):
        ours(_pixels(), layers=[-5])
    with pytest.raises(InputError, match="attention_rows"):
        ours(_pixels(), layers=[1], attention_rows={3: slice(0, 1)})
    with pytest.raises(InputError, match="out of range"):
        ours(_pixels(), layers=[1], attention_rows={0: torch.tensor([17])})


def test_unknown_family_raises_input_error():
    with pytest.raises(InputError, match="clip"):
        VisionConfig(family="vit")
    cfg = VisionConfig(family="clip")
    object.__setattr__(cfg, "family", "vit")  # bypass the config's own check to reach the dispatcher
    with pytest.raises(InputError, match="valid: clip, siglip, dinov2"):
        build_vision_tower(cfg)
    with pytest.raises(InputError, match="model_type"):
        vision_config_from_hf({"model_type": "vit"})


def test_dinov2_intermediate_size_must_agree():
    cfg = vision_config_from_hf(HF_CONFIGS["dinov2"])
    assert cfg.intermediate_size == 128
    bad = VisionConfig(**{**cfg.__dict__, "intermediate_size": 64})
    with pytest.raises(InputError, match="mlp_ratio"):
        build_vision_tower(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(family):
    _, config_cls = HF_CLASSES[family]
    model_type = HF_CONFIGS[family]["model_type"]
    # Our defaults for missing fields equal transformers' config-class defaults.
    assert vision_config_from_hf({"model_type": model_type}) == vision_config_from_hf(config_cls().to_dict())
    cfg = vision_config_from_hf(HF_CONFIGS[family])
    hf_dict = vision_config_to_hf(cfg)
    assert hf_dict["model_type"] == model_type
    assert vision_config_from_hf(hf_dict) == cfg
    # transformers reads our dict back to the same numbers.
    again = config_cls(**{k: v for k, v in hf_dict.items() if k != "model_type"}).to_dict()
    assert vision_config_from_hf(again) == cfg
    if family == "siglip":
        assert hf_dict["vision_use_head"] is False


def test_convert_legacy_state_dicts():
    for family in ("clip", "siglip"):
        hf = _hf_model(family)
        legacy = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
        if family == "siglip":
            legacy["vision_model.head.probe"] = torch.zeros(1, 1, 32)
        ours = build_vision_tower(vision_config_from_hf(HF_CONFIGS[family]))
        ours.load_state_dict(convert_hf_vision_state_dict(family, legacy), strict=True)
    hf = _hf_model("dinov2")
    legacy = {}
    for k, v in hf.state_dict().items():
        if k == "embeddings.mask_token":
            continue
        k = k.replace("attention.q_proj.", "attention.attention.query.").replace(
            "attention.k_proj.", "attention.attention.key.").replace(
            "attention.v_proj.", "attention.attention.value.").replace("attention.o_proj.", "attention.output.dense.")
        legacy[k] = v
    ours = build_vision_tower(vision_config_from_hf(HF_CONFIGS["dinov2"]))
    ours.load_state_dict(convert_hf_vision_state_dict("dinov2", legacy), strict=True)
    assert _max_diff(ours.encoder.layer[0].attention.q_proj.weight,
                     hf.encoder.layer[0].attention.q_proj.weight) == 0
