"""Short clips of the synthetic world: one object moves, or one object appears.

Issue 3, part 2 (video work later). All choices are ours:

- A clip has `n_frames` frames (>= 4) of one canvas and exactly one event, "move" or "appear" (50/50):
  * move: the subject slides in a straight line (left / right / up / down) over 30-40 % of the canvas,
    linearly from the first frame to the last; the other objects stay put, never on its path;
  * appear: the subject is absent from the first frames and present from frame `appear`
    (between n_frames // 4 and 3 * n_frames // 4, so both states are seen).
- The subject's (colour, shape) pair is unique in the clip, so "the red circle" names it.
- Static objects (and an appearing subject) sit in their own 3x3 grid cells as in `scene.py`.
- Questions (`clip_questions`): "Did any shape move?" / "Did a new shape appear?" (yes/no, balanced
  because the event is a fair coin), which way the subject moved (`DIRECTIONS`), which shape
  moved/appeared ("red circle": colour + shape), where it appeared (`POSITIONS`), how many shapes
  there are at the start / at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ...errors import InputError
from .language import QA
from .render import render
from .scene import (
    COLOURS,
    POSITIONS,
    RADIUS,
    REFERENCE,
    SHAPES,
    SIZES,
    Obj,
    RngLike,
    Scene,
    as_rng,
    count_range,
    pick,
    place_object,
)

EVENTS = ("move", "appear")
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_DISTANCE = (0.30, 0.40)  # fraction of the canvas travelled by a moving subject
_EDGE = 2.0
_MAX_TRIES = 500


@dataclass(frozen=True)
class Track:
    """An object over the clip: `obj` at frame 0, moved by (dx, dy) px by the last frame, visible from `appear`."""

    obj: Obj
    dx: int = 0
    dy: int = 0
    appear: int = 0


@dataclass(frozen=True)
class Clip:
    canvas: int
    n_frames: int
    tracks: tuple[Track, ...]
    event: str  # "move" | "appear"
    subject: int  # index into tracks
    direction: str | None = None  # for "move"

    def scene_at(self, t: int) -> Scene:
        """The frame-`t` scene (objects at their interpolated positions, appeared ones only)."""
        if not 0 <= t < self.n_frames:
            raise InputError(f"frame index must be in 0..{self.n_frames - 1}, got {t}")
        f = t / (self.n_frames - 1)
        objs = tuple(
            replace(tr.obj, x=tr.obj.x + round(tr.dx * f), y=tr.obj.y + round(tr.dy * f))
            for tr in self.tracks
            if t >= tr.appear
        )
        return Scene(self.canvas, objs)

    def frames(self, size: int | None = None) -> list[Image.Image]:
        """Every frame as an RGB image of `size` px (default: the canvas)."""
        return [render(self.scene_at(t), size) for t in range(self.n_frames)]


def _attributes(rng: np.random.Generator) -> tuple[str, str, str]:
    return (SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))],
            SIZES[int(rng.integers(len(SIZES)))])  # fmt: skip


def _mover(rng: np.random.Generator, canvas: int, unit: float) -> tuple[Track, tuple, str] | None:
    """The moving subject, the box its path sweeps, and its direction; None if it does not fit."""
    shape, colour, size = _attributes(rng)
    r = int(round(unit * rng.uniform(*RADIUS[size])))
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    sx, sy = _STEP[direction]
    dist = int(round(canvas * rng.uniform(*_DISTANCE)))
    lo, hi = r + _EDGE * unit, canvas - r - _EDGE * unit
    # start range along the motion axis so that start and end stay inside; free along the other axis
    x_lo, x_hi = (lo - min(0, sx * dist), hi - max(0, sx * dist))
    y_lo, y_hi = (lo - min(0, sy * dist), hi - max(0, sy * dist))
    if x_lo > x_hi or y_lo > y_hi:
        return None
    x, y = int(round(rng.uniform(x_lo, x_hi))), int(round(rng.uniform(y_lo, y_hi)))
    dx, dy = sx * dist, sy * dist
    path = (min(x, x + dx) - r, min(y, y + dy) - r, max(x, x + dx) + r, max(y, y + dy) + r)
    return Track(Obj(shape, colour, size, x, y, r), dx, dy), path, direction


def sample_clip(
    seed: RngLike = None,
    frames: int = 8,
    canvas: int = 224,
    *,
    n_objects: int | tuple[int, int] = (1, 4),
    event: str | None = None,
) -> Clip:
    """A random clip of `frames` frames with one event (`event` or a fair coin) and n objects in all."""
    rng = as_rng(seed)
    if not isinstance(frames, (int, np.integer)) or isinstance(frames, bool) or not 4 <= frames <= 256:
        raise InputError(f"frames must be an int in 4..256, got {frames!r}")
    if not isinstance(canvas, (int, np.integer)) or isinstance(canvas, bool) or canvas < 64:
        raise InputError(f"canvas must be an int >= 64 px, got {canvas!r}")
    if event is not None and event not in EVENTS:
        raise InputError(f"event must be one of {EVENTS} or None, got {event!r}")
    lo, hi = count_range(n_objects)
    event = event or EVENTS[int(rng.integers(2))]
    n = int(rng.integers(lo, hi + 1))
    unit = canvas / REFERENCE
    for _ in range(_MAX_TRIES):
        blocked: list = []
        tracks: list[Track] = []
        direction = None
        if event == "move":
            got = _mover(rng, canvas, unit)
            if got is None:
                continue
            subject, path, direction = got
            blocked.append(path)
        placed: list[Obj] = []
        ok = True
        for cell in rng.permutation(len(POSITIONS))[: n - 1 if event == "move" else n]:
            shape, colour, size = _attributes(rng)
            obj = place_object(rng, int(cell), shape, colour, size, None, placed, canvas, unit, blocked)
            if obj is None:
                ok = False
                break
            placed.append(obj)
        if not ok:
            continue
        if event == "move":
            tracks = [subject] + [Track(o) for o in placed]
        else:
            appear = int(rng.integers(frames // 4, 3 * frames // 4 + 1))
            tracks = [Track(placed[0], appear=max(1, appear))] + [Track(o) for o in placed[1:]]
        pairs = [(t.obj.colour, t.obj.shape) for t in tracks]
        if pairs.count(pairs[0]) > 1:  # the subject must be nameable by colour + shape
            continue
        order = rng.permutation(len(tracks))
        shuffled = tuple(tracks[int(k)] for k in order)
        return Clip(canvas, int(frames), shuffled, event, int(np.argmin(order)), direction)
    raise InputError(f"could not lay out a {event} clip with {n} objects on a {canvas}-px canvas; use fewer objects")


def clip_questions(clip: Clip, rng: RngLike = None) -> list[QA]:
    """All questions about `clip` with exact answers, in a random order (see the module docstring)."""
    rng = as_rng(rng)
    sub = clip.tracks[clip.subject].obj
    name = f"{sub.colour} {sub.shape}"
    first, last = clip.scene_at(0), clip.scene_at(clip.n_frames - 1)
    moved = clip.event == "move"
    qas: list[QA] = [
        (pick(rng, ("Did any shape move?", "Is any shape moving?")), "yes" if moved else "no"),
        (pick(rng, ("Did a new shape appear?", "Does a shape appear during the video?")), "no" if moved else "yes"),
        ("How many shapes are there at the start of the video?", str(len(first.objects))),
        ("How many shapes are there at the end of the video?", str(len(last.objects))),
    ]
    if moved:
        qas.append((f"Which way did the {name} move?", clip.direction))
        qas.append((pick(rng, ("Which shape moved?", "Which object is moving?")), name))
    else:
        qas.append((pick(rng, ("Which shape appeared?", "Which object appeared?")), name))
        qas.append((f"Where did the {name} appear?", last.position(sub)))
    return [qas[int(k)] for k in rng.permutation(len(qas))]

