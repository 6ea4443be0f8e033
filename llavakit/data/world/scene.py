"""Scenes of the synthetic world: a few shapes on a plain canvas, and a seeded sampler.

Issue 3, part 2 (the synthetic world). Nothing here comes from a paper; every choice is ours and is
made so that a small model (DINOv2 ViT-S/14 at 224 px, 16x16 patches) can learn the questions asked
about a scene:

- Closed vocabularies: 6 colours with hues ~60 degrees apart, 5 shapes with distinct outlines, 2 sizes,
  a 3x3 grid of named positions, 12 three-letter words.
- Sizes are fractions of a 224-px reference canvas: *small* objects are 30-36 px across, *large* ones
  54-63 px (both well above the 14-px patch). With `small=True` objects keep these pixel sizes whatever
  the canvas, so on a 1344-px canvas they cover 1/6 of the relative extent (and shrink to 5-10 px if the
  whole canvas is downscaled to 224: the high-resolution setting).
- Every object sits in its own cell of the 3x3 grid, with its centre at least 12 % of a cell away from
  the cell's borders: "where is X?" always has one clear answer. Objects never overlap: their boxes
  (shape box plus word label, see `Obj.box`) keep a gap of 4 reference px (rejection sampling).
- Positions are whole pixels, so a scene is an exact value: `scene_split` hashes it into a train or an
  eval half, and `sample_scene(split=...)` keeps only scenes of that half. Train and eval scenes can
  therefore never coincide, whatever seeds are used.

All sampling goes through one `numpy.random.Generator`; the same seed gives the same scene.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from ...errors import InputError

COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
# 3x3 grid, row-major (reading order).
POSITIONS = (
    "top left", "top", "top right",
    "left", "middle", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "cup", "key", "map", "pen", "bus", "egg")
SPLITS = ("train", "eval")

REFERENCE = 224  # px: the canvas the geometry below is expressed in
RADIUS = {"small": (15.0, 18.0), "large": (27.0, 31.5)}  # half-extent, reference px
_CELL_MARGIN = 0.12  # fraction of a cell kept free around a centre's cell borders
_EDGE = 2.0  # reference px kept free along the canvas border
_GAP = 4.0  # reference px between two objects' boxes
FONT_PX = 20.0  # reference px: word font size
_LABEL_GAP = 3.0  # reference px between a shape and its word
_LABEL_W = 2.1  # label box width / font size (the widest word, "map", is 2.0 at Pillow's default font)
_LABEL_H = 1.15  # label box height / font size
_MAX_TRIES = 500  # whole-scene attempts before giving up
_POS_TRIES = 12  # centre draws per object within one attempt

RngLike = Union[np.random.Generator, int, None]


def as_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a Generator (returned as is), a non-negative int seed, or None (seed 0)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise InputError(f"rng must be a numpy Generator or a non-negative int seed, got {rng!r}")


def pick(rng: np.random.Generator, options: Sequence):
    """One element of `options`, uniformly (an index draw, so strings stay Python strings)."""
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class Obj:
    """One drawn object. `x`, `y`: centre in canvas px; `r`: half-extent of the shape in canvas px."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    x: int
    y: int
    r: int
    word: str | None = None  # drawn under the shape when set

    def box(self, font_px: float) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) covering the shape and, when there is a word, its label."""
        if self.word is None:
            return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)
        half = max(self.r, _LABEL_W * font_px / 2)
        bottom = self.y + self.r + font_px * (_LABEL_GAP / FONT_PX + _LABEL_H)
        return (self.x - half, self.y - self.r, self.x + half, bottom)

    def label_box(self, font_px: float) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) reserved for the word under the shape."""
        top = self.y + self.r + font_px * _LABEL_GAP / FONT_PX
        half = _LABEL_W * font_px / 2
        return (self.x - half, top, self.x + half, top + _LABEL_H * font_px)


@dataclass(frozen=True)
class Scene:
    """A square canvas of `canvas` px holding `objects` (in no particular order)."""

    canvas: int
    objects: tuple[Obj, ...]
    small: bool = False  # objects sized in reference px rather than relative to the canvas

    @property
    def unit(self) -> float:
        """Canvas px per reference px."""
        return 1.0 if self.small else self.canvas / REFERENCE

    @property
    def font_px(self) -> float:
        return FONT_PX * self.unit

    def position(self, obj: Obj) -> str:
        """The 3x3 grid cell name of `obj`'s centre, e.g. "top left"."""
        return POSITIONS[cell_of(obj.x, obj.y, self.canvas)]

    def cells(self) -> tuple[int, ...]:
        """Grid cell index (0..8, row-major) of each object."""
        return tuple(cell_of(o.x, o.y, self.canvas) for o in self.objects)


