"""LLaVA-NeXT / LLaVA-OneVision "anyres": tiling, unpadding, feature packing and token counts.

Sources (transformers 5.24, followed line by line; results are bit-identical, see
tests/unit/test_anyres.py):
- `image_processing_utils.select_best_resolution` / `get_patch_output_size`;
- `models/llava_next/image_processing_pil_llava_next.py` (`get_image_patches`, `_preprocess`);
  `LlavaOnevisionImageProcessorPil` does the same for a single image;
- `models/llava_next/modeling_llava_next.py` (`get_anyres_image_grid_shape`, `unpad_image`,
  `LlavaNextModel.pack_image_features`) and `models/llava_onevision/modeling_llava_onevision.py`
  (`LlavaOnevisionModel.pack_image_features`: the `anyres_max_N` bilinear downsample);
- `LlavaNextProcessor._get_number_of_features` / `LlavaOnevisionProcessor._get_number_of_features`
  for the placeholder count.

Sizes are (height, width) everywhere. Vocabulary: a *tile* is one model-input crop (`tile_size` px,
e.g. 336 or 384); `grid` is the vision tower's patches per tile side (tile_size // patch_size, e.g.
24 or 27); the *base view* is the whole image resized to one tile.

Token count vs. the model: the packed length of `pack_anyres_features` is the ground truth (it is what
the LLM receives). `num_anyres_tokens` computes that length from sizes alone. transformers' processors
compute the same number with their own code path (`_get_unpadded_features`); in transformers <= 4.48
that path could disagree with the model for some sizes (issue #35775, "image features and image tokens
mismatch"); in 5.24 the two agree on every size we test (see tests/unit/test_anyres.py).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from .image_processing import ImageProcessorConfig, finish, resize, to_rgb

MODES = ("llava_next", "llava_onevision")
STRATEGIES = ("default", "full")

Pinpoints = Sequence[Sequence[int]]


def select_best_resolution(original_size: tuple[int, int], pinpoints: Pinpoints) -> tuple[int, int]:
    """The (h, w) pinpoint keeping the most of the image's pixels, ties broken by the least waste.

    transformers `image_processing_utils.select_best_resolution` (LLaVA-NeXT `mm_utils`).
    """
    original_height, original_width = _hw(original_size, "original_size")
    if not pinpoints:
        raise InputError("image_grid_pinpoints is empty; give at least one (height, width)")
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (int(height), int(width))
    if best_fit is None:  # every pinpoint scales the image to 0 pixels (absurd aspect ratios)
        raise InputError(f"no pinpoint in {list(pinpoints)} fits an image of size {original_size}")
    return best_fit


def anyres_grid_shape(image_size: tuple[int, int], pinpoints: Pinpoints, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image: `get_anyres_image_grid_shape` (`patch_size` = tile size, px)."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // patch_size, width // patch_size


def num_anyres_patches(image_size: tuple[int, int], pinpoints: Pinpoints, tile_size: int) -> int:
    """Views fed to the vision tower for one image: base + tiles (`image_size_to_num_patches`)."""
    height, width = select_best_resolution(image_size, pinpoints)
    return math.ceil(height / tile_size) * math.ceil(width / tile_size) + 1


def patch_output_size(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image resized to fit inside `target` keeping aspect (`get_patch_output_size`)."""
    original_height, original_width = original_size
    target_height, target_width = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def anyres_patches(image: Image.Image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """One image's anyres views, as `LlavaNext/LlavaOnevisionImageProcessorPil` produce them.

    The base view (whole image resized to `cfg.size`) comes first, then the tiles, row-major, of the
    image resized to fit the best pinpoint (aspect kept) and centred on a black (zero) canvas of the
    pinpoint's size. Every view then goes through resize / centre crop / rescale / normalize.

    Returns (P, 3, S, S) float32 with P = `num_anyres_patches(...)`: HF's `pixel_values[i]` before the
    batch is padded to the largest P.
    """
    if not cfg.image_grid_pinpoints:
        raise InputError("anyres needs image_grid_pinpoints in the image processor config")
    rgb = to_rgb(image, cfg)
    original = (rgb.height, rgb.width)
    best = select_best_resolution(original, cfg.image_grid_pinpoints)
    new_h, new_w = patch_output_size(original, best)
    resized = np.asarray(resize(rgb, (new_h, new_w), cfg.resample))  # (h, w, 3) uint8
    pad_y, pad_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    canvas = np.zeros((best[0], best[1], 3), dtype=np.uint8)  # (H_best, W_best, 3), black padding
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized

    tile = cfg.tile_size
    tiles = [
        Image.fromarray(np.ascontiguousarray(canvas[i : i + tile, j : j + tile]))
        for i in range(0, best[0], tile)
        for j in range(0, best[1], tile)
    ]
    size = cfg.size
    base_hw = (size.height, size.width) if size.height else (size.shortest_edge, size.shortest_edge)
    base = resize(rgb, base_hw, cfg.resample)  # type: ignore[arg-type]
    views = [finish(v, cfg) for v in [base, *tiles]]  # each (3, S, S)
    return torch.stack(views)  # (P, 3, S, S)


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Remove the rows/cols that anyres padding added: transformers `unpad_image` (LLaVA-NeXT).

    `tensor` (C, H, W) is a feature map of the padded, resized image; returns (C, H', W').
    """
    if isinstance(original_size, (torch.Tensor, np.ndarray)):
        original_size = tuple(original_size.tolist())  # ints, as HF insists
    original_height, original_width = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(round(original_height * scale_factor, 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(round(original_width * scale_factor, 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def max_tiles(vision_aspect_ratio: str) -> int:
    """N of "anyres_max_N" (OneVision's cap on unpadded tile area, in tiles)."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if not match or int(match.group(1)) <= 0:
        raise InputError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(match.group(1))


def _unpadded_hw(image_size: tuple[int, int], rows: int, cols: int, grid: int) -> tuple[int, int]:
    """(h, w) of the tile feature map after `unpad_image`, without building it."""
    original_height, original_width = image_size
    current_height, current_width = rows * grid, cols * grid
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        return current_height - 2 * ((current_height - new_height) // 2), current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    return current_height, current_width - 2 * ((current_width - new_width) // 2)


def _downsampled_hw(height: int, width: int, grid: int, vision_aspect_ratio: str) -> tuple[int, int] | None:
    """OneVision's anyres_max_N target (h, w), or None when the map is small enough to keep."""
    ratio = math.sqrt(height * width / (max_tiles(vision_aspect_ratio) * grid**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return None


def pack_anyres_features(
    features: torch.Tensor,
    image_size: tuple[int, int],
    *,
    pinpoints: Pinpoints,
    tile_size: int,
    grid: int,
    image_newline: torch.Tensor | None,
    mode: str,
    vision_aspect_ratio: str = "anyres_max_9",
) -> torch.Tensor:
    """Arrange one image's projected view features into the LLM's visual token sequence.

    The per-image body of `LlavaNextModel.pack_image_features` (mode "llava_next") and
    `LlavaOnevisionModel.pack_image_features` (mode "llava_onevision"):

    - P > 1 views: base view tokens (N), then the tiles stitched into one (rows*grid, cols*grid) map,
      unpadded (`unpad_image`), for OneVision bilinearly shrunk when its area exceeds
      1.1^2 * max_tiles * grid^2, then read row by row with `image_newline` after each row.
    - P == 1 (OneVision multi-image / video frames; never produced by the anyres processor for a
      single image): the N tokens followed by one `image_newline`.

    Args:
        features: (P, N, D) projected features, views in `anyres_patches` order. For P > 1, N must be
            grid * grid: with `vision_feature_select_strategy="default"` the CLS token was dropped
            (CLIP/DINOv2), with "full" the tower has none (SigLIP).
        image_size: original (height, width) of the image.
        image_newline: (D,) learned separator, or None for no separators.

    Returns:
        (M, D) with M = `num_anyres_tokens(...)`.
    """
    if mode not in MODES:
        raise InputError(f"unknown anyres mode {mode!r}; valid: {', '.join(MODES)}")
    if features.dim() != 3:
        raise InputError(f"features must be (views, tokens, dim), got shape {tuple(features.shape)}")
    num_views, num_tokens, dim = features.shape
    if image_newline is not None and tuple(image_newline.shape) != (dim,):
        raise InputError(f"image_newline must have shape ({dim},), got {tuple(image_newline.shape)}")
    if mode == "llava_onevision":
        max_tiles(vision_aspect_ratio)  # validate early, even when unused

    if num_views == 1:
        base = features[0]  # (N, D)
        if image_newline is None:
            return base
        return torch.cat((base, image_newline[None].to(base)), dim=0)  # (N + 1, D)

    if num_tokens != grid * grid:
        raise InputError(
            f"each view must have grid*grid = {grid * grid} tokens, got {num_tokens}: with a CLS tower use "
            "vision_feature_select_strategy='default' (drops CLS); SigLIP needs 'full'"
        )
    rows, cols = anyres_grid_shape(image_size, pinpoints, tile_size)
    if num_views - 1 != rows * cols:
        raise InputError(
            f"image of size {tuple(image_size)} has {rows}x{cols} tiles + 1 base view, but features hold "
            f"{num_views} views"
        )
    base = features[0]  # (N, D)
    tiles = features[1:].reshape(rows, cols, grid, grid, dim)  # (rows, cols, g, g, D)
    fmap = tiles.permute(4, 0, 2, 1, 3).contiguous()  # (D, rows, g, cols, g)
    fmap = fmap.flatten(1, 2).flatten(2, 3)  # (D, rows*g, cols*g)
    fmap = unpad_image(fmap, image_size)  # (D, h, w)
    if mode == "llava_onevision":
        target = _downsampled_hw(fmap.shape[1], fmap.shape[2], grid, vision_aspect_ratio)
        if target is not None:
            fmap = F.interpolate(fmap[None], list(target), mode="bilinear")[0]  # (D, h', w')
    if image_newline is not None:
        newline = image_newline[:, None, None].expand(*fmap.shape[:-1], 1).to(fmap.device, fmap.dtype)
        fmap = torch.cat((fmap, newline), dim=-1)  # (D, h, w + 1)
    tokens = fmap.flatten(1, 2).transpose(0, 1)  # (h * (w + 1), D)
    return torch.cat((base, tokens), dim=0)  # (N + h * (w + 1), D)


def num_anyres_tokens(
    image_size: tuple[int, int],
    *,
    pinpoints: Pinpoints,
    tile_size: int,
    grid: int,
    mode: str,
    vision_aspect_ratio: str = "anyres_max_9",
    strategy: str = "default",
    num_additional_image_tokens: int = 1,
    base_only: bool = False,
    newline: bool = True,
) -> int:
    """Visual tokens one image becomes in the LLM input: `pack_anyres_features(...).shape[0]`.

    Args:
        strategy: `vision_feature_select_strategy`; "default" drops the first (CLS) token of each view.
        num_additional_image_tokens: non-patch tokens the tower emits per view (1 = CLS for CLIP and
            DINOv2, 0 for SigLIP), as in `LlavaNextProcessor`. Tokens per view are
            N = grid^2 + num_additional_image_tokens - (strategy == "default").
        base_only: the image is a single view (OneVision multi-image): N + 1 newline.
        newline: whether an `image_newline` is inserted (all released checkpoints: yes).

    Equals what transformers' `LlavaNextProcessor` / `LlavaOnevisionProcessor` insert for the same
    settings. For tiled images N must be grid^2 (anything else fails inside the HF models too), so an
    `InputError` is raised otherwise.
    """
    if mode not in MODES:
        raise InputError(f"unknown anyres mode {mode!r}; valid: {', '.join(MODES)}")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown vision_feature_select_strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    per_view = grid * grid + num_additional_image_tokens - (1 if strategy == "default" else 0)
    if base_only:
        return per_view + int(newline)
    if per_view != grid * grid:
        raise InputError(
            f"tiled anyres needs grid*grid = {grid * grid} tokens per view, but strategy={strategy!r} with "
            f"num_additional_image_tokens={num_additional_image_tokens} leaves {per_view}"
        )
    rows, cols = anyres_grid_shape(image_size, pinpoints, tile_size)
    height, width = _unpadded_hw(_hw(image_size, "image_size"), rows, cols, grid)
    if mode == "llava_onevision":
        target = _downsampled_hw(height, width, grid, vision_aspect_ratio)
        if target is not None:
            height, width = target
    return per_view + height * (width + int(newline))


def _hw(size: Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, (torch.Tensor, np.ndarray)):
        size = size.tolist()
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise InputError(f"{name} must be a positive (height, width), got {size!r}")
    return int(size[0]), int(size[1])
