"""Turning an OpenAI `image_url` content part into a decoded RGB `PIL.Image`, safely.

Accepted URLs, in the order they are checked:

- `data:[<mime>];base64,<payload>`: the payload's decoded size is bounded by `max_image_bytes` *before*
  decoding it (from its length), then it is decoded strictly (`validate=True`: characters outside the
  base64 alphabet are an error, not silently dropped).
- `http://` / `https://`: refused unless `allow_remote_images`; then downloaded with httpx, streamed
  and cut off at `max_image_bytes`, the whole download bounded by `image_fetch_timeout_s`, at most 3
  redirects. (A server that fetches client-named URLs can be pointed at internal addresses: turn it on
  only where that is acceptable.)
- anything else is a local path (`file://` URLs included): refused unless `image_root` is set; the
  path, relative to `image_root` or absolute, is resolved (symlinks followed, `..` removed) and must lie
  inside the resolved `image_root`.

The bytes then go through `llavakit.data.images.load_image` with `max_pixels=max_image_pixels` and
`max_bytes=max_image_bytes`, which checks the header's size before decoding and decodes completely
(truncated files fail). Every problem is an `InputError` (the server answers 400 with its message).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from PIL import Image

from ..data.images import load_image
from ..errors import InputError

if TYPE_CHECKING:
    from .settings import ServeSettings

MAX_REDIRECTS = 3


def _describe(url: str) -> str:
    return url if len(url) <= 60 else url[:40] + "..." + url[-10:]


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI; InputError if it is malformed, not base64, or too large."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InputError("malformed data: URI (no ',' between the header and the data)")
    params = header[len("data:"):].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InputError("data: URIs must be base64-encoded (data:image/png;base64,...)")
    mime = params[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise InputError(f"data: URI has media type {mime!r}; expected an image/* type")
    payload = "".join(payload.split())  # line breaks inside base64 are common and harmless
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise InputError(f"the data: URI image is about {len(payload) // 4 * 3} bytes, more than the server's "
                         f"limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"the data: URI is not valid base64 ({e})") from e


def resolve_local(url: str, image_root: str | None) -> Path:
    """The file a local path / file:// URL names, refused unless it lies inside `image_root`."""
    if image_root is None:
        raise InputError(f"image URL {_describe(url)!r} is not a data: URI; local image paths are disabled "
                         "(start the server with --image-root DIR to allow files under DIR)")
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    if "\x00" in raw:
        raise InputError("image path contains a NUL byte")
    root = Path(image_root).resolve()
    path = Path(raw)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"image path {_describe(url)!r} is outside the server's image root")
    return path


async def fetch_remote(url: str, settings: "ServeSettings") -> bytes:
    """Download `url` with httpx, at most `max_image_bytes`, within `image_fetch_timeout_s`."""
    import httpx

    limit = settings.max_image_bytes

    async def download() -> bytes:
        timeout = httpx.Timeout(settings.image_fetch_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=MAX_REDIRECTS) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InputError(f"fetching image {_describe(url)!r} gave HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise InputError(f"image {_describe(url)!r} is {declared} bytes, more than the limit of {limit}")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > limit:
                        raise InputError(f"image {_describe(url)!r} is more than the limit of {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(download(), timeout=settings.image_fetch_timeout_s)
    except asyncio.TimeoutError as e:
        raise InputError(f"fetching image {_describe(url)!r} took more than {settings.image_fetch_timeout_s} s") from e
    except httpx.HTTPError as e:
        raise InputError(f"fetching image {_describe(url)!r} failed: {type(e).__name__}: {e}") from e


async def fetch_image(url: str, settings: "ServeSettings") -> Image.Image:
    """Resolve one `image_url` to a decoded RGB image (decoding runs in a worker thread)."""
    if not isinstance(url, str) or not url:
        raise InputError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        src: bytes | Path = decode_data_uri(url, settings.max_image_bytes)
    elif scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise InputError("remote image URLs are disabled on this server; send the image inline as a "
                             "data:image/...;base64 URI (or start the server with --allow-remote-images)")
        src = await fetch_remote(url, settings)
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter looks like a scheme)
        src = resolve_local(url, settings.image_root)
    else:
        raise InputError(f"unsupported image URL scheme {scheme!r}; use a data: URI")
    return await asyncio.to_thread(load_image, src, max_pixels=settings.max_image_pixels,
                                   max_bytes=settings.max_image_bytes)
