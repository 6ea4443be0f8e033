"""YOPO inside the LM (H5): neighbor-aware visual attention, inactive-head pruning, a sparse visual FFN
and a visual layer cut, with the skipped work really not computed.

Zhang et al. 2024, "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See"
(arXiv 2410.06169; reference code ZhangAIPI/YOPO_MLLM_Pruning: `modeling_llama_prune.py`,
`gen_mask_llava.py`). The visual computation of the LM is pruned once per model, not per conversation:

(a) `window` (odd w, default 5; 0 = off): inside the visual span V x V each visual token attends only
    to the w x w window centred on it in its image's patch grid (Chebyshev distance <= (w-1)/2),
    bidirectionally as in the reference (which overwrites the V x V block of the causal mask);
    `bidirectional=false` keeps the window causal (then a window covering the grid is the plain
    model). Text <-> vision is unchanged: visual queries see the text before them, text queries see
    every visual token before them.
(b) `heads` (a calibration JSON from `calibrate` / `save_heads`, or none): at a layer, a query head
    marked visually inactive skips the visual keys for all its queries and its visual-position
    queries are not computed (its attention output on V rows is zero before o_proj, as in the
    reference's `attn_output[V] *= headmask`).
(c) `ffn_ratio` (r, default 2; 1 = off): V positions use only the first I/r intermediate channels of
    the gated MLP (the reference zeroes the others); text positions use the full MLP.
(d) `layercut` (L, default none): from layer L on, V is neither attended nor updated. Implemented
    as pruning every visual token before layer L through the runner's `prune_layers`/`keep`, so the
    hidden states and the KV cache of layers >= L hold text only.
`start` (default 0, as the reference, which applies (a)-(c) in every layer): the first layer where
(a)-(c) apply. `grid` (optional patch-grid side): see "images" below.

How the work is skipped (ours; the reference masks a dense eager attention and zeroes activations):
- Each layer splits its positions into text and visual rows (gathered per batch row). With every head
  active, q/k/v and o_proj run once over all rows; with inactive heads, V rows project q only for the
  active heads (q_proj weight rows sliced), k/v only for the K/V heads some active query head reads
  (the others are written as zeros to the cache and never read), and o_proj over the active heads'
  columns only. The V rows' MLP uses gate/up weight rows and down weight columns sliced to I/r.
- Visual queries (active heads) attend [text keys] + [window keys] with one softmax over the
  concatenated scores (`window=0`: all keys causally, through SDPA). Two kernels: when every batch
  row holds whole grids of one size in raster order (the normal case), the window keys of the
  queries of grid row r lie in grid rows r-h..r+h, a contiguous band of (2h+1)*side tokens taken as
  a strided view (unfold, no gather): side x band dense matmuls with a fixed window mask. Otherwise
  (rows with different visual counts, grids thinned by another hook) each query's <= w*w window keys
  are gathered. Either way a visual query costs (Tt + band or w*w) keys instead of (Tt + Nv).
- Text queries: active heads attend every key (SDPA); inactive heads attend the gathered text keys
  only. In decode (one text query) inactive heads attend the cached text entries only
  (`run.layer_visual` marks the prefill's visual entries). Softmax is over the keys kept (skipped
  keys are excluded before the softmax); the reference zeroes them after the softmax without
  renormalising, which needs every score computed. This matters only when heads are pruned.
- A layer where nothing applies (before `start`, no visual token left, or window off + no inactive
  head + r = 1) returns None: the runner's normal block runs. The row layout and window plan are
  computed once per pruning point, not per layer.
- Measured (benchmarks/yopo_speed.py -> docs/yopo_speed.json, default model, 256 visual tokens, CPU,
  1 thread): the prefill with window=5, ffn_ratio=2, layercut=15 takes about half the time of the
  plain one; the gain comes from the FFN slice and the layer cut. The window and the head pruning
  save attention FLOPs that are a few percent of a SmolLM2-135M layer at 256 tokens, so alone they
  do not show in wall time there (they do in FLOPs, and grow with the token count).

Grouped-query attention: activity is per QUERY head (calibration measures each query head); the K/V
head g is shared by query heads g*n_rep .. (g+1)*n_rep - 1 (as `repeat_kv`). V rows' K/V of head g are
computed when at least one of its query heads is active; otherwise nothing reads them.

Images: each maximal run of visual positions in a prompt is one image whose tokens are its full patch
grid in raster order (`needs={"full_grid"}`: the pipeline refuses a pre-LLM token stage before this);
a run must hold a square number of tokens. Images placed back to back with no text between them form
one run, cut into side x side images: side = `grid=<side>` when given, else the model's own patch grid
(`Compression.image_side`), else the run's square root. The window follows each token's
(image, row, col), so it stays right if another hook pruned some visual tokens earlier.

`calibrate(vlm, samples, tau, n)` measures, per layer and query head, rho = attention mass on V /
attention mass on text of the text queries after the image (attention rows recomputed from the
layer's q/k; never eager attention), and marks a head active where rho > tau in a strict majority of
the samples. Our choices: queries = the text positions after the first visual token (text before the
image cannot see it); tau default 0.1 (the paper's value is not in the public code).

`visual_compute(...)` reports, per layer, the visual FLOPs of the LM (linear layers on V rows +
attention pairs with a visual query or a visual key, cost.py's convention: attended pairs, so the
window counts its w x w neighbours, not the band the kernel multiplies) with and without YOPO, and
the fraction skipped: the eval's "visual compute in the LM".

No fine-tuning here: the reference fine-tunes LLaVA after pruning (its released checkpoints), so the
training-free masks change the outputs of a model that never saw them (docs/yopo_speed.json gives the
logit change and whether the next token is kept). To fine-tune with the pruning on, a recipe sets
`yopo: SPEC` (llavakit/training/yopo_train.py, the masked form of this hook).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compression.base import LayerState, check_params, register
from ..errors import InputError
from ..fileio import atomic_write_text
from ..layers.attention import attention_rows, causal_padding_mask, sdpa
from ..layers.rope import apply_rope

HEADS_FORMAT = "llavakit.yopo.heads/1"
PARAMS = ("window", "heads", "ffn_ratio", "layercut", "start", "bidirectional", "grid")


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"yopo: {name} must be an integer >= {minimum}{' or none' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def _path_param(value: Any) -> Any:
    """The spec grammar splits values on '/' into tuples: join a path back ("/a/b.json" -> ("", "a", "b.json"))."""
    if isinstance(value, tuple):
        return "/".join("none" if x is None else str(x).lower() if isinstance(x, bool) else str(x) for x in value)
    return value


class YOPO:
    kind = "layer"
    needs = frozenset({"full_grid", "attention_rows"})
    kv_safe = True  # every decision is fixed by the prompt and the heads file
    batch_safe = True  # every decision is per row

    def __init__(self, window: int = 5, heads: str | Mapping[str, Any] | None = None, ffn_ratio: int = 2,
                 layercut: int | None = None, start: int = 0, bidirectional: bool = True,
                 grid: int | None = None) -> None:
        self.window = _int("window", window, 0)
        if self.window and self.window % 2 == 0:
            raise InputError(f"yopo: window must be odd (a w x w window centred on each token) or 0 (off), "
                             f"got {window!r}")
        self.ffn_ratio = _int("ffn_ratio", ffn_ratio, 1)
        self.layercut = _int("layercut", layercut, 1, allow_none=True)
        self.start = _int("start", start, 0)
        self.grid = _int("grid", grid, 1, allow_none=True)
        if not isinstance(bidirectional, bool):
            raise InputError(f"yopo: bidirectional must be true or false, got {bidirectional!r}")
        self.bidirectional = bidirectional
        if self.layercut is not None and self.start >= self.layercut:
            raise InputError(f"yopo: start={self.start} must be below layercut={self.layercut} "
                             f"(window/heads/ffn_ratio apply in layers start .. layercut-1)")
        heads = _path_param(heads)
        if heads is not None and not isinstance(heads, (str, os.PathLike, Mapping)):
            raise InputError(f"yopo: heads must be the path of a calibration JSON (or none), got {heads!r}")
        self.heads = heads
        self._table: Tensor | None = None  # (L, H) bool active heads, loaded on first use (no I/O here)
        self._runs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LMRun -> _RunCache

    # ------------------------------------------------------------------ LayerHook protocol
    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.heads is not None:
            self.active_heads(num_layers)  # a bad heads file fails at Compression.check, before compute
        return () if self.layercut is None else (self.layercut,)

    def keep(self, state: LayerState) -> Tensor:
        """Before `layercut`: no visual token survives (the runner always keeps text)."""
        return torch.zeros_like(state.visual)

    def visual_schedule(self, num_layers: int, num_visual: int) -> list[int]:
        cut = num_layers if self.layercut is None else self.layercut
        return [num_visual if l < cut else 0 for l in range(num_layers)]

    def applies(self, layer: int) -> bool:
        """Whether window / heads / ffn_ratio act in `layer` (start <= layer < layercut)."""
        return layer >= self.start and (self.layercut is None or layer < self.layercut)

    # ------------------------------------------------------------------ heads
    def active_heads(self, num_layers: int | None = None, num_heads: int | None = None) -> Tensor | None:
        """(L, H) bool: visually active query heads per layer (None without a heads file). The file is
        read on first use (the runner's `prune_layers` call, before any LM compute), never here."""
        if self.heads is None:
            return None
        if self._table is None:
            data = self.heads if isinstance(self.heads, Mapping) else load_heads(self.heads)
            self._table = _check_table(data, "heads" if isinstance(self.heads, Mapping) else str(self.heads))
        l, h = self._table.shape
        if (num_layers is not None and l != num_layers) or (num_heads is not None and h != num_heads):
            raise InputError(f"yopo: the heads file is for {l} layers x {h} heads; this LM has "
                             f"{num_layers if num_layers is not None else l} layers x "
                             f"{num_heads if num_heads is not None else h} heads; calibrate on this model "
                             f"(llavakit.llm_hooks.yopo.calibrate)")
        return self._table

    def _active(self, layer: int, num_heads: int, device) -> Tensor | None:
        """(Ha,) long active query heads of `layer`, or None when every head is active."""
        table = self.active_heads(None, num_heads)
        if table is None or layer >= table.shape[0] or bool(table[layer].all()):
            return None
        return table[layer].nonzero()[:, 0].to(device)

    # ------------------------------------------------------------------ the layer
    def block_forward(self, layer: int, block, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                      cache, state: LayerState, run) -> Tensor | None:
        if not self.applies(layer):
            return None
        attn = block.self_attn
        if state.index is None:  # decode: only inactive heads change anything
            act = self._active(layer, attn.num_heads, h.device)
            vis = run.layer_visual[layer] if layer < len(run.layer_visual) else None
            if act is None or vis is None or not bool(vis.any()):
                return None
            _check_linear(block)
            return _decode_layer(block, h, cos, sin, mask, cache, layer, vis, act)
        vis = state.visual & state.key_mask  # (B, T)
        if not bool(vis.any()):
            return None
        act = self._active(layer, attn.num_heads, h.device)
        if not self.window and act is None and self.ffn_ratio == 1:
            return None
        _check_linear(block)
        if mask is None:
            mask = causal_padding_mask(state.key_mask, h.shape[1])
        return _prefill_layer(block, h, cos, sin, mask, cache, layer, self._layout(run, state, vis), act,
                              self.ffn_ratio)

    def _layout(self, run, state: LayerState, vis: Tensor) -> "_Layout":
        """Where the text / visual rows and the window keys are. Computed once per run (image grids) and
        once per pruning point (the runner passes the same index / visual / key-mask tensors to every
        layer until it compacts them), not per layer."""
        rc = self._runs.get(run)
        if rc is None:
            rc = self._runs[run] = _RunCache()
        key = (state.index, state.visual, state.key_mask)
        if rc.key is not None and all(a is b for a, b in zip(rc.key, key)):
            return rc.layout
        plan = None
        if self.window:
            if rc.grids is None:
                rc.grids = _grids(run.visual, self.grid or run.image_side)
            half = min((self.window - 1) // 2, rc.grids.side - 1)
            plan = _window_plan(rc.grids, state.index, vis, half, causal=not self.bidirectional)
        v_idx, v_ok = (plan.v_idx, plan.v_ok) if plan is not None else _pack(vis)
        rc.key, rc.layout = key, _Layout(*_pack(~vis), v_idx, v_ok, plan)
        return rc.layout

    # ------------------------------------------------------------------ reporting
    def visual_compute(self, lm_config, num_visual: int, text_before: int, text_after: int,
                       side: int | None = None) -> dict[str, Any]:
        """Visual FLOPs of each LM layer in prefill, uncompressed vs YOPO (cost.py's convention:
        multiply-add = 2 FLOPs; attention = 4 * head_dim FLOPs per (query, key) pair per query head).

        Visual FLOPs of a layer = its linear layers on the V rows (q, k, v, o, gate, up, down) + the
        attention pairs with a visual query (text before the image, then V causally) or a visual key
        (the `text_after` queries x V). `side`: the patch grid side (default sqrt(num_visual); with
        several images give it, num_visual = images * side^2). Returns {"full": [...], "yopo": [...],
        "skipped_per_layer": [...], "skipped": total fraction skipped}.
        """
        lc = lm_config
        n = _int("num_visual", num_visual, 0)
        tb, ta = _int("text_before", text_before, 0), _int("text_after", text_after, 0)
        if side is None:
            side = math.isqrt(n)
        if side < 1 or n % (side * side):
            raise InputError(f"yopo: {n} visual tokens are not whole {side}x{side} grids; pass side=")
        images = n // (side * side)
        d, dh, hq, hkv, inter = lc.hidden_size, lc.dim_head, lc.num_attention_heads, lc.num_key_value_heads, \
            lc.intermediate_size
        L = lc.num_hidden_layers
        table = self.active_heads(L, hq)
        rep = hq // hkv
        pair = 4 * dh  # per query head

        def layer_flops(ha: int, hkv_used: int, inter_used: int, vv_pairs: int) -> int:
            lin = 2 * n * (d * dh * ha + 2 * d * dh * hkv_used + ha * dh * d + 3 * d * inter_used)
            return lin + pair * ha * (n * tb + vv_pairs + ta * n)

        full_pairs = images * side * side * (side * side + 1) // 2
        if self.window:
            half = min((self.window - 1) // 2, side - 1)
            axis = sum(min(i + half, side - 1) - max(i - half, 0) + 1 for i in range(side))
            win = axis * axis
            win_pairs = images * (win if self.bidirectional else (win - side * side) // 2 + side * side)
        else:
            win_pairs = full_pairs
        full, yopo = [], []
        for l in range(L):
            f = layer_flops(hq, hkv, inter, full_pairs)
            if self.layercut is not None and l >= self.layercut:
                y = 0
            elif not self.applies(l):
                y = f
            else:
                act = [True] * hq if table is None else table[l].tolist()
                ha = sum(act)
                used = sum(any(act[g * rep:(g + 1) * rep]) for g in range(hkv))
                y = layer_flops(ha, used, inter // self.ffn_ratio, win_pairs)
            full.append(f)
            yopo.append(y)
        tot = sum(full)
        return {"full": full, "yopo": yopo,
                "skipped_per_layer": [1 - y / f if f else 0.0 for f, y in zip(full, yopo)],
                "skipped": 1 - sum(yopo) / tot if tot else 0.0}


@register("yopo", budget=None)
def _build(**params: Any) -> YOPO:
    check_params("yopo", params, PARAMS)
    return YOPO(**params)


# ----------------------------------------------------------------------------- helpers
def _check_linear(block) -> None:
    mods = (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
            block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
    if not all(type(m) is nn.Linear for m in mods):
        raise InputError("yopo slices the LM's linear weights: merge LoRA adapters first "
                         "(llavakit.training.lora.merge_lora)")


def _pack(sel: Tensor) -> tuple[Tensor, Tensor]:
    """sel (B, T) bool -> idx (B, K) long: each row's selected positions in order (left-aligned, padded
    with 0), valid (B, K) bool. K = the largest count of a row."""
    counts = sel.sum(1)  # (B,)
    k = int(counts.max()) if sel.numel() else 0
    order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :k]  # selected first, in order
    valid = torch.arange(k, device=sel.device)[None] < counts[:, None]
    return torch.where(valid, order, 0), valid


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, T, ...), idx (B, K) -> (B, K, ...) (advanced indexing: a row copy, faster than gather on CPU)."""
    return x[torch.arange(idx.shape[0], device=idx.device)[:, None], idx]


def _block(mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """mask (B, 1, Tq, S) bool, rows (B, R), cols (B, C) -> (B, 1, R, C): the sub-mask of those queries/keys."""
    bi = torch.arange(rows.shape[0], device=rows.device)[:, None, None]
    return mask[:, 0][bi, rows[:, :, None], cols[:, None, :]][:, None]


def _heads_rows(linear: nn.Linear, heads: Tensor | None, dh: int) -> tuple[Tensor, Tensor | None]:
    """Weight rows (and bias) of the output channels of `heads` (None = all)."""
    if heads is None:
        return linear.weight, linear.bias
    rows = (heads[:, None] * dh + torch.arange(dh, device=heads.device)).reshape(-1)
    w = linear.weight.index_select(0, rows)
    return w, None if linear.bias is None else linear.bias.index_select(0, rows)


def _proj(linear: nn.Linear, x: Tensor, heads: Tensor | None, dh: int) -> Tensor:
    """x (B, T, D) -> (B, h, T, dh): the projection for `heads` only (smaller matmul)."""
    w, b = _heads_rows(linear, heads, dh)
    y = F.linear(x, w, b)
    return y.view(x.shape[0], x.shape[1], -1, dh).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, kv_of: Tensor | None, mask: Tensor) -> Tensor:
    """SDPA for a subset of query heads: q (B, h, Tq, Dh); k, v (B, Hkv, S, Dh); kv_of (h,) the K/V head
    of each query head (None: q holds every head in order, GQA handled by SDPA)."""
    if kv_of is not None:
        k, v = k.index_select(1, kv_of), v.index_select(1, kv_of)
    return sdpa(q, k, v, mask)


def _sparse_mlp(mlp, x: Tensor, ratio: int) -> Tensor:
    """The gated MLP on the first I/ratio intermediate channels only (gate/up rows, down columns)."""
    if ratio == 1:
        return mlp(x)
    i = mlp.gate_proj.out_features // ratio
    if i < 1:
        raise InputError(f"yopo: ffn_ratio={ratio} leaves no intermediate channel of "
                         f"{mlp.gate_proj.out_features}")
    gb, ub = mlp.gate_proj.bias, mlp.up_proj.bias
    g = F.linear(x, mlp.gate_proj.weight[:i], None if gb is None else gb[:i])
    u = F.linear(x, mlp.up_proj.weight[:i], None if ub is None else ub[:i])
    return F.linear(mlp.act(g) * u, mlp.down_proj.weight[:, :i], mlp.down_proj.bias)


# ----------------------------------------------------------------------------- image grids
@dataclass
class _Grids:
    """Each prompt position's image (number within its row; -1 = text), row and column."""

    img: Tensor  # (B, T0) long
    row: Tensor  # (B, T0) long
    col: Tensor  # (B, T0) long
    n_img: int  # most images in one row
    side: int  # largest grid side


def _grids(visual: Tensor, side: int | None) -> _Grids:
    b, t0 = visual.shape
    img = torch.full((b, t0), -1, dtype=torch.long)
    row = torch.zeros(b, t0, dtype=torch.long)
    col = torch.zeros(b, t0, dtype=torch.long)
    n_img, max_side = 0, 1
    for i, flags in enumerate(visual.cpu().tolist()):
        k, p = 0, 0
        while p < t0:
            if not flags[p]:
                p += 1
                continue
            e = p
            while e < t0 and flags[e]:
                e += 1
            n = e - p
            if side is not None:
                if n % (side * side):
                    raise InputError(f"yopo: a run of {n} visual tokens is not whole {side}x{side} grids "
                                     f"(grid={side})")
                sides = [side] * (n // (side * side))
            else:
                s = math.isqrt(n)
                if s * s != n:
                    raise InputError(f"yopo: a run of {n} visual tokens is not a square patch grid; each image "
                                     f"must keep its full grid (no pre-LLM token stage), and images placed back "
                                     f"to back need grid=<side> to be told apart")
                sides = [s]
            for s in sides:
                r = torch.arange(s * s)
                img[i, p:p + s * s] = k
                row[i, p:p + s * s] = r // s
                col[i, p:p + s * s] = r % s
                p += s * s
                k += 1
                max_side = max(max_side, s)
        n_img = max(n_img, k)
    dev = visual.device
    return _Grids(img.to(dev), row.to(dev), col.to(dev), max(n_img, 1), max_side)


@dataclass
class _RunCache:
    grids: "_Grids | None" = None
    key: tuple | None = None  # the (index, visual, key_mask) tensors `layout` was computed for
    layout: "_Layout | None" = None


@dataclass
class _Plan:
    """Where each visual query's window keys are. v_idx (B, Nv) / v_ok: the visual positions (packed).
    Band kernel (`side` set): every row holds `n_img` complete side x side grids, packed in raster
    order. Otherwise the gather kernel: nb (B, Nv, W) window key positions, nb_ok (B, Nv, W)."""

    v_idx: Tensor
    v_ok: Tensor
    half: int
    causal: bool
    side: int | None = None
    n_img: int = 0
    nb: Tensor | None = None
    nb_ok: Tensor | None = None
    band_ok: Tensor | None = None  # (Nv, band) the band kernel's window mask


@dataclass
class _Layout:
    """One layer's rows, packed per batch row (left-aligned; *_ok marks real entries)."""

    t_idx: Tensor  # (B, Tt) text (and padding) positions
    t_ok: Tensor
    v_idx: Tensor  # (B, Nv) visual positions
    v_ok: Tensor
    plan: _Plan | None  # the window (None = off)


def _window_plan(g: _Grids, index: Tensor, vis: Tensor, half: int, causal: bool, band: bool = True) -> _Plan:
    v_idx, v_ok = _pack(vis)
    b, nv = v_idx.shape
    t0 = g.img.shape[1]
    orig = index.gather(1, v_idx).clamp(max=t0 - 1)  # (B, Nv) prompt index of each visual query
    img, r, c = g.img.gather(1, orig), g.row.gather(1, orig), g.col.gather(1, orig)
    s = g.side
    if band and bool(v_ok.all()) and nv % (s * s) == 0:  # the common case: whole grids of one size, in order
        k = torch.arange(nv, device=vis.device)
        want = torch.stack([k // (s * s), k % (s * s) // s, k % s])[:, None]  # (3, 1, Nv)
        if bool((torch.stack([img, r, c]) == want).all()):
            return _Plan(v_idx, v_ok, half, causal, side=s, n_img=nv // (s * s),
                         band_ok=_band_mask(s, half, causal, vis.device).repeat(nv // (s * s), 1))
    ok = v_ok & (img >= 0)
    img = img.clamp(min=0)
    size = s + 2 * half
    table = torch.full((b, g.n_img, size, size), -1, dtype=torch.long, device=vis.device)
    bi = torch.arange(b, device=vis.device)[:, None].expand(b, nv)
    table[bi[ok], img[ok], r[ok] + half, c[ok] + half] = v_idx[ok]
    d = torch.arange(-half, half + 1, device=vis.device)
    rr = (r + half)[..., None, None] + d[:, None]  # (B, Nv, w, 1)
    cc = (c + half)[..., None, None] + d[None, :]  # (B, Nv, 1, w)
    nb = table[bi[..., None, None], img[..., None, None], rr, cc].reshape(b, nv, -1)  # (B, Nv, W)
    nb_ok = (nb >= 0) & ok[..., None]
    if causal:
        nb_ok &= nb <= v_idx[..., None]
    return _Plan(v_idx, v_ok, half, causal, nb=nb.clamp(min=0), nb_ok=nb_ok)


def _band_mask(side: int, half: int, causal: bool, device) -> Tensor:
    """(side*side, band) bool: which of a query's band keys (grid rows r-half..r+half, every column;
    band = (2*half+1)*side) are in its window (and before it, if causal)."""
    j = torch.arange((2 * half + 1) * side, device=device)
    kr = torch.arange(side, device=device)[:, None, None] + j // side - half  # (side, 1, band) key row
    kc = j % side
    cq = torch.arange(side, device=device)[None, :, None]
    ok = (kr >= 0) & (kr < side) & ((cq - kc).abs() <= half)  # (side, side, band)
    if causal:
        rq = torch.arange(side, device=device)[:, None, None]
        ok &= kr * side + kc <= rq * side + cq
    return ok.reshape(side * side, -1)


# ----------------------------------------------------------------------------- the layer's compute
def _window_attend(q: Tensor, kv_of: Tensor, kt: Tensor, vt: Tensor, mask_vt: Tensor, k: Tensor, v: Tensor,
                   nb: Tensor, nb_ok: Tensor) -> Tensor:
    """Visual queries over [text keys] + [window keys], one softmax.

    q (B, h, Nv, Dh); kv_of (h,) the K/V head of each query head; kt, vt (B, Hkv, Tt, Dh) text keys /
    values, mask_vt (B, 1, Nv, Tt); k, v (B, Hkv, T, Dh) all keys / values, nb (B, Nv, W) window
    positions, nb_ok (B, Nv, W). Returns (B, h, Nv, Dh). One pass per K/V head: its query heads share
    the gathered window keys (no per-query-head copy).
    """
    b, h, nv, dh = q.shape
    w, tt = nb.shape[-1], kt.shape[2]
    scale = dh ** -0.5
    flat = nb.reshape(b, nv * w)
    out = q.new_empty(b, h, nv, dh)
    for g in torch.unique(kv_of).tolist():
        sel = (kv_of == g).nonzero()[:, 0]
        qg = q[:, sel]  # (B, n, Nv, Dh)
        kw = _rows(k[:, g], flat).view(b, nv, w, dh)  # (B, Nv, W, Dh)
        vw = _rows(v[:, g], flat).view(b, nv, w, dh)
        s_t = torch.matmul(qg, kt[:, g, None].transpose(-1, -2)).float() * scale  # (B, n, Nv, Tt)
        s_w = torch.einsum("bhnd,bnwd->bhnw", qg, kw).float() * scale  # (B, n, Nv, W)
        s = torch.cat([s_t.masked_fill(~mask_vt, float("-inf")),
                       s_w.masked_fill(~nb_ok[:, None], float("-inf"))], dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)  # (B, n, Nv, Tt + W)
        out[:, sel] = torch.matmul(p[..., :tt], vt[:, g, None]) + torch.einsum("bhnw,bnwd->bhnd", p[..., tt:], vw)
    return out


def _band_attend(q: Tensor, kv_of: Tensor, kt: Tensor, vt: Tensor, mask_vt: Tensor, kv: Tensor, vv: Tensor,
                 plan: _Plan) -> Tensor:
    """Visual queries over [text keys] + [window keys] when every row holds whole grids in raster order.

    The window keys of the queries of grid row r all lie in grid rows r-half..r+half: a contiguous band
    of (2*half+1)*side visual tokens, taken as a strided view (unfold, no gather); scores are dense
    (side queries x band keys) matmuls, the window's columns (and causality) a fixed mask.
    q (B, h, Nv, Dh); kv, vv (B, Hkv, Nv, Dh) the visual keys/values in the same packed order; kt, vt,
    mask_vt as in `_window_attend`. Returns (B, h, Nv, Dh).
    """
    b, h, nv, dh = q.shape
    s, n_img, half = plan.side, plan.n_img, plan.half
    band, tt = (2 * half + 1) * s, kt.shape[2]
    scale = dh ** -0.5
    ok = plan.band_ok  # (Nv, band)
    out = q.new_empty(b, h, nv, dh)
    for g in torch.unique(kv_of).tolist():
        sel = (kv_of == g).nonzero()[:, 0]
        n = int(sel.numel())
        qg = q[:, sel]  # (B, n, Nv, Dh)
        # (B, n, I, s, s, Dh) -> (B, I, s, n*s, Dh): the n heads' queries of a grid row side by side
        qr = qg.reshape(b, n, n_img, s, s, dh).permute(0, 2, 3, 1, 4, 5).reshape(b, n_img, s, n * s, dh)
        pad = (0, 0, half * s, half * s)
        kb = F.pad(kv[:, g].reshape(b, n_img, s * s, dh), pad).unfold(2, band, s)  # (B, I, s, Dh, band)
        vb = F.pad(vv[:, g].reshape(b, n_img, s * s, dh), pad).unfold(2, band, s)
        s_w = torch.matmul(qr, kb)  # (B, I, s, n*s, band)
        s_w = s_w.reshape(b, n_img, s, n, s, band).permute(0, 3, 1, 2, 4, 5).reshape(b, n, nv, band)
        s_t = torch.matmul(qg, kt[:, g, None].transpose(-1, -2))  # (B, n, Nv, Tt)
        sc = torch.cat([s_t.float().masked_fill(~mask_vt, float("-inf")),
                        s_w.float().masked_fill(~ok, float("-inf"))], dim=-1) * scale
        p = torch.softmax(sc, dim=-1).nan_to_num(0.0).to(q.dtype)  # (B, n, Nv, Tt + band)
        pw = p[..., tt:].reshape(b, n, n_img, s, s, band).permute(0, 2, 3, 1, 4, 5).reshape(b, n_img, s, n * s, band)
        ow = torch.matmul(pw, vb.transpose(-1, -2))  # (B, I, s, n*s, Dh)
        ow = ow.reshape(b, n_img, s, n, s, dh).permute(0, 3, 1, 2, 4, 5).reshape(b, n, nv, dh)
        out[:, sel] = torch.matmul(p[..., :tt], vt[:, g, None]) + ow
    return out


def _heads_rows_of(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, H, T, Dh), idx (B, K) -> (B, H, K, Dh)."""
    return _rows(x.transpose(1, 2), idx).transpose(1, 2)


def _merge_rows(t: int, parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Rows (B, K_i, ...) at positions idx_i (B, K_i) with validity ok_i -> (B, t, ...); every position
    is covered exactly once (slot t is a sink for the packing's padding slots)."""
    x0 = parts[0][0]
    out = x0.new_empty((x0.shape[0], t + 1) + x0.shape[2:])
    bi = torch.arange(x0.shape[0], device=x0.device)[:, None]
    for x, idx, ok in parts:
        out[bi, torch.where(ok, idx, t)] = x
    return out[:, :t]


def _prefill_layer(block, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache, layer: int, lay: _Layout,
                   act: Tensor | None, ratio: int) -> Tensor:
    """One decoder layer with text rows computed normally and visual rows through YOPO's reduced path.

    h (B, T, D); mask (B, 1, T, T) bool; lay: the text / visual rows and the window plan; act (Ha,)
    active query heads (None = all). Returns (B, T, D).
    With every head active the projections and o_proj run once over all rows (one matmul each); only
    the attention of the visual queries and the visual rows' MLP are reduced.
    """
    attn = block.self_attn
    b, t, _ = h.shape
    nh, nkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rep = nh // nkv
    dev = h.device
    kv_of_all = torch.arange(nh, device=dev) // rep
    t_idx, t_ok, v_idx, v_ok, plan = lay.t_idx, lay.t_ok, lay.v_idx, lay.v_ok, lay.plan
    nv, tt = v_idx.shape[1], t_idx.shape[1]
    x = block.input_layernorm(h)  # (B, T, D)

    if act is None:  # every head active: one q/k/v projection over all rows
        q, k_all, v_all = attn.qkv(x, cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh) x2
        qt, qv = _heads_rows_of(q, t_idx), _heads_rows_of(q, v_idx)
        kt, vt = _heads_rows_of(k_all, t_idx), _heads_rows_of(v_all, t_idx)  # (B, Hkv, Tt, Dh)
        kvv, vvv = _heads_rows_of(k_all, v_idx), _heads_rows_of(v_all, v_idx)  # (B, Hkv, Nv, Dh)
    else:  # text rows in full; visual rows for the active heads / the K/V heads they read
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        xt, xv = _rows(x, t_idx), _rows(x, v_idx)  # (B, Tt, D), (B, Nv, D)
        cv, sv = _rows(cos, v_idx), _rows(sin, v_idx)
        qt, kt, vt = attn.qkv(xt, _rows(cos, t_idx), _rows(sin, t_idx))  # (B, H, Tt, Dh), (B, Hkv, Tt, Dh) x2
        qv = apply_rope(_proj(attn.q_proj, xv, act, dh), cv, sv)  # (B, Ha, Nv, Dh)
        need = torch.unique(act // rep)  # K/V heads some active head reads
        if need.numel() == nkv:
            kvv = apply_rope(_proj(attn.k_proj, xv, None, dh), cv, sv)  # (B, Hkv, Nv, Dh)
            vvv = _proj(attn.v_proj, xv, None, dh)
        else:  # the others are never read: zeros in the cache
            kvv, vvv = xv.new_zeros(b, nkv, nv, dh), xv.new_zeros(b, nkv, nv, dh)
            if need.numel():
                kvv[:, need] = apply_rope(_proj(attn.k_proj, xv, need, dh), cv, sv)
                vvv[:, need] = _proj(attn.v_proj, xv, need, dh)
        k_all = _merge_rows(t, [(kt.transpose(1, 2), t_idx, t_ok), (kvv.transpose(1, 2), v_idx, v_ok)]).transpose(1, 2)
        v_all = _merge_rows(t, [(vt.transpose(1, 2), t_idx, t_ok), (vvv.transpose(1, 2), v_idx, v_ok)]).transpose(1, 2)
    if cache is not None:
        cache.update(layer, k_all, v_all)  # the prefill's cache holds exactly these T entries

    # text queries: active heads over every key, inactive heads over the text keys only
    all_keys = torch.arange(t, device=dev).expand(b, t)
    mask_t = _block(mask, t_idx, all_keys)  # (B, 1, Tt, T)
    if act is None:
        out_t = sdpa(qt, k_all, v_all, mask_t)  # (B, H, Tt, Dh)
    else:
        mask_tt = _block(mask, t_idx, t_idx) & t_ok[:, None, None, :]
        mask_tt = mask_tt | ~t_ok[:, None, :, None]  # padding slots of the packing attend anything
        out_t = _text_queries(qt, act, kv_of_all, k_all, v_all, mask_t, kt, vt, mask_tt)

    # visual queries (active heads only)
    kv_act = kv_of_all if act is None else kv_of_all[act]
    ha = nh if act is None else int(act.numel())
    if ha == 0:
        out_v = None
    elif plan is None:
        mask_v = _block(mask, v_idx, all_keys)  # (B, 1, Nv, T)
        out_v = _attend(qv, k_all, v_all, None if act is None else kv_act, mask_v)
    else:
        mask_vt = _block(mask, v_idx, t_idx) & t_ok[:, None, None, :]  # (B, 1, Nv, Tt)
        if plan.side is not None:
            out_v = _band_attend(qv, kv_act, kt, vt, mask_vt, kvv, vvv, plan)  # (B, Ha, Nv, Dh)
        else:
            out_v = _window_attend(qv, kv_act, kt, vt, mask_vt, k_all, v_all, plan.nb, plan.nb_ok)

    o = attn.o_proj
    out_t = out_t.transpose(1, 2).reshape(b, tt, nh * dh)
    if act is None:  # one o_proj over all rows
        h = h + o(_merge_rows(t, [(out_t, t_idx, t_ok), (out_v.transpose(1, 2).reshape(b, nv, nh * dh), v_idx, v_ok)]))
        if ratio == 1:
            return h + block.mlp(block.post_attention_layernorm(h))
        ht, hv = _rows(h, t_idx), _rows(h, v_idx)
    else:  # text rows over every head, visual rows over the active heads' columns only
        ht = _rows(h, t_idx) + o(out_t)
        if out_v is None:
            av = h.new_zeros(b, nv, o.out_features) + (0 if o.bias is None else o.bias)
        else:
            w = o.weight.index_select(1, (act[:, None] * dh + torch.arange(dh, device=dev)).reshape(-1))
            av = F.linear(out_v.transpose(1, 2).reshape(b, nv, ha * dh), w, o.bias)
        hv = _rows(h, v_idx) + av

    # MLP: text rows full, visual rows on I/ratio channels
    ht = ht + block.mlp(block.post_attention_layernorm(ht))
    hv = hv + _sparse_mlp(block.mlp, block.post_attention_layernorm(hv), ratio)
    return _merge_rows(t, [(ht, t_idx, t_ok), (hv, v_idx, v_ok)])


def _text_queries(q: Tensor, act: Tensor, kv_of_all: Tensor, k_all: Tensor, v_all: Tensor, mask_all: Tensor,
                  kt: Tensor, vt: Tensor, mask_text: Tensor) -> Tensor:
    """Text queries q (B, H, R, Dh) with some heads inactive: the active heads `act` attend every key
    (k_all/v_all, mask_all), the inactive ones the text keys only (kt/vt (B, Hkv, Tt, Dh), mask_text).
    Used by prefill (the text rows) and decode (the new positions). Returns (B, H, R, Dh)."""
    nh = q.shape[1]
    inactive = torch.ones(nh, dtype=torch.bool, device=q.device)
    inactive[act] = False
    ina = inactive.nonzero()[:, 0]
    out = q.new_empty(q.shape[0], nh, q.shape[2], v_all.shape[-1])
    if act.numel():
        out[:, act] = _attend(q[:, act], k_all, v_all, kv_of_all[act], mask_all)
    out[:, ina] = _attend(q[:, ina], kt, vt, kv_of_all[ina], mask_text)
    return out


def _decode_layer(block, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache, layer: int,
                  vis_prefill: Tensor, act: Tensor) -> Tensor:
    """Decode through a layer with inactive heads: those attend the cached text entries only.

    h (B, t, D) new (text) positions; vis_prefill (B, L) which of the prefill's cached entries are visual.
    """
    attn = block.self_attn
    b, t, _ = h.shape
    nh, nkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    dev = h.device
    kv_of_all = torch.arange(nh, device=dev) // (nh // nkv)
    x = block.input_layernorm(h)
    q, k, v = attn.qkv(x, cos, sin)  # (B, H, t, Dh), (B, Hkv, t, Dh) x2
    if cache is None:
        raise RuntimeError("yopo: decode without a KV cache")
    k_all, v_all = cache.update(layer, k, v)  # (B, Hkv, S, Dh)
    s = k_all.shape[2]
    if mask is None:
        mask = torch.ones(b, 1, t, s, dtype=torch.bool, device=dev)
    mask = mask.expand(b, 1, t, s)
    vis = torch.cat([vis_prefill, vis_prefill.new_zeros(b, s - vis_prefill.shape[1])], dim=1)  # (B, S)
    t_idx, t_ok = _pack(~vis)  # (B, St) the cached text entries
    kt = _rows(k_all.transpose(1, 2), t_idx).transpose(1, 2)  # (B, Hkv, St, Dh)
    vt = _rows(v_all.transpose(1, 2), t_idx).transpose(1, 2)
    m = mask.gather(3, t_idx[:, None, None, :].expand(b, 1, t, t_idx.shape[1])) & t_ok[:, None, None, :]
    out = _text_queries(q, act, kv_of_all, k_all, v_all, mask, kt, vt, m)
    x = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, nh * dh))
    return x + block.mlp(block.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- calibration
class _RhoProbe:
    """A layer hook that changes nothing and records, per layer, rho = attention mass on V / attention
    mass on text of the text queries after the first visual token, per query head."""

    kind = "layer"
    needs = frozenset({"attention_rows"})
    kv_safe = True
    batch_safe = True

    def __init__(self) -> None:
        self.rho: dict[int, Tensor] = {}  # layer -> (B, H)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return ()

    def keep(self, state: LayerState) -> None:
        return None

    def visual_schedule(self, num_layers: int, num_visual: int) -> list[int]:
        return [num_visual] * num_layers

    def block_forward(self, layer, block, h, cos, sin, mask, cache, state, run):
        if state.index is None:
            return None
        vis, km = state.visual, state.key_mask  # (B, T)
        b, t = vis.shape
        rows, ok = _pack(~vis & km & (vis.long().cumsum(1) > 0))  # (B, R) text queries after the image
        q, k, _ = block.self_attn.qkv(block.input_layernorm(h), cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        if mask is None:
            mask = causal_padding_mask(km, t)
        q_rows = q.gather(2, rows[:, None, :, None].expand(b, q.shape[1], rows.shape[1], q.shape[-1]))
        m_rows = mask.gather(2, rows[:, None, :, None].expand(b, 1, rows.shape[1], t))
        p = attention_rows(q_rows, k, m_rows) * ok[:, None, :, None]  # (B, H, R, T) fp32
        on_v = (p * vis[:, None, None, :]).sum((2, 3))
        on_t = (p * (~vis & km)[:, None, None, :]).sum((2, 3))
        self.rho[layer] = on_v / on_t.clamp_min(1e-12)  # (B, H)
        return None


def _samples(samples: Iterable[Any], n: int):
    for i, s in enumerate(samples):
        if i >= n:
            return
        if isinstance(s, Mapping):
            prompt, image = s.get("prompt"), s.get("image")
        else:
            try:
                prompt, image = s
            except (TypeError, ValueError):
                raise InputError(f"yopo.calibrate: a sample is a (prompt, image) pair or "
                                 f"{{'prompt': ..., 'image': ...}}, got {type(s).__name__}") from None
        if not isinstance(prompt, str) or image is None:
            raise InputError(f"yopo.calibrate: sample {i} needs a text prompt and an image")
        yield prompt, image


@torch.inference_mode()
def calibrate(vlm, samples: Iterable[Any], tau: float = 0.1, n: int = 100) -> dict[str, Any]:
    """Visually active heads of `vlm`'s LM from up to `n` (prompt, image) samples.

    Per sample, layer and query head: rho = attention mass on the visual tokens / attention mass on
    the text tokens, summed over the text queries after the image (recomputed attention rows of the
    uncompressed model). A head is active where rho > tau in more than half of the samples.
    Returns a JSON-ready dict (`save_heads` writes it; `yopo:heads=<file>` reads it).
    """
    from ..compression.runner import LMRun

    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise InputError(f"yopo.calibrate: tau must be a number >= 0, got {tau!r}")
    n = _int("n", n, 1)
    model, lm = vlm.model, vlm.model.language_model
    cfg = lm.config
    num_layers, nh = lm.num_layers, cfg.num_attention_heads
    votes = torch.zeros(num_layers, nh, dtype=torch.long)
    rho_sum = torch.zeros(num_layers, nh, dtype=torch.float64)
    used = 0
    dev = vlm.device
    for prompt, image in _samples(samples, n):
        inputs = vlm.processor(text=[vlm.build_prompt(prompt, [image])], images=[image])
        ids, am = inputs["input_ids"].to(dev), inputs["attention_mask"].to(dev)
        embeds = model.embed_inputs(ids, inputs["pixel_values"].to(dev), inputs.get("image_sizes"))
        visual = ids == model.config.image_token_id
        probe = _RhoProbe()
        lm(embeds, am, None, None, run=LMRun([probe], [], visual, am))
        rho = torch.stack([probe.rho[l][0] for l in range(num_layers)]).double().cpu()  # (L, H)
        votes += (rho > tau).long()
        rho_sum += rho
        used += 1
    if not used:
        raise InputError("yopo.calibrate: no samples given")
    active = votes * 2 > used
    return {"format": HEADS_FORMAT, "tau": float(tau), "num_samples": used, "num_layers": num_layers,
            "num_heads": nh, "num_kv_heads": cfg.num_key_value_heads,
            "gqa": "per query head; K/V head g serves query heads g*n_rep..(g+1)*n_rep-1",
            "active": active.tolist(), "rho_mean": (rho_sum / used).tolist()}


def save_heads(table: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a calibration dict as JSON atomically (temp file in the same folder + os.replace)."""
    _check_table(table, "table")
    return atomic_write_text(path, json.dumps(dict(table), indent=1))


def load_heads(path: str | os.PathLike) -> dict[str, Any]:
    """Read a calibration JSON written by `save_heads` (checked)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"yopo: heads file {str(p)!r} not found; write one with "
                         f"llavakit.llm_hooks.yopo.save_heads(calibrate(vlm, samples), path)")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"yopo: heads file {str(p)!r} is not valid JSON: {e}") from None
    _check_table(data, str(p))
    return data


def _check_table(data: Any, where: str) -> Tensor:
    """A calibration dict -> (L, H) bool tensor of active heads; InputError if malformed."""
    act = data.get("active") if isinstance(data, Mapping) else None
    if (not isinstance(act, list) or not act or not all(isinstance(r, list) and r for r in act)
            or len({len(r) for r in act}) != 1 or not all(isinstance(x, bool) for r in act for x in r)):
        raise InputError(f"yopo: {where} must hold 'active': a list (one per layer) of equal-length lists "
                         f"of true/false (one per query head)")
    return torch.tensor(act, dtype=torch.bool)
