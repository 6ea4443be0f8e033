"""Layer-wise keep schedules inside the LLM (H5): G-Search and P-Sigmoid (techniques.md section 4).

Paper: "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction"
(G-Search / P-Sigmoid) [abstract-level: no public code]. Entering LM layer l, the visual tokens are
ranked by the attention they receive from the text tokens in layer l-1 and only the top ceil(r_l * N)
of the ORIGINAL N visual tokens go on (hidden states and KV cache), with r_0 = 1 and r non-increasing.

- `gsearch`: a saved schedule, `ratios=1/1/0.5/0.5/0.25` (one per LM layer; a shorter list is padded
  with its last value) or `file=schedule.json` (written by `python -m llavakit.compression.search`).
- `psigmoid`: r(l) = 1 / (1 + exp(k (l - l0))) for l >= 1, clamped to [min_keep, 1]; defaults k=0.5,
  l0 = half the LM's layers (L / 2), min_keep=0 (at least one token is always kept).

Our choices (the paper gives no code):
- "Text tokens" are the positions after each row's last visual token (the question and the template's
  answer prefix); a row whose prompt ends on a visual token uses its last position. Scores are the
  attention probabilities averaged over heads, then over those query rows (recomputed rows of layer
  l-1; SDPA never returns them).
- Counts use ceil (the paper's ceil(r_l N)), at least 1, at most N; N is each row's own original
  visual count (rows of a batch may differ). Layer 0 never prunes (there is no layer -1 to score
  with); P-Sigmoid's r(0) is taken as 1.
- Pruning happens before every layer where r decreases (`prune_layers`); when the count does not drop
  for any row of the batch there, no attention is recomputed.
- LayerState carries neither N nor the LM depth L: N = surviving visual + positions dropped so far
  (only visual ones are ever dropped), the real prompt length read from the 1-D position ids the engine
  builds (last id + 1); L is remembered from `prune_layers(L)`, which the runner and `Compression.check`
  call before any `keep` (only P-Sigmoid's default l0 needs it).
- A schedule file path cannot hold ":" or "," (the spec grammar's separators), and its "/"-separated
  pieces must survive the grammar's value typing (no "007" or "1.50" directory names).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..compression.base import LayerState, check_params, register
from ..errors import InputError


def keep_count(ratio: float, n: int) -> int:
    """ceil(ratio * n) visual tokens out of n (at least 1 when n > 0); rounding noise ignored
    (0.1 * 30 = 3.0000000000000004 -> 3, not 4)."""
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(round(float(ratio) * n, 9))))


def check_schedule(name: str, ratios: Any) -> tuple[float, ...]:
    """Validate a per-layer keep schedule: a non-empty list of ratios in (0, 1], r_0 = 1, non-increasing."""
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
        ratios = (ratios,)
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise InputError(f"{name}: ratios must be a non-empty list of keep ratios per LM layer, "
                         f"each in (0, 1], e.g. ratios=1/1/0.5/0.25; got {ratios!r}")
    out = []
    for i, r in enumerate(ratios):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= 1:
            raise InputError(f"{name}: ratio {i} must be in (0, 1], got {r!r} (ratios {list(ratios)})")
        out.append(float(r))
    if out[0] != 1.0:
        raise InputError(f"{name}: layer 0 must keep every visual token (r_0 = 1), got r_0 = {out[0]!r}")
    for i in range(1, len(out)):
        if out[i] > out[i - 1]:
            raise InputError(f"{name}: ratios must be non-increasing; r_{i} = {out[i]} > r_{i - 1} = {out[i - 1]} "
                             f"(ratios {out})")
    return tuple(out)


def read_schedule(path: str | Path) -> tuple[float, ...]:
    """The `ratios` of a schedule JSON written by `llavakit.compression.search.save_schedule`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"gsearch: schedule file {str(p)!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise InputError(f"gsearch: cannot read schedule file {str(p)!r}: {e}") from None
    if not isinstance(data, dict) or "ratios" not in data:
        raise InputError(f"gsearch: {str(p)!r} is not a schedule file (a JSON object with \"ratios\")")
    return check_schedule(f"gsearch (file {p})", data["ratios"])


