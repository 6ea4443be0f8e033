"""Where llavakit keeps what it builds or downloads once per user.

The user cache directory is, in order of precedence:
  1. ``$LLAVAKIT_CACHE``                (used as is)
  2. ``$XDG_CACHE_HOME/llavakit``
  3. ``~/.cache/llavakit``
An environment variable that is set but empty counts as unset. Nothing is created here: callers
create what they need (see ``llavakit.default.build``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache directory for llavakit (not created)."""
    explicit = os.environ.get("LLAVAKIT_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg:
        return Path(xdg).expanduser() / "llavakit"
    return Path.home() / ".cache" / "llavakit"
