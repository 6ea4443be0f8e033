"""`Compression`: a parsed spec, checked against a model, applied at its insertion points.

Built per request (`Compression.parse(spec)`); it holds the method objects and no model state. The
model asks it for the image-token count (processor placeholders), the compressed image features (H2)
and a per-generation `LMRun` (H5/H6). Composition rules (ours):
- kinds run in pipeline order: resize, then token stages (in spec order), then LM layer hooks, then
  KV policies; a spec must list them in that order, so what a user writes is what runs;
- at most one resize; no two layer hooks prune before the same layer;
- `needs` are met or refused: cls_attention needs a tower with a [CLS] token;
- anyres models (LLaVA-NeXT / OneVision) are refused for now: their views are packed on a 2-D grid
  with newline tokens, which the stages here do not re-pack yet.
- position ids after a pre-LLM stage: every token stage takes `pos=compact` (the default, what
  FasterVLM / HiRED do: the kept tokens are re-indexed 0..k-1 in the LM input) or `pos=original` (each
  kept token keeps the position id of its patch in the full raster grid, and the text after the image
  continues after the full grid, as FastV's in-LLM pruning does). Ours: the option, and that all stages
  of one spec must agree.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .base import KINDS, METHODS, StageContext
from .spec import MethodSpec, format_spec, parse_spec


@dataclass(frozen=True)
class ImageFeatures:
    """Compressed, projected features of each image and which patches they came from."""

    features: list[Tensor]  # per image (T', D)
    positions: list[Tensor]  # per image (T', 2) long: patch (row, col) in the tower grid
    grid: tuple[int, int]  # the tower's patch grid (rows, cols) after any resize


POSITION_MODES = ("compact", "original")


class Compression:
    def __init__(self, methods: Sequence[MethodSpec], plugins: Sequence[Any], original_positions: bool = False) -> None:
        self.methods = tuple(methods)
        self.plugins = tuple(plugins)
        self.original_positions = bool(original_positions)  # kept visual tokens keep their raster position ids
        order = [KINDS.index(p.kind) for p in self.plugins]
        if order != sorted(order):
            raise InputError(f"impossible composition {self.spec!r}: list methods in pipeline order "
                             f"(resize, pre-LLM stages, in-LLM hooks, KV policies)")
        self.resize = [p for p in self.plugins if p.kind == "resize"]
        if len(self.resize) > 1:
            raise InputError(f"impossible composition {self.spec!r}: at most one resize method")
        self.stages = [p for p in self.plugins if p.kind == "stage"]
        self.layer_hooks = [p for p in self.plugins if p.kind == "layer"]
        self.kv_policies = [p for p in self.plugins if p.kind == "kv"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, spec: Any) -> "Compression | None":
        """A spec (string, list, or a Compression) -> Compression, or None when it names no method."""
        if spec is None or isinstance(spec, Compression):
            return spec
        from . import methods  # noqa: F401  (registers every method)

        parsed = parse_spec(spec)
        if not parsed:
            return None
        plugins, modes = [], set()
        for m in parsed:
            params = dict(m.params)
            pos = params.pop("pos", None)
            plugin = METHODS.get(m.name)(**params)
            if pos is not None:
                if plugin.kind != "stage":
                    raise InputError(f"{m.name}: pos applies to pre-LLM token stages only (fastervlm, hired, "
                                     f"random, pool); {m.name} is a {plugin.kind} method")
                if pos not in POSITION_MODES:
                    raise InputError(f"{m.name}: pos must be one of {', '.join(POSITION_MODES)}, got {pos!r}")
            if plugin.kind == "stage":
                modes.add(pos or "compact")
            plugins.append(plugin)
        if len(modes) > 1:
            raise InputError(f"impossible composition {format_spec(parsed)!r}: its token stages disagree on pos "
                             f"(compact vs original); give every stage the same pos")
        return cls(parsed, plugins, original_positions=modes == {"original"})

    @classmethod
    def single(cls, spec: Any, types: type | tuple[type, ...], what: str, names: str, example: str) -> Any:
        """The one plug-in a spec names, of one of `types` (`names` in words) — a training option's spec
        (`yopo`, `prune_schedule`); a clear error naming the option `what` and an `example` otherwise."""
        if not isinstance(spec, str) or not spec.strip():
            raise InputError(f"{what} must be a compression spec such as {example!r}, got {spec!r}")
        comp = cls.parse(spec)
        plugins = () if comp is None else comp.plugins
        if len(plugins) != 1 or not isinstance(plugins[0], types):
            raise InputError(f"{what}: training takes exactly one {names} method (e.g. {example!r}), got {spec!r}")
        return plugins[0]

    @property
    def spec(self) -> str:
        return format_spec(self.methods)

    def __repr__(self) -> str:
        return f"Compression({self.spec!r})"

    @property
    def kv_safe(self) -> bool:
        return all(p.kv_safe for p in self.plugins)

    @property
    def batch_safe(self) -> bool:
        return all(p.batch_safe for p in self.plugins)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(p.needs for p in self.plugins))

    def check(self, model) -> None:
        """Refuse, before any compute, what this model cannot do with this spec."""
        cfg = model.config
        if not cfg.has_vision:
            raise InputError(f"compression {self.spec!r} needs a vision-language model; this one is text-only")
        if cfg.is_anyres:
            raise InputError(f"compression is not supported on {cfg.architecture} (anyres) models yet; "
                             f"use a fixed-resolution LLaVA model")
        if self.stages and cfg.vision_feature_select_strategy != "default" and model.vision_tower.has_cls:
            raise InputError(f"compression stages need patch-only visual features; this model also feeds the "
                             f"[CLS] token (vision_feature_select_strategy={cfg.vision_feature_select_strategy!r})")
        n_vis = cfg.vision.num_hidden_layers
        feat_layer = _feature_layer_number(cfg.feature_layers[-1], n_vis)
        for j, (p, m) in enumerate(zip(self.plugins, self.methods)):
            if "cls_attention" in p.needs and not model.vision_tower.has_cls:
                raise InputError(f"{m.name} needs a [CLS] token in the vision tower; "
                                 f"{cfg.vision.family} has none")
            if "full_grid" in p.needs and any(q.kind == "stage" for q in self.plugins[:j]):
                raise InputError(f"impossible composition {self.spec!r}: {m.name} needs each image's full "
                                 f"patch grid, but a pre-LLM token stage comes before it")
            if p.kind == "stage":
                for l in p.cls_layers(feat_layer, n_vis):
                    if not 0 <= l < n_vis:
                        raise InputError(f"{m.name}: vision layer {l} is outside the tower's {n_vis} layers")
        seen: dict[int, str] = {}
        n_layers = cfg.lm.num_hidden_layers
        for p, m in zip(self.plugins, self.methods):
            if p.kind != "layer":
                continue
            for layer in p.prune_layers(n_layers):
                if not 0 <= layer < n_layers:
                    raise InputError(f"{m.name}: layer {layer} is outside the LM's {n_layers} layers")
                if layer in seen:
                    raise InputError(f"impossible composition {self.spec!r}: {seen[layer]} and {m.name} both "
                                     f"prune before LM layer {layer}")
                seen[layer] = m.name
        self.num_image_tokens(model, (cfg.input_size, cfg.input_size))  # raises on impossible counts

    # ------------------------------------------------------------------ H1/H2: the visual side
    def view_size(self, model, view: tuple[int, int]) -> tuple[int, int]:
        h, w = (int(x) for x in view)
        if self.resize:
            h, w = self.resize[0].view_size(h, w, model.config.vision.patch_size)
        return h, w

    def num_image_tokens(self, model, view: tuple[int, int]) -> int:
        n = model.num_image_tokens(self.view_size(model, view))
        for s in self.stages:
            n = s.num_out(n)
        return n

    def visual_tokens_per_stage(self, model, view: tuple[int, int]) -> dict[str, int]:
        """{"vision": tower tokens, "<method>": count after it, ...} for `cost.request_cost`."""
        n = model.num_image_tokens(self.view_size(model, view))
        out = {"vision": n}
        for s, m in zip(self.stages, [m for m, p in zip(self.methods, self.plugins) if p.kind == "stage"]):
            n = s.num_out(n)
            out[m.name] = n
        return out

    def image_features(self, model, pixel_values: Tensor) -> ImageFeatures:
        """pixel_values (N, C, H, W) -> compressed projected features per image (H2 before the projector)."""
        cfg = model.config
        pv = pixel_values
        h, w = self.view_size(model, tuple(pv.shape[-2:]))
        resized = (h, w) != tuple(pv.shape[-2:])
        if resized:  # plain downsampling of the normalised view (antialiased)
            pv = F.interpolate(pv.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False).to(pv.dtype)
        patch = cfg.vision.patch_size
        grid = (h // patch, w // patch)
        n_layers = cfg.vision.num_hidden_layers
        feat_layer = _feature_layer_number(cfg.feature_layers[-1], n_layers)
        wanted = sorted({l for s in self.stages for l in s.cls_layers(feat_layer, n_layers)})
        for l in wanted:
            if not 0 <= l < n_layers:
                raise InputError(f"CLS attention of vision layer {l} asked for; the tower has {n_layers} layers")
        feats, attn = model._select_with_attention(pv, {l: slice(0, 1) for l in wanted}, resized)  # (N, T, Dv)
        feats = model.multi_modal_projector.mix(feats, grid)  # local context (if any) on the full grid
        n, t = feats.shape[:2]
        has_cls_col = cfg.vision_feature_select_strategy == "default" and model.vision_tower.has_cls
        cls_attention = {l: a[:, :, 0, 1:] if has_cls_col else a[:, :, 0, :] for l, a in attn.items()}  # (N, H, T)
        rows = torch.arange(t, device=feats.device)
        pos = torch.stack([rows // grid[1], rows % grid[1]], dim=-1)[None].expand(n, t, 2).contiguous()  # (N, T, 2)
        ctx = StageContext(grid=grid, cls_attention=cls_attention, pixel_values=pv, feature_layer=feat_layer,
                           num_layers=n_layers)
        for s in self.stages:
            want = s.num_out(feats.shape[1])
            feats, pos = s(feats, pos, ctx)
            if feats.shape[1] != want or pos.shape[:2] != feats.shape[:2]:
                raise RuntimeError(f"{type(s).__name__} returned {feats.shape[1]} tokens, num_out said {want}")
        proj = model.multi_modal_projector(feats, mixed=True)  # (N, T', D)
        return ImageFeatures(list(proj.unbind(0)), list(pos.unbind(0)), grid)

    def prompt_position_ids(self, input_ids: Tensor, attention_mask: Tensor, image_token_id: int,
                            feats: ImageFeatures) -> Tensor | None:
        """(B, T) LM position ids for prompts whose images went through `image_features`, or None for the
        default (consecutive ids over real tokens). With `pos=original`, image j's kept tokens take
        start_j + row * cols + col and the text after it continues at start_j + rows * cols.
        Left padding gets id 1, as transformers' generation gives it."""
        if not self.original_positions:
            return None
        n_full = feats.grid[0] * feats.grid[1]
        flat = [p[:, 0] * feats.grid[1] + p[:, 1] for p in feats.positions]  # per image (T',)
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        out, j = [], 0
        for row, m in zip(ids, mask):
            pos, nxt, t = [], 0, 0
            while t < len(row):
                if not m[t]:
                    pos.append(1)
                    t += 1
                elif row[t] == image_token_id:
                    if j >= len(flat):
                        raise InputError("more image placeholders in the prompts than images")
                    k = len(flat[j])
                    if row[t:t + k] != [image_token_id] * k:
                        raise InputError(f"image {j} has {k} visual tokens but its placeholder run is shorter")
                    pos += [nxt + int(f) for f in flat[j].tolist()]
                    nxt, t, j = nxt + n_full, t + k, j + 1
                else:
                    pos.append(nxt)
                    nxt, t = nxt + 1, t + 1
            out.append(pos)
        if j != len(flat):
            raise InputError(f"{len(flat)} images but {j} placeholder runs in the prompts")
        return torch.tensor(out, dtype=torch.long, device=input_ids.device)

    # ------------------------------------------------------------------ H5/H6: the LM side
    def lm_run(self, model, input_ids: Tensor, attention_mask: Tensor | None):
        """A per-generation `LMRun` (None when no LM-side method is in the spec)."""
        if not self.layer_hooks and not self.kv_policies:
            return None
        from .runner import LMRun

        visual = input_ids == model.config.image_token_id  # (B, T)
        n_layers = model.config.lm.num_hidden_layers
        for n in visual.sum(1).unique().tolist():  # impossible budgets fail here, before any compute
            for h in self.layer_hooks:
                h.visual_schedule(n_layers, int(n))
        return LMRun(self.layer_hooks, self.kv_policies, visual, attention_mask, self.image_side(model))

    def image_side(self, model) -> int | None:
        """The patch-grid side of every image's tokens in the LM input when they are one full square grid
        in raster order (fixed-resolution tower, no pre-LLM token stage); None otherwise."""
        cfg = model.config
        if not cfg.has_vision or cfg.is_anyres or self.stages:
            return None
        side = int(cfg.input_size)
        n = model.num_image_tokens(self.view_size(model, (side, side)))
        s = math.isqrt(n)
        return s if s * s == n else None

    def tokens_per_layer(self, model, visual_tokens: int, text_tokens: int) -> list[int]:
        """Positions each LM layer processes in prefill (for `cost.request_cost`)."""
        n_layers = model.config.lm.num_hidden_layers
        vis = [visual_tokens] * n_layers
        for h in self.layer_hooks:
            sched = h.visual_schedule(n_layers, visual_tokens)
            vis = [min(a, b) for a, b in zip(vis, sched)]
        return [v + text_tokens for v in vis]

    def kv_tokens_per_layer(self, model, visual_tokens: int, text_tokens: int) -> list[int]:
        """Positions each LM layer keeps in its KV cache after prefill (and after KV policies)."""
        per_layer = self.tokens_per_layer(model, visual_tokens, text_tokens)
        for p in self.kv_policies:
            per_layer = [text_tokens + p.kept_visual(layer, n - text_tokens) for layer, n in enumerate(per_layer)]
        return per_layer


def _feature_layer_number(hidden_index: int, num_layers: int) -> int:
    """Hidden-state index (transformers' output_hidden_states; negatives from the end) -> the 0-based
    number of the layer that produced it (FasterVLM reads the attention of that same layer)."""
    i = hidden_index if hidden_index >= 0 else num_layers + 1 + hidden_index
    return max(i - 1, 0)