def cell_of(x: float, y: float, canvas: int) -> int:
    """Row-major index of the 3x3 grid cell holding point (x, y)."""
    col = min(int(3 * x // canvas), 2)
    row = min(int(3 * y // canvas), 2)
    return 3 * row + col


def scene_split(scene: Scene) -> str:
    """"train" or "eval": a fixed hash of the scene's exact content (stable across runs/machines)."""
    key = repr((scene.canvas, scene.small, scene.objects)).encode()
    return SPLITS[hashlib.blake2b(key, digest_size=8).digest()[0] & 1]


def boxes_overlap(a, b, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def count_range(n_objects) -> tuple[int, int]:
    if isinstance(n_objects, (int, np.integer)) and not isinstance(n_objects, bool):
        lo = hi = int(n_objects)
    else:
        try:
            lo, hi = (int(v) for v in n_objects)
        except (TypeError, ValueError):
            raise InputError(f"n_objects must be an int or a (min, max) pair, got {n_objects!r}") from None
    if not 1 <= lo <= hi <= len(POSITIONS):
        raise InputError(f"n_objects must satisfy 1 <= min <= max <= 9 (one object per grid cell), got {n_objects!r}")
    return lo, hi


def _centre_range(cell_lo: float, cell_hi: float, lo_extent: float, hi_extent: float, canvas: int, edge: float):
    """Interval of admissible centres along one axis: inside the cell's inner part and the canvas."""
    margin = _CELL_MARGIN * (cell_hi - cell_lo)
    return max(cell_lo + margin, lo_extent + edge), min(cell_hi - margin, canvas - hi_extent - edge)


def place_object(
    rng: np.random.Generator,
    cell: int,
    shape: str,
    colour: str,
    size: str,
    word: str | None,
    placed: list[Obj],
    canvas: int,
    unit: float,
    blocked: Sequence[tuple[float, float, float, float]] = (),
) -> Obj | None:
    """Draw a radius and a centre inside `cell` so the object overlaps none of `placed` and none of the
    `blocked` boxes (canvas px); None on failure."""
    r = int(round(unit * rng.uniform(*RADIUS[size])))
    font_px = FONT_PX * unit
    probe = Obj(shape, colour, size, 0, 0, r, word)
    left, top, right, bottom = probe.box(font_px)  # extents around the centre (0, 0)
    cw = canvas / 3
    row, col = divmod(cell, 3)
    edge = _EDGE * unit
    x_lo, x_hi = _centre_range(col * cw, (col + 1) * cw, -left, right, canvas, edge)
    y_lo, y_hi = _centre_range(row * cw, (row + 1) * cw, -top, bottom, canvas, edge)
    x_lo, x_hi, y_lo, y_hi = int(np.ceil(x_lo)), int(np.floor(x_hi)), int(np.ceil(y_lo)), int(np.floor(y_hi))
    if x_lo > x_hi or y_lo > y_hi:
        return None
    gap = _GAP * unit
    for _ in range(_POS_TRIES):
        x = int(rng.integers(x_lo, x_hi + 1))
        y = int(rng.integers(y_lo, y_hi + 1))
        obj = Obj(shape, colour, size, x, y, r, word)
        box = obj.box(font_px)
        others = [p.box(font_px) for p in placed] + list(blocked)
        if cell_of(x, y, canvas) == cell and not any(boxes_overlap(box, b, gap) for b in others):
            return obj
    return None


def sample_scene(
    rng: RngLike = None,
    *,
    canvas: int = 224,
    n_objects: int | tuple[int, int] = (1, 4),
    small: bool = False,
    words: bool = False,
    split: str | None = None,
) -> Scene:
    """A random scene: n objects (uniform in `n_objects`, inclusive) with uniform shape/colour/size.

    Args:
        rng: a numpy Generator (advanced in place) or an int seed.
        canvas: side of the square canvas in px (>= 64).
        n_objects: exact count or an inclusive (min, max) range; at most 9 (one object per grid cell).
        small: keep objects at their 224-px pixel size on any canvas (high-resolution scenes).
        words: give every object a distinct word from `WORDS`, drawn under it.
        split: "train" / "eval" keeps only scenes of that hash half (see `scene_split`); None keeps all.

    The object count is drawn once; placement is then retried (new cells, attributes, centres) until the
    objects fit without overlapping, so the count distribution is exactly uniform.
    """
    rng = as_rng(rng)
    if not isinstance(canvas, (int, np.integer)) or isinstance(canvas, bool) or canvas < 64:
        raise InputError(f"canvas must be an int >= 64 px, got {canvas!r}")
    canvas = int(canvas)
    if split is not None and split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS} or None, got {split!r}")
    lo, hi = count_range(n_objects)
    n = int(rng.integers(lo, hi + 1))
    unit = 1.0 if small else canvas / REFERENCE
    for _ in range(_MAX_TRIES):
        cells = rng.permutation(len(POSITIONS))[:n]
        names = [WORDS[i] for i in rng.permutation(len(WORDS))[:n]] if words else [None] * n
        placed: list[Obj] = []
        for cell, word in zip(cells, names):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            obj = place_object(rng, int(cell), shape, colour, size, word, placed, canvas, unit)
            if obj is None:
                break
            placed.append(obj)
        else:
            scene = Scene(canvas, tuple(placed), bool(small))
            if split is None or scene_split(scene) == split:
                return scene
    raise InputError(
        f"could not place {n} non-overlapping objects on a {canvas}-px canvas (words={words}, small={small}) "
        f"in {_MAX_TRIES} attempts; use fewer objects or a larger canvas"
    )
