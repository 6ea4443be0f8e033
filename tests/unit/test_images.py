"""llavakit.data.images (safe loading) and llavakit.data.image_processing (parity with transformers'
PIL image processors, i.e. the "slow" ones: `...ImageProcessorPil` in transformers 5.x)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from llavakit.data.image_processing import ImageProcessorConfig, Size, preprocess
from llavakit.data.images import DEFAULT_MAX_PIXELS, load_image
from llavakit.errors import InputError

# ----------------------------------------------------------------------------------------- helpers


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _random_png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _patch_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG header's width/height (and its CRC): a tiny file that claims a huge image."""
    assert png[12:16] == b"IHDR"
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def _random_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(123, 457), (500, 211), (97, 97), (640, 480)]  # (h, w), non-square mostly
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# ------------------------------------------------------------------------------------- load_image


def test_load_path_bytes_and_pil(tmp_path):
    data = _random_png()
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for src in (str(path), path, data, Image.open(io.BytesIO(data))):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (64, 48)
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_load_converts_modes_like_transformers_load_image(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    gray = rgba[..., 0]
    img = load_image(_png(rgba))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgba[..., :3])  # convert("RGB"): alpha dropped
    img = load_image(_png(gray))
    np.testing.assert_array_equal(np.asarray(img), np.repeat(gray[..., None], 3, axis=-1))


def test_load_applies_exif_orientation_like_transformers():
    img = Image.new("RGB", (6, 4))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (4, 6)
    assert load_image(buf.getvalue(), exif_transpose=False).size == (6, 4)


def test_load_does_not_return_the_callers_object():
    src = Image.new("RGB", (4, 4))
    assert load_image(src) is not src


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.png.*does not exist"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        load_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(InputError, match="notes.txt.*not an image"):
        load_image(path)


def test_empty_file_and_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty.png.*empty"):
        load_image(path)
    with pytest.raises(InputError, match="empty"):
        load_image(b"")


def test_truncated_png(tmp_path):
    data = _random_png(64, 64)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InputError, match="cut.png.*truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # untouched


def test_truncated_lazy_pil_image(tmp_path):
    data = _random_png(64, 64)
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # header only; decoding happens in load()
    with pytest.raises(InputError, match="truncated"):
        load_image(lazy)


def test_decompression_bomb_header(tmp_path):
    """A 20000x20000 header on a 70-byte file: refused from the header, nothing decoded."""
    max_before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_patch_ihdr(_random_png(4, 4), 20000, 20000))
    assert path.stat().st_size < 1000
    with pytest.raises(InputError, match="bomb.png.*decompression bomb"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == max_before  # the global is never changed


def test_max_pixels_checked_before_decoding(tmp_path):
    """A header claiming 5000x5000 with no pixel data: our limit fires, not the decoder."""
    path = tmp_path / "big.png"
    path.write_bytes(_patch_ihdr(_random_png(4, 4), 5000, 5000))
    with pytest.raises(InputError, match=r"big.png.*5000x5000.*max_pixels=1000000"):
        load_image(path, max_pixels=1_000_000)
    # within the limit the header passes and the (missing) data is what fails
    with pytest.raises(InputError, match="truncated"):
        load_image(path, max_pixels=DEFAULT_MAX_PIXELS)


def test_max_pixels_is_configurable():
    data = _random_png(20, 20)
    assert load_image(data, max_pixels=400).size == (20, 20)
    with pytest.raises(InputError, match="400 pixels, more than max_pixels=399"):
        load_image(data, max_pixels=399)
    with pytest.raises(InputError, match="max_pixels=10"):
        load_image(Image.new("RGB", (5, 5)), max_pixels=10)


def test_max_bytes(tmp_path):
    data = _random_png()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(InputError, match=f"a.png.*{len(data)} bytes.*max_bytes=100"):
        load_image(path, max_bytes=100)
    with pytest.raises(InputError, match="max_bytes=100"):
        load_image(data, max_bytes=100)
    assert load_image(path, max_bytes=len(data)).size == (64, 48)


def test_zero_size():
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 7)))
    with pytest.raises(InputError, match="not an image"):  # PIL will not even identify a 0-wide PNG
        load_image(_patch_ihdr(_random_png(4, 4), 0, 4))


def test_wrong_type():
    with pytest.raises(InputError, match="pass a path"):
        load_image(123)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ image_processing

CLIP_336 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}  # fmt: skip
SIGLIP_384 = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}  # fmt: skip
DINOV2 = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}  # fmt: skip
LLAVA_PAD = {**CLIP_336, "image_processor_type": "LlavaImageProcessor", "do_pad": True}


