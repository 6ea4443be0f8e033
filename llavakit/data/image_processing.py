"""Per-checkpoint image preprocessing, matching transformers' PIL ("slow") image processors.

`ImageProcessorConfig.from_hf_dict(json.load(open("preprocessor_config.json")))` reads the same keys
as transformers 5.x `CLIPImageProcessorPil`, `SiglipImageProcessorPil`, `BitImageProcessorPil`
(DINOv2), `LlavaImageProcessorPil`, `LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`
(in transformers < 5 the same classes without the `Pil` suffix / `use_fast=False`). Missing keys take
the defaults of the class named by `image_processor_type`, as transformers does.

`preprocess` reproduces `PilBackend._preprocess` (transformers/image_processing_backends.py) step by
step, with the same arithmetic, so results are bit-identical:

1. `convert_to_rgb` (image_transforms.py): images with alpha are composited onto white, others
   `convert("RGB")`.
2. LLaVA-1.5 only (`LlavaImageProcessor` with `do_pad`): pad to a square with the mean colour
   `int(m * 255)` per channel, image centred (LLaVA's `expand2square`).
3. resize with PIL (`resample`, bicubic = 3 for CLIP/SigLIP/DINOv2): `shortest_edge` keeps the aspect
   ratio with the long side `int(shortest_edge * long / short)`; `height`/`width` resizes to exactly that.
4. centre crop (`top = (H - h) // 2`, zero padding if the image is smaller than the crop).
5. rescale: `uint8 -> float64 * rescale_factor -> float32`.
6. normalize in float32: `(x - mean) / std` with float32 mean/std.

Anyres (LLaVA-NeXT / OneVision) tiling lives in `llavakit.data.anyres`, which reuses steps 3-6.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
BICUBIC = int(Image.Resampling.BICUBIC)  # 3

# Class defaults of the transformers 5.24 PIL image processors (the `...ImageProcessorPil` classes).
# Only the keys we model; `None` means "not set" (treated as False / absent).
_CLIP_LIKE = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=BICUBIC, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_pad=False, do_convert_rgb=True,
    image_grid_pinpoints=None,
)  # fmt: skip
_ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
HF_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_LIKE,
    "BitImageProcessor": _CLIP_LIKE,  # DINOv2 checkpoints use BitImageProcessor
    "LlavaImageProcessor": _CLIP_LIKE,
    "SiglipImageProcessor": {
        **_CLIP_LIKE, "size": {"height": 224, "width": 224}, "do_center_crop": False, "crop_size": None,
        "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD,
    },
    "LlavaNextImageProcessor": {
        **_CLIP_LIKE, "do_pad": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    },
    "LlavaOnevisionImageProcessor": {
        **_CLIP_LIKE, "size": {"height": 384, "width": 384}, "do_center_crop": False, "crop_size": None,
        "do_pad": True, "image_grid_pinpoints": _ONEVISION_PINPOINTS,
    },
}  # fmt: skip
# Processor types for which `do_pad` means "pad to a square with the mean colour before resizing".
# (For LlavaNext/LlavaOnevision `do_pad` pads the tile dimension of a batch; for the plain PilBackend
# classes it pads a batch to its largest image: neither changes a single image's pixels.)
_PAD_TO_SQUARE_TYPES = frozenset({"LlavaImageProcessor"})


@dataclass(frozen=True)
class Size:
    """A transformers size dict: either `shortest_edge`, or `height` and `width`."""

    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        hw = self.height is not None and self.width is not None
        if (self.shortest_edge is None) == (not hw) or (self.height is None) != (self.width is None):
            raise InputError(
                f"a size needs either 'shortest_edge' or both 'height' and 'width', got {self.to_hf_dict()}"
            )
        for v in (self.shortest_edge, self.height, self.width):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise InputError(f"sizes must be positive ints, got {self.to_hf_dict()}")

    @classmethod
    def from_hf(cls, value: Any, *, name: str, default_to_square: bool) -> "Size":
        """Parse an HF size value like `transformers.image_processing_utils.get_size_dict`.

        An int means `shortest_edge` when `default_to_square` is False (all classes here, for `size`)
        and `height = width` otherwise (`crop_size`); a 2-sequence is (height, width).
        """
        if isinstance(value, bool):
            raise InputError(f"{name} must be a dict, int or (height, width), got {value!r}")
        if isinstance(value, int):
            return cls(height=value, width=value) if default_to_square else cls(shortest_edge=value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(height=int(value[0]), width=int(value[1]))
        if isinstance(value, Mapping):
            unsupported = set(value) - {"shortest_edge", "height", "width"}
            if unsupported:
                raise InputError(
                    f"{name} keys {sorted(unsupported)} are not supported; use 'shortest_edge' or 'height'+'width'"
                )
            return cls(**{k: int(v) for k, v in value.items()})
        raise InputError(f"{name} must be a dict, int or (height, width), got {value!r}")

    def to_hf_dict(self) -> dict[str, int]:
        return {k: v for k, v in (("shortest_edge", self.shortest_edge), ("height", self.height),
                                  ("width", self.width)) if v is not None}  # fmt: skip


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing of one checkpoint (fields named as in `preprocessor_config.json`).

    `do_pad` keeps the HF flag verbatim (its meaning depends on the processor class); `pad_to_square`
    is what llavakit does with it: True only for `LlavaImageProcessor` + `do_pad` (LLaVA-1.5's
    `image_aspect_ratio: pad`).
    """

    image_processor_type: str = "CLIPImageProcessor"
    do_resize: bool = True
    size: Size = Size(shortest_edge=224)
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: Size | None = Size(height=224, width=224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_pad: bool = False
    do_convert_rgb: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    pad_to_square: bool = False

    def __post_init__(self) -> None:
        if self.do_center_crop and self.crop_size is None:
            raise InputError("do_center_crop is set but crop_size is missing")
        if self.crop_size is not None and self.crop_size.shortest_edge is not None:
            raise InputError("crop_size needs 'height' and 'width', not 'shortest_edge'")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise InputError(f"image_mean/image_std need 3 values, got {self.image_mean} / {self.image_std}")
        if any(s == 0 for s in self.image_std):
            raise InputError(f"image_std must be non-zero, got {self.image_std}")
        try:
            Image.Resampling(self.resample)
        except ValueError as e:
            raise InputError(f"resample must be a PIL resampling code 0-5, got {self.resample!r}") from e
        for hw in self.image_grid_pinpoints or ():
            if len(hw) != 2 or min(hw) <= 0:
                raise InputError(f"image_grid_pinpoints entries must be positive (height, width), got {hw}")

    @property
    def tile_size(self) -> int:
        """Side of one anyres tile / the model's input size (as LlavaNext/OnevisionImageProcessor pick it)."""
        if self.crop_size is not None and self.crop_size.height:
            return self.crop_size.height
        if self.size.height:
            return self.size.height
        return self.size.shortest_edge  # type: ignore[return-value]

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "ImageProcessorConfig":
        """Build from a `preprocessor_config.json` dict. Unknown keys are ignored (and not kept).

        Missing keys take the class defaults of `image_processor_type` (suffixes "Fast"/"Pil" stripped);
        an unknown or absent type uses CLIPImageProcessor's defaults.
        """
        ptype = str(data.get("image_processor_type") or "CLIPImageProcessor")
        for suffix in ("Fast", "Pil"):
            ptype = ptype.removesuffix(suffix)
        d = {**HF_CLASS_DEFAULTS.get(ptype, _CLIP_LIKE), **{k: v for k, v in data.items() if v is not None}}
        crop = d.get("crop_size")
        pinpoints = d.get("image_grid_pinpoints")
        do_pad = bool(d.get("do_pad"))
        return cls(
            image_processor_type=ptype,
            do_resize=bool(d["do_resize"]),
            size=Size.from_hf(d["size"], name="size", default_to_square=False),
            resample=int(d["resample"]),
            do_center_crop=bool(d.get("do_center_crop")),
            crop_size=None if crop is None else Size.from_hf(crop, name="crop_size", default_to_square=True),
            do_rescale=bool(d["do_rescale"]),
            rescale_factor=float(d["rescale_factor"]),
            do_normalize=bool(d["do_normalize"]),
            image_mean=_three(d["image_mean"], "image_mean"),
            image_std=_three(d["image_std"], "image_std"),
            do_pad=do_pad,
            do_convert_rgb=bool(d["do_convert_rgb"]),
            image_grid_pinpoints=None if pinpoints is None else tuple((int(h), int(w)) for h, w in pinpoints),
            pad_to_square=do_pad and ptype in _PAD_TO_SQUARE_TYPES,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict (keys transformers' PIL processors read)."""
        out: dict[str, Any] = {
            "image_processor_type": self.image_processor_type,
            "do_resize": self.do_resize,
            "size": self.size.to_hf_dict(),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_pad": self.do_pad,
            "do_convert_rgb": self.do_convert_rgb,
        }
        if self.crop_size is not None:
            out["crop_size"] = self.crop_size.to_hf_dict()
        if self.image_grid_pinpoints is not None:
            out["image_grid_pinpoints"] = [list(hw) for hw in self.image_grid_pinpoints]
        return out

    def replace(self, **changes: Any) -> "ImageProcessorConfig":
        return replace(self, **changes)


def _three(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


# ---------------------------------------------------------------------------------------------------
# Steps (each mirrors one transformers function; arrays are uint8 (H, W, 3) until rescale).


def to_rgb(image: Image.Image, cfg: ImageProcessorConfig) -> Image.Image:
    """transformers `image_transforms.convert_to_rgb` for PIL input: alpha is composited onto white."""
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL.Image, got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise InputError(f"image has zero size ({image.width}x{image.height})")
    if not cfg.do_convert_rgb:
        if image.mode != "RGB":
            raise InputError(f"do_convert_rgb is False but the image is {image.mode!r}, not 'RGB'")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's `expand2square` / `LlavaImageProcessorPil.pad_to_square`: centre on a square canvas."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shape(height: int, width: int, size: Size) -> tuple[int, int]:
    """Output (h, w) of transformers' `PilBackend.resize` for `size` (`get_resize_output_image_size`)."""
    if size.shortest_edge is None:
        return size.height, size.width  # type: ignore[return-value]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(image: Image.Image, hw: tuple[int, int], resample: int) -> Image.Image:
    """PIL resize to (height, width) (PIL returns an unchanged copy when the size already matches)."""
    return image.resize((hw[1], hw[0]), resample=resample)


def center_crop(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """transformers `image_transforms.center_crop` on (H, W, C): crop, zero-padding if too small."""
    height, width = array.shape[:2]
    crop_h, crop_w = hw
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    canvas = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)  # ceil
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def finish(image: Image.Image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """Steps 3-6 (resize, centre crop, rescale, normalize) on one RGB image -> (3, H, W) float32."""
    if cfg.do_resize:
        image = resize(image, resize_shape(image.height, image.width, cfg.size), cfg.resample)
    array = np.asarray(image)  # (H, W, 3) uint8
    if cfg.do_center_crop:
        assert cfg.crop_size is not None  # checked in __post_init__
        array = center_crop(array, (cfg.crop_size.height, cfg.crop_size.width))  # type: ignore[arg-type]
    if cfg.do_rescale:
        array = (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        array = array.astype(np.float32, copy=False)
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        array = (array - mean) / std
    array = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)
    return torch.from_numpy(array)


def mean_colour(cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The pad colour LLaVA uses: `tuple(int(x * 255) for x in image_mean)` (truncation, not rounding)."""
    return tuple(int(x * 255) for x in cfg.image_mean)  # type: ignore[return-value]


def preprocess(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> torch.Tensor:
    """Preprocess PIL images like the checkpoint's transformers PIL image processor.

    Returns `pixel_values` (N, 3, H, W) float32. All images must come out the same size (true whenever
    `do_center_crop` is set or `size` has height/width); otherwise an `InputError` is raised.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise InputError("preprocess needs at least one image")
    out = []
    for image in images:
        rgb = to_rgb(image, cfg)
        if cfg.pad_to_square:
            rgb = expand_to_square(rgb, mean_colour(cfg))
        out.append(finish(rgb, cfg))  # (3, H, W)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise InputError(
            f"images were preprocessed to different sizes {sorted(shapes)}; set do_center_crop with a "
            "crop_size, or a size with height and width, to batch them"
        )
    return torch.stack(out)  # (N, 3, H, W)
