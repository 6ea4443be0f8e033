"""`ServeSettings`: every limit and switch of the OpenAI-compatible server, in one frozen dataclass.

Defaults are for a single-process CPU/GPU server on loopback. Every limit exists so that one bad or
hostile request gets a 4xx answer instead of exhausting memory, CPU or the model's queue:

- batching: `max_batch_size` requests with compatible generation settings arriving within
  `max_wait_ms` of the first run as one batch; `max_queue` requests may wait (more: 429).
- time: `request_timeout_s` bounds queueing + generation per request (then 504);
  `shutdown_grace_s` is how long a shutdown lets queued and running requests finish before they are
  failed with 503; `image_fetch_timeout_s` bounds one remote image download.
- size: `max_body_bytes` (the HTTP body, 413 above it; the default fits one `max_image_bytes` image
  base64-encoded), `max_image_bytes` (one encoded image), `max_image_pixels` (width x height, read from
  the header before decoding), `max_images_per_request`, `max_prompt_chars` (all message text),
  `max_tokens_limit` (the largest `max_tokens` a request may ask for; `default_max_tokens` when it
  asks for none).
- CPU: `torch_threads` (None: torch's default) is applied by `llavakit serve` / `serve.run` — it is
  process-wide state, so `create_app` never touches it. On a CPU box where the HTTP side (event loop,
  image decoding) or other processes compete for the cores, torch's OpenMP pool stalls at every
  parallel region waiting for a descheduled thread: measured on a loaded 2-core machine with a tiny
  model, 16 concurrent requests took ~5 s with 2 torch threads and ~0.1 s with 1. Leave a core free.
- access: `api_key` (None: read `LLAVAKIT_API_KEY` from the environment; empty or unset: no auth);
  `allow_remote_images` (http/https image URLs, off by default: the server would fetch any URL a
  client names); `image_root` (local image paths allowed only inside this directory; None: refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import InputError

API_KEY_ENV = "LLAVAKIT_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of `llavakit serve` (see the module docstring for each group)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id /v1/models lists and responses carry; None: from the model source
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 120.0
    shutdown_grace_s: float = 10.0
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 25_000_000  # e.g. 5000 x 5000
    max_images_per_request: int = 8
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_prompt_chars: int = 100_000
    max_body_bytes: int = 16_000_000
    api_key: str | None = None
    allow_remote_images: bool = False
    image_fetch_timeout_s: float = 10.0
    image_root: str | None = None
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue", "max_image_bytes", "max_image_pixels", "max_images_per_request",
                    "max_tokens_limit", "default_max_tokens", "max_prompt_chars", "max_body_bytes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"ServeSettings.{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s", "shutdown_grace_s", "image_fetch_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"ServeSettings.{name} must be a number >= 0, got {value!r}")
        if self.request_timeout_s == 0:
            raise InputError("ServeSettings.request_timeout_s must be > 0")
        if self.torch_threads is not None and (isinstance(self.torch_threads, bool)
                                               or not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise InputError(f"ServeSettings.torch_threads must be a positive integer or None, "
                             f"got {self.torch_threads!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InputError(f"ServeSettings.port must be in 0..65535, got {self.port!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise InputError(f"ServeSettings.default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit})")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise InputError(f"ServeSettings.image_root {self.image_root!r} is not a directory")

    def resolved_api_key(self) -> str | None:
        """The key clients must send (`Authorization: Bearer KEY`): `api_key`, else $LLAVAKIT_API_KEY, else None."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None

    def replace(self, **changes: Any) -> "ServeSettings":
        """A copy with `changes` applied (validated again); unknown names raise InputError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InputError(f"unknown ServeSettings field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)