def slow_processor_class(module: str, name: str):
    """transformers' PIL ("slow") image processor: `<name>Pil` in 5.x, plain `<name>` before."""
    import importlib

    try:
        pil_module = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        return getattr(pil_module, f"{name}Pil")
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"transformers.models.{module}.image_processing_{module}"), name)


def _hf_processor(d: dict):
    module = {
        "CLIPImageProcessor": "clip",
        "SiglipImageProcessor": "siglip",
        "BitImageProcessor": "bit",
        "LlavaImageProcessor": "llava",
    }[d["image_processor_type"]]
    return slow_processor_class(module, d["image_processor_type"]).from_dict(d)


@pytest.mark.parametrize(
    "hf_dict", [CLIP_336, SIGLIP_384, DINOV2, LLAVA_PAD], ids=["clip", "siglip", "dinov2", "llava_pad"]
)
def test_preprocess_matches_transformers_pil_processor(hf_dict):
    cfg = ImageProcessorConfig.from_hf_dict(hf_dict)
    images = _random_images()
    ours = preprocess(images, cfg)
    hf = _hf_processor(hf_dict)(images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == hf.shape
    assert torch.equal(ours, hf), (ours - hf).abs().max()  # bit-identical (same PIL resize + float ops)


def test_preprocess_alpha_and_gray_like_transformers():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (60, 90, 4), dtype=np.uint8))  # composited onto white
    gray = Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8))
    palette = gray.convert("P")
    palette.info["transparency"] = 0
    for d in (CLIP_336, SIGLIP_384):
        cfg = ImageProcessorConfig.from_hf_dict(d)
        for img in (rgba, gray, palette):
            hf = _hf_processor(d)([img], return_tensors="pt")["pixel_values"]
            assert torch.equal(preprocess([img], cfg), hf)


def test_center_crop_pads_small_images_like_transformers():
    d = {**CLIP_336, "do_resize": False}  # crop 336 from images smaller than 336: zero padding
    cfg = ImageProcessorConfig.from_hf_dict(d)
    images = [
        Image.fromarray(np.full((101, 400, 3), 200, np.uint8)),
        Image.fromarray(np.full((337, 99, 3), 9, np.uint8)),
    ]
    hf = _hf_processor(d)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(preprocess(images, cfg), hf)


def test_config_defaults_round_trip_and_unknown_keys():
    cfg = ImageProcessorConfig.from_hf_dict({**SIGLIP_384, "some_future_key": 1, "processor_class": "X"})
    assert cfg.size == Size(height=384, width=384) and cfg.crop_size is None and not cfg.do_center_crop
    assert "some_future_key" not in cfg.to_hf_dict()
    for d in (CLIP_336, SIGLIP_384, DINOV2, LLAVA_PAD):
        cfg = ImageProcessorConfig.from_hf_dict(d)
        assert ImageProcessorConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert ImageProcessorConfig.from_hf_dict(LLAVA_PAD).pad_to_square
    assert not ImageProcessorConfig.from_hf_dict({**CLIP_336, "do_pad": True}).pad_to_square
    # legacy int sizes (transformers' get_size_dict): size -> shortest_edge, crop_size -> square
    old = ImageProcessorConfig.from_hf_dict({**CLIP_336, "size": 224, "crop_size": 224})
    assert old.size == Size(shortest_edge=224) and old.crop_size == Size(height=224, width=224)
    # class defaults fill missing keys, even from a "Fast" type name
    sig = ImageProcessorConfig.from_hf_dict({"image_processor_type": "SiglipImageProcessorFast"})
    assert sig.image_mean == (0.5, 0.5, 0.5) and sig.size == Size(height=224, width=224)
    with pytest.raises(Exception):
        cfg.do_resize = False  # type: ignore[misc]  # frozen


def test_config_errors():
    with pytest.raises(InputError, match="longest_edge"):
        ImageProcessorConfig.from_hf_dict({**CLIP_336, "size": {"shortest_edge": 3, "longest_edge": 9}})
    with pytest.raises(InputError, match="shortest_edge"):
        Size(shortest_edge=3, height=4, width=4)
    with pytest.raises(InputError, match="crop_size is missing"):
        ImageProcessorConfig(do_center_crop=True, crop_size=None)
    with pytest.raises(InputError, match="different sizes"):
        preprocess(_random_images()[:2], ImageProcessorConfig.from_hf_dict({**CLIP_336, "do_center_crop": False}))
