"""Loading user images safely: path, bytes or PIL image in, a fully decoded RGB `PIL.Image` out.

Follows `transformers.image_utils.load_image` (EXIF orientation applied, then `convert("RGB")`, which
is also what the original LLaVA code does: `Image.open(f).convert("RGB")`), and adds the checks a
server needs. Every problem is an `InputError` whose message names the file:

- missing file / a directory / an empty file / not an image (PIL cannot identify it);
- more than `max_bytes` bytes (checked from `os.stat` or `len(bytes)` before reading);
- more than `max_pixels` pixels (checked from the header's width x height *before* decoding);
- zero width or height;
- a truncated or corrupt file: the image is decoded completely with `img.load()` while
  `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` keeps its default `False`, so a cut-off file fails here instead
  of silently yielding a half-grey picture later.

PIL globals (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`) are never changed. PIL keeps
its own decompression-bomb guard inside `Image.open`: above `2 * Image.MAX_IMAGE_PIXELS` (178,956,970
pixels by default) PIL refuses to open the file whatever `max_pixels` says; that refusal is reported as
the same `InputError`. `max_pixels` can therefore only *tighten* PIL's limit, never loosen it.

Note on transparency: `convert("RGB")` drops the alpha channel (the colour stored under transparent
pixels is kept). transformers' image processors, when handed an RGBA image directly, instead
composite it onto white (`image_transforms.convert_to_rgb`); `llavakit.data.image_processing` does the
same for parity. Images that went through `load_image` are already RGB, so both paths agree.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

from ..errors import InputError

# PIL's own default Image.MAX_IMAGE_PIXELS (= 1024 * 1024 * 1024 // 4 // 3): PIL warns above it and
# refuses above twice it. We refuse above it.
DEFAULT_MAX_PIXELS = 178_956_970 // 2  # 89,478,485 pixels, e.g. 9459 x 9459
DEFAULT_MAX_BYTES = 100_000_000  # 100 MB of encoded file

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

# Errors PIL raises while identifying or decoding a broken file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def load_image(
    src: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    exif_transpose: bool = True,
) -> Image.Image:
    """Load `src` (a path, encoded bytes, or a PIL image) into a decoded RGB `PIL.Image.Image`.

    Args:
        src: `str`/`os.PathLike` path, the encoded file as `bytes`, or a `PIL.Image.Image` (a lazily
            opened one is decoded here, with the same checks).
        max_pixels: refuse images with more than this many pixels (width * height read from the header,
            before decoding). Default 89,478,485 = 178,956,970 // 2, PIL's own `MAX_IMAGE_PIXELS`
            default. `None` disables our check (PIL's fixed 2x guard still applies, see module doc).
        max_bytes: refuse encoded inputs larger than this (default 100 MB; `None` = no limit). Not
            applied to PIL images (they are already in memory).
        exif_transpose: apply the EXIF orientation tag like `transformers.image_utils.load_image`.

    Returns:
        A fully decoded image of mode "RGB", detached from any file.

    Raises:
        InputError: the file is missing, too large, not an image, truncated/corrupt, empty, or has more
            than `max_pixels` pixels. The message names the file.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise InputError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise InputError(f"max_bytes must be a positive int or None, got {max_bytes!r}")

    if isinstance(src, Image.Image):
        name = _pil_name(src)
        img = src
    else:
        name, data = _read_encoded(src, max_bytes)
        img = _open(io.BytesIO(data), name)

    _check_size(img.size, name, max_pixels)
    try:
        img.load()  # full decode; raises on truncation because LOAD_TRUNCATED_IMAGES stays False
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: {e}") from e
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: the image is truncated or corrupt and cannot be decoded ({e})") from e
    try:
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        rgb = img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: cannot convert mode {img.mode!r} to RGB ({e})") from e
    if rgb is src:  # convert() may return the same object for RGB input; never hand back the caller's
        rgb = rgb.copy()
    return rgb


def _read_encoded(src: object, max_bytes: int | None) -> tuple[str, bytes]:
    """Return (name for messages, encoded bytes), enforcing `max_bytes`."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = f"<{len(data)} bytes>"
        if max_bytes is not None and len(data) > max_bytes:
            raise InputError(f"{name}: encoded image is {len(data)} bytes, more than max_bytes={max_bytes}")
        if not data:
            raise InputError(f"{name}: empty input, not an image")
        return name, data
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(
            f"cannot load an image from {type(src).__name__}; pass a path (str/Path), bytes, or a PIL.Image"
        )
    path = Path(src)
    name = f"image file {str(path)!r}"
    if not path.exists():
        raise InputError(f"{name} does not exist")
    if not path.is_file():
        raise InputError(f"{name} is not a regular file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{name} is {size} bytes, more than max_bytes={max_bytes}")
    try:
        with path.open("rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{name} cannot be read: {e}") from e
    if max_bytes is not None and len(data) > max_bytes:  # the file grew, or stat lied (pipes, /proc)
        raise InputError(f"{name} is more than max_bytes={max_bytes} bytes")
    if not data:
        raise InputError(f"{name} is empty (0 bytes), not an image")
    return name, data


def _open(fp: io.BytesIO, name: str) -> Image.Image:
    """`Image.open` (header only, no decoding), with PIL's errors turned into InputError."""
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; our own max_pixels check decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: refused as a possible decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise InputError(f"{name} is not an image PIL can read (unknown format or zero-size header)") from e
    except _DECODE_ERRORS as e:
        raise InputError(f"{name}: corrupt image header ({e})") from e


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{name} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels} "
            "(possible decompression bomb); pass a larger max_pixels to allow it"
        )


def _pil_name(img: Image.Image) -> str:
    filename = getattr(img, "filename", "") or ""
    return f"image file {filename!r}" if filename else f"<PIL image {img.mode} {img.size[0]}x{img.size[1]}>"
