"""The compression plug-in contract: four kinds of method at three insertion points (architecture.md).

- `ViewResize` (data side, before the tower): changes the view size the tower sees (plain
  downsampling baseline). At most one per spec, and it comes first.
- `TokenStage` (H2, pre-LLM): vision features of the views -> fewer tokens, with their patch positions
  (FasterVLM, HiRED, random keep, spatial pooling). Stages run in spec order on the tower's features,
  before the projector (the projector is per-token, so pruning first saves its compute too).
- `LayerHook` (H5, inside the LM during prefill): `keep` drops visual positions before chosen layers
  (FastV, G-Search / P-Sigmoid); `block_forward` may replace one layer's compute (YOPO).
- `KVPolicy` (H6, decode): after prefill, evicts cached visual keys/values per layer.

Each method declares `needs` (what the pipeline must provide) and two safety flags; the pipeline
(`pipeline.Compression`) checks both against the model and the other methods before any compute.

needs:
  cls_attention   the tower has a [CLS] token and the stage reads its attention rows (H1 capture)
  attention_rows  the method recomputes attention rows inside the LM (SDPA never returns them)
  text_query      the method reads the text of the prompt (so its choice depends on the question)
  full_grid       the method needs each image's full patch grid in raster order (no H2 token stage
                  before it; a resize is fine)
kv_safe: decisions are taken once at prefill and reused, so generation with and without a KV cache
  gives the same tokens. batch_safe: a row's result does not depend on the other rows of its batch.

Our choices: one flat registry of method names (exact match); methods are built per request from a
spec and hold no model state, so two models (or two requests) with different compression coexist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import InputError
from ..registry import Registry

NEEDS = frozenset({"cls_attention", "attention_rows", "text_query", "full_grid"})
KINDS = ("resize", "stage", "layer", "kv")

# name -> factory(**params) -> a plug-in object (ViewResize | TokenStage | LayerHook | KVPolicy)
METHODS: Registry[Callable[..., Any]] = Registry("compression method")
# name -> the parameter that sets its token budget as a ratio in (0, 1] (None: no single budget knob).
# Budget-matched evaluation (`--keep 1,0.5,...`) sets it.
BUDGET_PARAMS: dict[str, str | None] = {}


def register(name: str, budget: str | None = "keep") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a method factory under `name`; `budget` names its ratio budget parameter (or None)."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        METHODS.add(name, factory)
        BUDGET_PARAMS[name] = budget
        return factory

    return deco


def with_budget(spec: str, ratio: float) -> str:
    """`spec` (one method, e.g. "fastv:layer=2") with its budget parameter set to `ratio`:
    with_budget("fastv:layer=2", 0.1) -> "fastv:layer=2:keep=0.1". Methods without a budget are unchanged."""
    from . import methods  # noqa: F401  (registers the built-in methods, as method_names does)
    from .spec import parse_spec

    parsed = parse_spec(spec)
    if len(parsed) != 1:
        raise InputError(f"with_budget takes one method, got {spec!r}")
    (m,) = parsed
    METHODS.get(m.name)  # unknown names fail here, listing the valid ones
    key = BUDGET_PARAMS.get(m.name)
    if key is None:
        return str(m)
    params = {k: v for k, v in m.params.items() if k not in (key, "count")}
    params[key] = ratio
    return str(type(m)(m.name, params))


# ----------------------------------------------------------------------------- contexts
@dataclass
class StageContext:
    """What an H2 stage may read about the current views (all of the same size).

    grid: patch grid (rows, cols) of each view. cls_attention: {vision layer: (N, H, T) fp32} — the
    [CLS] query's attention over the T patch tokens (the CLS column dropped, not renormalised) in that
    layer, for each layer the stages asked for (`cls_layers`). pixel_values: (N, C, H, W) views.
    """

    grid: tuple[int, int]
    cls_attention: Mapping[int, Tensor] = field(default_factory=dict)
    pixel_values: Tensor | None = None
    feature_layer: int = -1  # 0-based number of the vision layer whose output is the selected feature
    num_layers: int = 0  # layers of the vision tower


@dataclass
class LayerState:
    """The prefill state entering LM layer `layer` (after any earlier pruning).

    hidden (B, T, D) layer input; position_ids (B, T); key_mask (B, T) bool real (not padding) positions;
    visual (B, T) bool visual positions; index (B, T) long: each position's index in the original
    prompt; attention_rows(rows) -> (B, H, R, T) fp32: attention of the previous layer for query
    positions `rows` (B, R) long (recomputed from that layer's q/k; None at layer 0).
    num_layers: the LM's depth; num_visual (B,) long: each row's visual tokens in the prompt, before any
    in-LLM pruning (None during decode).
    """

    layer: int
    hidden: Tensor
    position_ids: Tensor
    key_mask: Tensor
    visual: Tensor
    index: Tensor
    attention_rows: Callable[[Tensor], Tensor] | None = None
    num_layers: int = 0
    num_visual: Tensor | None = None


# ----------------------------------------------------------------------------- protocols
@runtime_checkable
class ViewResize(Protocol):
    kind: str  # "resize"
    needs: frozenset[str]
    kv_safe: bool
    batch_safe: bool

    def view_size(self, height: int, width: int, patch: int) -> tuple[int, int]:
        """The (h, w) px the tower should see instead of (height, width). Pure."""
        ...


@runtime_checkable
class TokenStage(Protocol):
    kind: str  # "stage"
    needs: frozenset[str]
    kv_safe: bool
    batch_safe: bool

    def cls_layers(self, feature_layer: int, num_layers: int) -> tuple[int, ...]:
        """Vision layers (0-based) whose [CLS] attention rows the stage reads; () for none.
        `feature_layer`: the layer whose output is the selected feature; `num_layers`: the tower's."""
        ...

    def num_out(self, num_in: int) -> int:
        """Tokens out for `num_in` tokens in (per view). Pure: the processor sizes placeholders with it."""
        ...

    def __call__(self, tokens: Tensor, positions: Tensor, ctx: StageContext) -> tuple[Tensor, Tensor]:
        """tokens (N, T, Dv), positions (N, T, 2) long (patch row, col) -> (N, T', Dv), (N, T', 2),
        T' = num_out(T), kept tokens in their original (raster) order."""
        ...


@runtime_checkable
class LayerHook(Protocol):
    kind: str  # "layer"
    needs: frozenset[str]
    kv_safe: bool
    batch_safe: bool

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """LM layers before which `keep` is called (prefill only)."""
        ...

    def keep(self, state: LayerState) -> Tensor | None:
        """(B, T) bool: visual positions to keep entering `state.layer` (text is always kept); None = all."""
        ...

    def visual_schedule(self, num_layers: int, num_visual: int) -> list[int]:
        """Visual tokens each LM layer processes in prefill, for the analytic cost. Pure."""
        ...


@runtime_checkable
class KVPolicy(Protocol):
    kind: str  # "kv"
    needs: frozenset[str]
    kv_safe: bool
    batch_safe: bool

    def evict(self, layer: int, state: LayerState) -> Tensor | None:
        """After prefill: (B, S) bool cached positions of `layer` to keep (text always kept); None = all.

        `state` describes layer `layer`'s cached entries after prefill (and after earlier policies):
        hidden (B, S, D) and position_ids (B, S) are the layer's input at those entries, key_mask /
        visual (B, S) their real / visual flags, index None; `state.attention_rows(rows)` -> (B, H, R, S)
        recomputes THIS layer's attention over its cached entries for query positions `rows` (B, R)
        (the last prompt token is S - 1). Called only after a cached prefill; generation without a
        cache never evicts."""
        ...

    def kept_visual(self, layer: int, num_visual: int) -> int:
        """How many of `num_visual` cached visual entries of `layer` `evict` keeps (for the cost model)."""
        ...


# ----------------------------------------------------------------------------- helpers for methods
def resolve_keep(name: str, n: int, keep: float | None = None, count: int | None = None,
                 default: float | None = None) -> int:
    """Tokens to keep out of `n`: `keep` is a ratio in (0, 1], `count` an absolute number (1..n).

    Ratios round to the nearest integer (at least 1), as FasterVLM's counts do (576 * 0.1 -> 58).
    """
    if keep is not None and count is not None:
        raise InputError(f"{name}: give keep (a ratio) or count (a number of tokens), not both")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"{name}: count must be a positive integer, got {count!r}")
        if count > n:
            raise InputError(f"{name}: count={count} is above the {n} visual tokens there are")
        return count
    if keep is None:
        keep = default
    if keep is None:
        raise InputError(f"{name}: give keep (a ratio in (0, 1]) or count (a number of tokens)")
    check_ratio(name, "keep", keep)
    return max(1, min(n, int(round(n * float(keep)))))


