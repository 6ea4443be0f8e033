"""llavakit.data.anyres against transformers 5.x: LLaVA-NeXT / OneVision image processors (PIL backend),
`pack_image_features` of LlavaNextModel / LlavaOnevisionModel, and the processors' token counts."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.data.anyres import (
    anyres_grid_shape,
    anyres_patches,
    num_anyres_patches,
    num_anyres_tokens,
    pack_anyres_features,
    select_best_resolution,
    unpad_image,
)
from llavakit.data.image_processing import ImageProcessorConfig
from llavakit.errors import InputError

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# llava-hf/llava-v1.6-mistral-7b-hf and llava-hf/llava-onevision-qwen2-0.5b-ov-hf preprocessor_config.json
NEXT_DICT = {
    "aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": NEXT_PINPOINTS, "image_mean": CLIP_MEAN,
    "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
    "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}  # fmt: skip
OV_DICT = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": OV_PINPOINTS, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}  # fmt: skip


def slow_processor_class(module: str, name: str):
    """transformers' PIL ("slow") image processor: `<name>Pil` in 5.x, plain `<name>` before."""
    import importlib

    try:
        pil_module = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        return getattr(pil_module, f"{name}Pil")
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"transformers.models.{module}.image_processing_{module}"), name)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------- pixel side


@pytest.mark.parametrize("hw", [(300, 700), (500, 260), (336, 336)])
def test_anyres_patches_match_llava_next_processor(hw):
    img = _image(*hw)
    cfg = ImageProcessorConfig.from_hf_dict(NEXT_DICT)
    ours = anyres_patches(img, cfg)
    hf = slow_processor_class("llava_next", "LlavaNextImageProcessor").from_dict(NEXT_DICT)([img], return_tensors="pt")
    assert hf["image_sizes"].tolist() == [list(hw)]
    assert ours.shape[0] == num_anyres_patches(hw, NEXT_PINPOINTS, 336)
    assert torch.equal(ours, hf["pixel_values"][0])  # bit-identical (single image: no batch padding)


@pytest.mark.parametrize("hw", [(200, 900), (700, 420)])
def test_anyres_patches_match_llava_onevision_processor(hw):
    img = _image(*hw, seed=1)
    cfg = ImageProcessorConfig.from_hf_dict(OV_DICT)
    ours = anyres_patches(img, cfg)
    hf_cls = slow_processor_class("llava_onevision", "LlavaOnevisionImageProcessor")
    hf = hf_cls.from_dict(OV_DICT)([img], return_tensors="pt")["pixel_values"][0]
    assert ours.shape == hf.shape == (num_anyres_patches(hw, OV_PINPOINTS, 384), 3, 384, 384)
    assert torch.equal(ours, hf)


def test_select_best_resolution_and_grid_shape_match_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    rng = random.Random(0)
    for _ in range(300):
        hw = (rng.randint(1, 3000), rng.randint(1, 3000))
        for pins, tile in ((NEXT_PINPOINTS, 336), (OV_PINPOINTS, 384)):
            assert select_best_resolution(hw, pins) == tuple(hf_select(hw, pins))
            assert anyres_grid_shape(hw, pins, tile) == tuple(get_anyres_image_grid_shape(hw, pins, tile))
            assert num_anyres_patches(hw, pins, tile) == image_size_to_num_patches(hw, pins, tile)
    with pytest.raises(InputError):
        select_best_resolution((10, 10), [])


def test_unpad_image_matches_transformers():
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad

    t = torch.randn(3, 48, 72)
    for size in [(100, 400), (400, 100), (480, 720), (37, 999), (999, 37), (1, 1)]:
        assert torch.equal(unpad_image(t, size), hf_unpad(t, size))
        assert torch.equal(unpad_image(t, torch.tensor(size)), hf_unpad(t, torch.tensor(size)))


# --------------------------------------------------------------------------------- feature side


def _hf_self(mode: str, tile: int, patch: int, pinpoints):
    """A stand-in `self` for the HF pack_image_features (it only reads self.config)."""
    vision = SimpleNamespace(image_size=tile, patch_size=patch)
    return SimpleNamespace(config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints))


