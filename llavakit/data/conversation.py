"""Training conversations: the `Sample` record, LLaVA conversation JSON, and transformers chat messages.

The LLaVA conversation JSON (`llava_v1_5_mix665k.json`, LLaVA-Instruct-150K, ShareGPT4V, ...; see
`LazySupervisedDataset` in haotian-liu/LLaVA `llava/train/train.py`) is a list of entries

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",        # or a list, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

LLaVA-Video style entries carry `"video": "path.mp4"` (or a list) instead of `"image"`; its `<image>`
placeholder stands for the whole video. `.jsonl` files (one entry per line) are read the same way.

A `Sample` is the parsed, validated entry. Choices that are ours:

- Roles are the chat roles `user` / `assistant` (+ an optional leading `system`); JSON `from` must be
  exactly `human`, `gpt` or `system` (no other spelling is guessed).
- A conversation must alternate user/assistant starting with user and end with an assistant turn
  (a trailing question has no answer to learn). `<image>` tags may appear in user turns only.
- Strict tag check: the number of `<image>` tags equals the number of images (+ videos). LLaVA's
  loader silently *prepends* the tag when it is missing; here that only happens with
  `auto_image_tag=True`, which prepends `"<image>\\n"` per image to the first user turn.
- Tags are kept where the data puts them (LLaVA's `preprocess_multimodal` moves them to the front; we
  render the text as written).
- Relative image paths are resolved against `image_root` (default: the JSON file's directory) and
  stored as strings; images are never opened here. `check_images=True` (default) only tests
  `os.path.exists`.
- Every validation problem is an `InputError` naming the file, the entry index and the sample id.

Chat messages are transformers' format: `{"role": ..., "content": str | [{"type": "image", ...},
{"type": "text", "text": ...}]}`. `from_chat_messages` renders content exactly as inference does
(`templates.message_text`: images first, `"<image>\\n"` each, then the text), so a model trained on
the samples sees what `VLM.chat` will show it; `to_chat_messages` splits a turn's text at its tags
(a single `"\\n"` after a tag belongs to the tag). The round trip is exact for texts whose tags come
first, each followed by `"\\n"` — the LLaVA convention.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from PIL import Image

from ..errors import InputError
from ..fileio import atomic_write_text
from .templates import IMAGE_TAG, message_text

ImageRef = Union[str, Image.Image]
Turn = tuple[str, str]  # (role, text)

ROLES = ("system", "user", "assistant")
FROM_TO_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
ROLE_TO_FROM = {v: k for k, v in FROM_TO_ROLE.items()}


@dataclass(frozen=True)
class Sample:
    """One training conversation about zero or more images (or videos).

    Attributes:
        id: the dataset's id (any JSON id is turned into a string).
        images: image paths (str, already resolved) or PIL images, in `<image>` tag order.
        turns: ((role, text), ...) with roles "system" (optional, first only), "user", "assistant";
            user/assistant alternate, the first non-system turn is a user turn, the last an assistant turn.
        videos: video paths (LLaVA-Video's `"video"` key); each takes one `<image>` tag, after the images.
    """

    id: str
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    videos: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "videos", tuple(self.videos))
        object.__setattr__(self, "turns", tuple((str(r), t) for r, t in self.turns))
        _validate(self)

    @property
    def num_media(self) -> int:
        return len(self.images) + len(self.videos)

    def rounds(self) -> int:
        """Number of assistant turns (question-answer rounds)."""
        return sum(r == "assistant" for r, _ in self.turns)


def _validate(s: Sample) -> None:
    who = f"sample {s.id!r}"
    if not isinstance(s.id, str):
        raise InputError(f"{who}: id must be a string, got {type(s.id).__name__}")
    for im in s.images:
        if not isinstance(im, (str, Image.Image)):
            raise InputError(f"{who}: images must be paths (str) or PIL images, got {type(im).__name__}")
    if not s.turns:
        raise InputError(f"{who}: empty conversation")
    expected, seen_user = "user", False
    for i, (role, text) in enumerate(s.turns):
        if role not in ROLES:
            raise InputError(f"{who}: turn {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{who}: turn {i} ({role}) is empty")
        if role != "user" and IMAGE_TAG in text:
            raise InputError(f"{who}: turn {i} ({role}) contains {IMAGE_TAG}; image tags belong in user turns")
        if role == "system":
            if i != 0:
                raise InputError(f"{who}: a system turn may only come first (found at turn {i})")
            continue
        if role != expected:
            what = f"two {role} turns in a row" if seen_user else "the first turn must be a user turn"
            raise InputError(f"{who}: turn {i} is {role!r}: {what} (user and assistant must alternate, "
                             "after an optional system turn)")
        seen_user = True
        expected = "assistant" if role == "user" else "user"
    if not seen_user:
        raise InputError(f"{who}: no user/assistant turns, only a system turn")
    if expected != "user":
        raise InputError(f"{who}: the conversation ends with a user turn that has no answer")
    n_tags = sum(t.count(IMAGE_TAG) for _, t in s.turns)
    if n_tags != s.num_media:
        media = f"{len(s.images)} image(s)" + (f" + {len(s.videos)} video(s)" if s.videos else "")
        hint = (" (LLaVA prepends the tag when it is missing: pass auto_image_tag=True to do the same)"
                if n_tags == 0 else "")
        raise InputError(f"{who}: {n_tags} {IMAGE_TAG} tag(s) but {media}; each needs exactly one tag{hint}")


# ---------------------------------------------------------------------------------------------- JSON
def read_llava_json(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                    check_images: bool = True, auto_image_tag: bool = False) -> list[Sample]:
    """Read a LLaVA conversation `.json` (a list of entries) or `.jsonl` (one entry per line).

    Args:
        path: the file.
        image_root: directory that relative `image` / `video` paths are relative to (LLaVA's
            `--image_folder`); default: the file's own directory.
        check_images: check every image/video path exists (`os.path.exists`; nothing is opened).
        auto_image_tag: prepend `"<image>\\n"` to the first user turn of entries that have images but no
            tag (LLaVA's behaviour). Off by default: a missing tag is an error.

    Raises:
        InputError: unreadable/malformed file, an empty dataset, or any invalid entry (the message names
            the file, the entry index and the sample id).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    entries = _read_entries(path)
    if not entries:
        raise InputError(f"{path}: empty dataset (no entries)")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        try:
            out.append(_parse_entry(entry, i, root, check_images, auto_image_tag))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return out


def _read_entries(path: Path) -> list[Any]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as UTF-8 text: {e}") from None
    if path.suffix == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {n}: not valid JSON: {e}") from None
        return entries
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of entries, got {type(data).__name__} "
                         "(use .jsonl for one entry per line)")
    return data


def _paths(value: Any, key: str, sid: str, root: Path, check: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise InputError(f"sample {sid!r}: {key!r} must be a path or a list of paths, got {value!r}")
    out = []
    for x in items:
        p = x if os.path.isabs(x) else str(root / x)
        if check and not os.path.exists(p):
            raise InputError(f"sample {sid!r}: {key} file {p!r} does not exist")
        out.append(p)
    return tuple(out)


def _parse_entry(entry: Any, index: int, root: Path, check: bool, auto_tag: bool) -> Sample:
    if not isinstance(entry, Mapping):
        raise InputError(f"expected an object with 'conversations', got {type(entry).__name__}")
    sid = str(entry["id"]) if entry.get("id") is not None else f"#{index}"
    images = _paths(entry.get("image"), "image", sid, root, check)
    videos = _paths(entry.get("video"), "video", sid, root, check)
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InputError(f"sample {sid!r}: 'conversations' must be a non-empty list")
    turns = []
    for j, m in enumerate(conv):
        if not isinstance(m, Mapping) or "from" not in m or "value" not in m:
            raise InputError(f"sample {sid!r}: conversation turn {j} must be an object with 'from' and 'value'")
        role = FROM_TO_ROLE.get(m["from"])
        if role is None:
            raise InputError(f"sample {sid!r}: turn {j} has unknown 'from' {m['from']!r}; "
                             f"valid: {', '.join(FROM_TO_ROLE)}")
        if not isinstance(m["value"], str):
            raise InputError(f"sample {sid!r}: turn {j} 'value' must be a string")
        turns.append((role, m["value"]))
    n_media = len(images) + len(videos)
    if auto_tag and n_media and not any(IMAGE_TAG in t for _, t in turns):
        k = next((j for j, (r, _) in enumerate(turns) if r == "user"), None)
        if k is not None:
            turns[k] = ("user", (IMAGE_TAG + "\n") * n_media + turns[k][1])
    return Sample(id=sid, images=images, turns=tuple(turns), videos=videos)


def to_llava_entry(sample: Sample, image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The LLaVA JSON entry of `sample`; paths under `image_root` are written relative to it."""
    if any(not isinstance(im, str) for im in sample.images):
        raise InputError(f"sample {sample.id!r}: in-memory PIL images cannot be written to JSON; save them "
                         "to files and use their paths")

    def rel(p: str) -> str:
        if image_root is None or not Path(p).resolve().is_relative_to(Path(image_root).resolve()):
            return p
        return os.path.relpath(Path(p).resolve(), Path(image_root).resolve())

    entry: dict[str, Any] = {"id": sample.id}
    for key, paths in (("image", sample.images), ("video", sample.videos)):
        if paths:
            entry[key] = rel(paths[0]) if len(paths) == 1 else [rel(p) for p in paths]
    entry["conversations"] = [{"from": ROLE_TO_FROM[r], "value": t} for r, t in sample.turns]
    return entry


def write_llava_json(samples: Iterable[Sample], path: str | os.PathLike,
                     image_root: str | os.PathLike | None = None) -> Path:
    """Write samples as LLaVA JSON (`.jsonl`: one entry per line), atomically (temp file + rename).

    Paths under `image_root` (default: none — paths are written as stored) are written relative to it;
    read the file back with the same `image_root` (or from that directory) to get equal samples.
    """
    path = Path(path)
    entries = [to_llava_entry(s, image_root) for s in samples]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    else:
        text = json.dumps(entries, ensure_ascii=False, indent=1) + "\n"
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------------- chat messages
def from_chat_messages(messages: Sequence[Mapping[str, Any]], images: Sequence[ImageRef] | None = None,
                       id: str = "") -> Sample:
    """A Sample from transformers chat messages.

    Each message's content is rendered with `templates.message_text` (what inference does). Images come
    from `images` when given, else from the image parts' `"image"` (path or PIL image) or `"path"` keys.
    Video parts are not accepted (inference has no video path yet).
    """
    turns = []
    found: list[ImageRef] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"sample {id!r}: message {i} must be a mapping with 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                    ref = part.get("image", part.get("path"))
                    if ref is not None:
                        found.append(str(ref) if isinstance(ref, os.PathLike) else ref)
        turns.append((m.get("role"), message_text(m)))
    if images is None:
        images = found
    return Sample(id=id, images=tuple(images), turns=tuple(turns))


def to_chat_messages(sample: Sample, *, with_images: bool = True) -> list[dict[str, Any]]:
    """transformers chat messages for `sample`; image parts carry the image (`"image": path or PIL`)
    when `with_images` (videos become `{"type": "video", "video": path}` parts)."""
    media: list[tuple[str, Any]] = [("image", im) for im in sample.images] + [("video", v) for v in sample.videos]
    it = iter(media)
    out = []
    for role, text in sample.turns:
        if IMAGE_TAG not in text:
            out.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(text.split(IMAGE_TAG)):
            if k:
                kind, ref = next(it)
                parts.append({"type": kind, kind: ref} if with_images else {"type": kind})
                piece = piece[1:] if piece.startswith("\n") else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    return out
