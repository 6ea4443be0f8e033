"""Training-free baselines for visual-token compression at a matched budget (H2 stages + a view resize).

- `random`: keep a random subset of the tokens (the usual control for score-based pruning such as
  FasterVLM / HiRED). Params: `keep` (ratio in (0, 1]) or `count`, `seed` (default 0).
- `pool`: spatial average pooling of the g x g patch grid to s x s tokens, as M3 (Cai et al. 2024,
  "Matryoshka Multimodal Models"; reference mu-cai/matryoshka-mm, llava_arch.py) does at inference,
  but without its multi-scale training. Params: `keep` or `count`: k tokens -> s = max(1, round(sqrt(k))).
- `downsample`: show the tower a smaller image so it produces about the same number of tokens (plain
  bilinear, antialiased downsampling done by the pipeline). Params: `keep` or `count`.

Our choices:
- random: the draw depends only on `seed` and the number of tokens in (a CPU `torch.Generator`), never
  on the image or its batch, so every image of a given size gets the same subset — deterministic and
  batch-invariant by construction; change `seed` for another draw. Kept tokens stay in raster order.
- pool: it runs where every H2 stage runs, on the vision features BEFORE the projector (M3 pools the
  projected features; the projector is per-token but non-linear, so the two differ). Pooling is
  `adaptive_avg_pool2d` (equal to M3's avg_pool2d with kernel = stride when s divides g). A pooled
  token's position is the integer patch at its cell's centre: rows (start + end - 1) // 2 of the cell.
  It needs the full square grid: after a pruning stage, or on a non-square grid, it refuses.
- downsample: square views become (side*patch)^2 with side = max(1, round(sqrt(k))); non-square views
  keep their aspect: both patch counts scaled by sqrt(k / native tokens), rounded, at least 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compression.base import StageContext, check_params, gather_tokens, register, resolve_keep
from ..errors import InputError


def _validate_keep(name: str, keep: Any, count: Any) -> None:
    """Check keep/count now, before any model is known (count against an unbounded token supply)."""
    resolve_keep(name, 10**9 if count is not None else 1, keep, count)


# ----------------------------------------------------------------------------- random
class RandomKeep:
    kind = "stage"
    needs: frozenset[str] = frozenset()
    kv_safe = True
    batch_safe = True

    def __init__(self, keep: float | None = None, count: int | None = None, seed: int = 0) -> None:
        _validate_keep("random", keep, count)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"random: seed must be a non-negative integer, got {seed!r}")
        self.keep, self.count, self.seed = keep, count, seed

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return ()

    def num_out(self, num_in: int) -> int:
        return resolve_keep("random", num_in, self.keep, self.count)

    def indices(self, num_in: int) -> Tensor:
        """The kept indices (K,) long, ascending, for `num_in` tokens: a function of (seed, num_in) only."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_in, generator=g)[: self.num_out(num_in)].sort().values

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        n, t = tokens.shape[:2]
        idx = self.indices(t).to(tokens.device)[None].expand(n, -1)  # (N, K)
        return gather_tokens(tokens, positions, idx)


# ----------------------------------------------------------------------------- pool
class SpatialPool:
    kind = "stage"
    needs: frozenset[str] = frozenset({"full_grid"})
    kv_safe = True
    batch_safe = True

    def __init__(self, keep: float | None = None, count: int | None = None) -> None:
        _validate_keep("pool", keep, count)
        self.keep, self.count = keep, count

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        return ()

    def side(self, num_in: int) -> int:
        """Pooled grid side s for a g x g grid of `num_in` = g*g tokens."""
        g = math.isqrt(num_in)
        if num_in < 1 or g * g != num_in:
            raise InputError(f"pool: needs a square patch grid, but {num_in} visual tokens are not a square "
                             f"number (a [CLS] token kept by the 'full' feature strategy, or a non-square view?)")
        k = resolve_keep("pool", num_in, self.keep, self.count)
        return max(1, round(math.sqrt(k)))

    def num_out(self, num_in: int) -> int:
        return self.side(num_in) ** 2

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        n, t, d = tokens.shape
        gh, gw = ctx.grid
        if t != gh * gw or gh != gw:
            raise InputError(f"pool: needs each view's full square patch grid ({gh}x{gw} = {gh * gw} tokens), "
                             f"got {t} tokens; put pool first among the pre-LLM stages, on a square view")
        g, s = gh, self.side(t)
        fmap = tokens.transpose(1, 2).reshape(n, d, g, g)  # (N, Dv, g, g)
        pooled = F.adaptive_avg_pool2d(fmap.float(), (s, s)).to(tokens.dtype)  # (N, Dv, s, s)
        out = pooled.flatten(2).transpose(1, 2)  # (N, s*s, Dv), raster order
        centre = torch.tensor(_bin_centres(g, s), device=tokens.device)  # (s,)
        flat = (centre[:, None] * g + centre[None, :]).reshape(-1)  # (s*s,)
        pos = positions.gather(1, flat[None, :, None].expand(n, -1, positions.shape[-1]))  # (N, s*s, 2)
        return out, pos


def _bin_centres(g: int, s: int) -> list[int]:
    """Integer centre of each of adaptive pooling's s bins over g cells: bin i is
    [floor(i*g/s), ceil((i+1)*g/s)), its centre (start + end - 1) // 2."""
    return [((i * g) // s + (-(-(i + 1) * g // s)) - 1) // 2 for i in range(s)]


# ----------------------------------------------------------------------------- downsample
class Downsample:
    kind = "resize"
    needs: frozenset[str] = frozenset()
    kv_safe = True
    batch_safe = True

    def __init__(self, keep: float | None = None, count: int | None = None) -> None:
        _validate_keep("downsample", keep, count)
        self.keep, self.count = keep, count

    def view_size(self, height: int, width: int, patch: int) -> tuple[int, int]:
        gh, gw = height // patch, width // patch
        if gh < 1 or gw < 1:
            raise InputError(f"downsample: a {height}x{width} view holds no {patch}-px patch")
        k = resolve_keep("downsample", gh * gw, self.keep, self.count)
        if gh == gw:
            side = max(1, round(math.sqrt(k)))
            return side * patch, side * patch
        scale = math.sqrt(k / (gh * gw))
        return max(1, round(gh * scale)) * patch, max(1, round(gw * scale)) * patch


# ----------------------------------------------------------------------------- registration
@register("random", budget="keep")
def _build_random(**params: Any) -> RandomKeep:
    check_params("random", params, ("keep", "count", "seed"))
    return RandomKeep(**params)


@register("pool", budget="keep")
def _build_pool(**params: Any) -> SpatialPool:
    check_params("pool", params, ("keep", "count"))
    return SpatialPool(**params)


@register("downsample", budget="keep")
def _build_downsample(**params: Any) -> Downsample:
    check_params("downsample", params, ("keep", "count"))
    return Downsample(**params)
