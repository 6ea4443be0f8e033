"""Crash-safe file writes: a file written here is either the old one or the whole new one.

The writers of files a later run reads (trained weights, checkpoints, feature caches, schedules, YOPO
calibration tables, datasets, HF configs, eval reports, plots via `save_figure`) go through `atomic_path`;
`save_pretrained` / the default build rename whole temp directories instead. In `atomic_path` the
bytes go to a uniquely named temp file in the destination's folder (same file system, so the final
`os.replace` is atomic), are flushed to disk, and only then replace the destination. On any error,
Ctrl-C included, the temp file is removed and the destination is untouched. Unique temp names (not a
fixed ``<name>.tmp``) let two processes write the same destination without writing into each other's
temp file; the last replace wins, whole. A new file gets the permissions a plain `open` would give it
(0o666 minus the umask); a replaced one keeps its own.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on a clean exit fsync it and `os.replace` it onto `path`.

    The caller writes the whole file to the yielded path (by name: safetensors' `save_file`,
    `torch.save`, `Path.write_text`, ...). The folder is created if missing.
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(dst))
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure through `atomic_path`: an interrupted save leaves the old plot whole.
    The format comes from `path`'s suffix (the temp file's name has none of its own); `kwargs` go to
    `fig.savefig` (dpi, ...)."""
    dst = Path(path)
    with atomic_path(dst) as tmp:
        fig.savefig(tmp, format=dst.suffix.lstrip(".").lower() or "png", **kwargs)
    return dst


def _mode_for(dst: Path) -> int:
    """The replaced file's permissions, or what a plain `open(dst, "w")` would give (0o666 minus the
    umask): the temp file is created 0o600, and so are the files safetensors writes."""
    try:
        return dst.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status). Elsewhere
    it is set and restored, and a thread creating a file between the two calls would get mode 0o666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
