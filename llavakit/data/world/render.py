"""Drawing a `Scene` (or a video frame) with PIL, at any resolution.

Issue 3, part 2 (the synthetic world). All choices are ours:

- Flat colours, far apart in hue (~60 degrees) and all saturated, on a light-grey background; the
  inside of every shape is exactly its `COLOUR_RGB` value (only edges are anti-aliased), so a colour
  is a fact of the pixels, not of lighting.
- Anti-aliasing by supersampling: drawn at 4x (2x above 512 px, 1x above 1536 px) and reduced with a
  box filter (`Image.reduce`).
- Shapes fill the box of half-extent `r` around the centre: circle (radius r), square (half-side
  0.85 r, about the circle's area), triangle (pointing up, width 2r, height 1.75r), five-pointed star
  (outer r, inner 0.45 r: fat enough to read at 30 px), cross/plus (arms 0.64 r thick).
- Words: Pillow's bundled FreeType font (`ImageFont.load_default(size=...)`, Pillow >= 10.1), dark
  grey, centred in the label box under the shape. Without FreeType Pillow falls back to its fixed
  bitmap font (words become tiny); the package's Pillow has FreeType.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ...errors import InputError
from .scene import Obj, Scene

COLOUR_RGB = {
    "red": (220, 40, 40),
    "yellow": (240, 200, 20),
    "green": (40, 165, 60),
    "cyan": (30, 190, 210),
    "blue": (40, 80, 225),
    "purple": (150, 60, 200),
}
BACKGROUND = (235, 235, 235)
TEXT_RGB = (25, 25, 25)
_MAX_SIDE = 8192


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return pts


def _cross(x: float, y: float, r: float) -> list[tuple[float, float]]:
    t = 0.32 * r  # half arm thickness
    return [
        (x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
        (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t),
    ]  # fmt: skip


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, scale: float, font_px: float) -> None:
    """Draw `obj` (canvas px) onto `draw`, whose image is `scale` times the canvas."""
    x, y, r = obj.x * scale, obj.y * scale, obj.r * scale
    fill = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        h = 0.85 * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.75 * r), (x - r, y + 0.75 * r)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(x, y, r), fill=fill)
    elif obj.shape == "cross":
        draw.polygon(_cross(x, y, r), fill=fill)
    else:
        raise InputError(f"unknown shape {obj.shape!r}")
    if obj.word is not None:
        left, top, right, bottom = obj.label_box(font_px)
        size = max(1, round(font_px * scale))
        # "mm" anchors at the middle of the ascender-descender span: glyphs then fill ~[0.1, 1.12] of
        # the label box height for the default font.
        draw.text((x, (top + 0.5 * font_px) * scale), obj.word, fill=TEXT_RGB, font=_font(size), anchor="mm")


def _supersample(side: int) -> int:
    return 4 if side <= 512 else 2 if side <= 1536 else 1


def render_objects(objects: Sequence[Obj], canvas: int, font_px: float, size: int | None = None) -> Image.Image:
    """RGB image of `objects` on a `canvas`-px background, output `size` px (default: `canvas`)."""
    side = canvas if size is None else size
    if not isinstance(side, int) or isinstance(side, bool) or not 8 <= side <= _MAX_SIDE:
        raise InputError(f"size must be an int between 8 and {_MAX_SIDE} px, got {size!r}")
    ss = _supersample(side)
    img = Image.new("RGB", (side * ss, side * ss), BACKGROUND)
    draw = ImageDraw.Draw(img)
    scale = side * ss / canvas
    for obj in objects:
        draw_object(draw, obj, scale, font_px)
    return img.reduce(ss) if ss > 1 else img


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as an RGB `PIL.Image` of `size` x `size` px (default: the scene's canvas).

    A different `size` redraws the same geometry scaled (sharp at any resolution, no resampling blur).
    """
    return render_objects(scene.objects, scene.canvas, scene.font_px, size)