def check_ratio(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
        raise InputError(f"{name}: {key} must be a ratio in (0, 1], got {value!r}")
    return float(value)


def check_params(name: str, params: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for k in params:
        if k not in valid:
            raise InputError(f"{name}: unknown parameter {k!r}; valid: {', '.join(valid) or '(none)'}")


def topk_in_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest `scores` along the last axis, sorted ascending (original order).

    scores (..., T) -> (..., k) long. Ties break toward the lower index (stable), so results are
    deterministic.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def gather_tokens(tokens: Tensor, positions: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """tokens (N, T, D), positions (N, T, 2), idx (N, K) -> (N, K, D), (N, K, 2)."""
    t = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    p = positions.gather(1, idx[..., None].expand(-1, -1, positions.shape[-1]))
    return t, p


def keep_top_by_patch_score(tokens: Tensor, positions: Tensor, score: Tensor, grid: tuple[int, int],
                            k: int) -> tuple[Tensor, Tensor]:
    """Keep the k tokens with the highest per-patch `score` (N, rows*cols), in raster order.

    If an earlier stage already dropped tokens, each token's score is read at its (row, col) position.
    tokens (N, T, D), positions (N, T, 2) -> (N, k, D), (N, k, 2).
    """
    if score.shape[-1] != tokens.shape[1]:
        flat = positions[..., 0] * grid[1] + positions[..., 1]  # (N, T)
        score = score.gather(1, flat)
    return gather_tokens(tokens, positions, topk_in_order(score, k))