class _LayerSchedule:
    """Shared protocol of G-Search and P-Sigmoid: subclasses give `ratios(num_layers)`."""

    kind = "layer"
    needs = frozenset({"attention_rows", "text_query"})
    kv_safe = True  # the runner freezes decisions at the first prefill
    batch_safe = True
    name = ""

    def ratios(self, num_layers: int) -> list[float]:
        raise NotImplementedError

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        r = self.ratios(num_layers)
        return tuple(l for l in range(1, num_layers) if r[l] < r[l - 1])

    def visual_schedule(self, num_layers: int, num_visual: int) -> list[int]:
        return [keep_count(r, num_visual) for r in self.ratios(num_layers)]

    def keep(self, state: LayerState) -> Tensor | None:
        ratio = self.ratios(state.num_layers)[state.layer]
        vis = state.visual  # (B, T)
        b, t = vis.shape
        n_now = vis.sum(1)  # (B,) visual tokens entering this layer
        target = [keep_count(ratio, int(n)) for n in state.num_visual.tolist()]  # of the prompt's visual tokens
        if all(k >= int(n) for k, n in zip(target, n_now.tolist())):
            return None
        if state.attention_rows is None:
            raise RuntimeError(f"{self.name}: no attention rows before layer {state.layer}")
        ar = torch.arange(t, device=vis.device)
        last_vis = torch.where(vis, ar, -1).amax(1)  # (B,) -1 when a row has no visual token
        n_text = (t - 1 - last_vis).clamp(min=1)  # (B,) query rows: every position after the last visual one
        r_max = int(n_text.max())
        rows = torch.arange(t - r_max, t, device=vis.device).expand(b, r_max)  # (B, R), right-aligned
        att = state.attention_rows(rows)  # (B, H, R, T)
        keep = torch.zeros_like(vis)
        for i in range(b):  # rows may hold different numbers of visual and text tokens
            k, n = target[i], int(n_now[i])
            if n == 0:
                continue
            if k >= n:
                keep[i] = vis[i]
                continue
            keep[i, self.select(att[i, :, r_max - int(n_text[i]):], vis[i], k)] = True
        return keep

    def select(self, att: Tensor, visual: Tensor, k: int) -> Tensor:
        """The k visual positions of one row that go on: `att` (H, R, T) its text rows' attention in the
        previous layer, `visual` (T,) bool its surviving visual positions -> (k,) long. The paper's rule:
        attention averaged over heads, then over text rows, top k (ties to the earlier position)."""
        score = att.mean(0).mean(0)  # (T,): heads, then text rows
        score = score.masked_fill(~visual, float("-inf"))
        return torch.sort(score.float(), descending=True, stable=True).indices[:k]


class GSearch(_LayerSchedule):
    """A fixed searched schedule `ratios` (r_0 = 1, non-increasing, padded with its last value)."""

    name = "gsearch"

    def __init__(self, ratios: Sequence[float]) -> None:
        self.schedule = check_schedule("gsearch", ratios)

    def ratios(self, num_layers: int) -> list[float]:
        if len(self.schedule) > num_layers:
            raise InputError(f"gsearch: the schedule has {len(self.schedule)} ratios but the LM has only "
                             f"{num_layers} layers")
        return list(self.schedule) + [self.schedule[-1]] * (num_layers - len(self.schedule))


class PSigmoid(_LayerSchedule):
    """r(l) = 1 / (1 + exp(k (l - l0))) for l >= 1 (r(0) = 1), clamped to [min_keep, 1]."""

    name = "psigmoid"

    def __init__(self, k: float = 0.5, l0: float | None = None, min_keep: float = 0.0) -> None:
        for key, v, ok in (("k", k, lambda x: x >= 0), ("min_keep", min_keep, lambda x: 0 <= x <= 1)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                want = "a number >= 0 (the steepness; 0 = flat 0.5)" if key == "k" else "a ratio in [0, 1]"
                raise InputError(f"psigmoid: {key} must be {want}, got {v!r}")
        if l0 is not None and (isinstance(l0, bool) or not isinstance(l0, (int, float)) or not math.isfinite(l0)):
            raise InputError(f"psigmoid: l0 must be a number (the layer where r = 0.5) or none "
                             f"(half the LM's layers), got {l0!r}")
        self.k, self.l0, self.min_keep = float(k), None if l0 is None else float(l0), float(min_keep)

    def ratios(self, num_layers: int) -> list[float]:
        l0 = num_layers / 2 if self.l0 is None else self.l0
        out = [1.0]
        for l in range(1, num_layers):
            z = self.k * (l - l0)
            r = 1.0 / (1.0 + math.exp(min(z, 700.0)))  # > 0 always
            out.append(min(1.0, max(self.min_keep, r)))
        return out


def _path(value: Any) -> str:
    """The spec grammar splits values on "/" (a list of ratios): join a path's pieces back. Pieces the
    grammar re-typed lose their spelling ("007" -> 7, "1.50" -> 1.5): such paths need renaming."""
    if isinstance(value, tuple):
        return "/".join(str(x).lower() if isinstance(x, bool) or x is None else str(x) for x in value)
    return str(value)


@register("gsearch", budget=None)
def _build_gsearch(**params: Any) -> GSearch:
    check_params("gsearch", params, ("ratios", "file"))
    if ("ratios" in params) == ("file" in params):
        raise InputError("gsearch: give ratios=1/1/0.5/... (one per LM layer) or file=schedule.json, exactly one")
    if "file" in params:
        return GSearch(read_schedule(_path(params["file"])))
    return GSearch(params["ratios"])


@register("psigmoid", budget=None)
def _build_psigmoid(**params: Any) -> PSigmoid:
    check_params("psigmoid", params, ("k", "l0", "min_keep"))
    return PSigmoid(**params)