def _hf_pack(mode, features, hw, newline, *, tile, patch, pinpoints, aspect="anyres_max_9"):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    me = _hf_self(mode, tile, patch, pinpoints)
    sizes = torch.tensor([list(hw)])
    if mode == "llava_next":
        out, lens = LlavaNextModel.pack_image_features(me, [features], sizes, "default", image_newline=newline)
    else:
        out, lens = LlavaOnevisionModel.pack_image_features(me, [features], sizes, newline, aspect)
    assert lens.tolist() == [out[0].shape[0]]
    return out[0]


def _hf_processor_count(mode, hw, *, tile, patch, pinpoints, strategy, extra, aspect="anyres_max_9", multi=False):
    """Placeholders the HF processor inserts (replace_image_token), without a tokenizer."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    inputs = {"image_sizes": [list(hw)], "pixel_values": [np.zeros((1, 3, tile, tile), np.float32)]}
    if mode == "llava_next":
        p = LlavaNextProcessor.__new__(LlavaNextProcessor)
        p.patch_size, p.num_additional_image_tokens = patch, extra
    else:
        p = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        p.num_image_tokens, p.vision_aspect_ratio = (tile // patch) ** 2 + extra, aspect
        inputs["batch_num_images"] = [2 if multi else 1]
    p.image_processor = SimpleNamespace(image_grid_pinpoints=pinpoints)
    p.vision_feature_select_strategy, p.image_token = strategy, "X"
    return len(p.replace_image_token(inputs, 0))


# (mode, tile, vision patch, pinpoints, strategy, extra tokens per view): NeXT-CLIP, OV-SigLIP, OV-CLIP
SETTINGS = [
    ("llava_next", 336, 14, NEXT_PINPOINTS, "default", 1),
    ("llava_onevision", 384, 14, OV_PINPOINTS, "full", 0),
    ("llava_onevision", 336, 14, [[336 * i, 336 * j] for i in range(1, 4) for j in range(1, 4)], "default", 1),
]
EXTREME = [(40, 900), (900, 40), (1, 2000), (2000, 1), (3, 5000), (5000, 3), (336, 336), (384, 2304), (2304, 2304)]


def _sizes(n: int, seed: int):
    rng = random.Random(seed)
    out = list(EXTREME)
    out += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(n)]
    out += [(rng.randint(1, 80), rng.randint(200, 4000)) for _ in range(n // 4)]  # very wide
    out += [(rng.randint(200, 4000), rng.randint(1, 80)) for _ in range(n // 4)]  # very tall
    return out


@pytest.mark.parametrize("setting", SETTINGS, ids=["next_clip", "ov_siglip", "ov_clip"])
def test_pack_bit_exact_and_counts_agree_with_hf_model_and_processor(setting):
    mode, tile, patch, pins, strategy, extra = setting
    grid = tile // patch
    dim = 3
    newline = torch.randn(dim)
    for hw in _sizes(160, seed=len(pins)):
        views = num_anyres_patches(hw, pins, tile)
        feats = torch.randn(views, grid * grid, dim)
        ours = pack_anyres_features(
            feats, hw, pinpoints=pins, tile_size=tile, grid=grid, image_newline=newline, mode=mode
        )
        hf = _hf_pack(mode, feats, hw, newline, tile=tile, patch=patch, pinpoints=pins)
        assert torch.equal(ours, hf), hw
        n = num_anyres_tokens(
            hw, pinpoints=pins, tile_size=tile, grid=grid, mode=mode, strategy=strategy,
            num_additional_image_tokens=extra,
        )  # fmt: skip
        proc = _hf_processor_count(mode, hw, tile=tile, patch=patch, pinpoints=pins, strategy=strategy, extra=extra)
        assert n == ours.shape[0] == proc, (hw, n, ours.shape[0], proc)


@pytest.mark.parametrize("aspect", ["anyres_max_1", "anyres_max_4", "anyres_max_16"])
def test_onevision_downsample_other_caps(aspect):
    grid, dim, newline = 27, 2, torch.randn(2)
    for hw in _sizes(40, seed=7):
        feats = torch.randn(num_anyres_patches(hw, OV_PINPOINTS, 384), grid * grid, dim)
        kw = dict(pinpoints=OV_PINPOINTS, tile_size=384, grid=grid, mode="llava_onevision", vision_aspect_ratio=aspect)
        ours = pack_anyres_features(feats, hw, image_newline=newline, **kw)
        hf = _hf_pack("llava_onevision", feats, hw, newline, tile=384, patch=14, pinpoints=OV_PINPOINTS, aspect=aspect)
        assert torch.equal(ours, hf), hw
        proc = _hf_processor_count(
            "llava_onevision", hw, tile=384, patch=14, pinpoints=OV_PINPOINTS, strategy="full", extra=0, aspect=aspect
        )
        assert num_anyres_tokens(hw, strategy="full", num_additional_image_tokens=0, **kw) == ours.shape[0] == proc


def test_base_only_and_no_newline():
    """A single view (OneVision multi-image): tokens + one newline, as HF model and processor do."""
    for mode in ("llava_next", "llava_onevision"):
        feats, newline = torch.randn(1, 729, 4), torch.randn(4)
        ours = pack_anyres_features(
            feats, (100, 200), pinpoints=OV_PINPOINTS, tile_size=384, grid=27, image_newline=newline, mode=mode
        )
        hf = _hf_pack(mode, feats, (100, 200), newline, tile=384, patch=14, pinpoints=OV_PINPOINTS)
        assert torch.equal(ours, hf) and ours.shape == (730, 4)
    kw = dict(pinpoints=OV_PINPOINTS, tile_size=384, grid=27, mode="llava_onevision")
    assert num_anyres_tokens((100, 200), base_only=True, strategy="full", num_additional_image_tokens=0, **kw) == 730
    proc = _hf_processor_count(
        "llava_onevision", (100, 200), tile=384, patch=14, pinpoints=OV_PINPOINTS, strategy="full", extra=0, multi=True
    )
    assert proc == 730
    # CLIP tower, "full": the CLS stays in a single view (578 = 577 + newline)
    assert num_anyres_tokens((9, 9), base_only=True, strategy="full", num_additional_image_tokens=1,
                             pinpoints=OV_PINPOINTS, tile_size=336, grid=24, mode="llava_onevision") == 578  # fmt: skip
    # no newline: HF with image_newline=None
    feats = torch.randn(num_anyres_patches((300, 700), NEXT_PINPOINTS, 336), 576, 4)
    kw = dict(pinpoints=NEXT_PINPOINTS, tile_size=336, grid=24, mode="llava_next")
    ours = pack_anyres_features(feats, (300, 700), image_newline=None, **kw)
    hf = _hf_pack("llava_next", feats, (300, 700), None, tile=336, patch=14, pinpoints=NEXT_PINPOINTS)
    assert torch.equal(ours, hf)
    assert num_anyres_tokens((300, 700), newline=False, **kw) == ours.shape[0]


def test_end_to_end_pixels_to_token_count():
    """anyres_patches -> (fake) tower -> pack: lengths line up with num_anyres_tokens."""
    cfg = ImageProcessorConfig.from_hf_dict(NEXT_DICT)
    img = _image(250, 800)
    pix = anyres_patches(img, cfg)  # (P, 3, 336, 336)
    feats = torch.nn.functional.avg_pool2d(pix, 14).flatten(2).transpose(1, 2)  # (P, 576, 3): 24x24 grid
    kw = dict(pinpoints=cfg.image_grid_pinpoints, tile_size=cfg.tile_size, grid=24, mode="llava_next")
    out = pack_anyres_features(feats, (250, 800), image_newline=torch.zeros(3), **kw)
    assert out.shape[0] == num_anyres_tokens((250, 800), **kw)


def test_errors():
    kw = dict(pinpoints=NEXT_PINPOINTS, tile_size=336, grid=24, image_newline=None)
    with pytest.raises(InputError, match="grid\\*grid"):
        pack_anyres_features(torch.randn(3, 577, 2), (336, 672), mode="llava_next", **kw)
    with pytest.raises(InputError, match="views"):
        pack_anyres_features(torch.randn(5, 576, 2), (336, 672), mode="llava_next", **kw)
    with pytest.raises(InputError, match="mode"):
        pack_anyres_features(torch.randn(3, 576, 2), (336, 672), mode="llava", **kw)
    with pytest.raises(InputError, match="anyres_max"):
        pack_anyres_features(
            torch.randn(3, 576, 2), (336, 672), mode="llava_onevision", vision_aspect_ratio="max9", **kw
        )
    with pytest.raises(InputError, match="tiled anyres needs"):
        num_anyres_tokens((336, 672), pinpoints=NEXT_PINPOINTS, tile_size=336, grid=24, mode="llava_next",
                          strategy="full", num_additional_image_tokens=1)  # fmt: skip
    with pytest.raises(InputError, match="pinpoints"):
        anyres_patches(_image(10, 10), ImageProcessorConfig())
