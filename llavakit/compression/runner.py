"""`LMRun`: one generation's in-LLM (H5) and KV-cache (H6) state, and the LM loop that applies them.

`LlamaLM.forward(..., run=run)` hands its layer loop to `run.forward`. What it does (our design):
- Prefill (or a full recompute without a KV cache): before each layer a `LayerHook` prunes at, the hook
  scores the positions (`LayerHook.keep`), visual positions it drops leave the hidden states, the
  position ids (original ids are kept, FastV / Dynamic-LLaVA style), the mask and this layer's and all
  later layers' KV cache. Rows may keep different numbers of tokens: each row's survivors are packed
  to the right, padding slots on the left are masked (left padding, as the engine uses).
- Decisions are taken on the first prefill over the prompt positions and reused by every later full
  recompute (generation without a cache), so cached and uncached generation give the same tokens.
- Decode: each layer attends its own cached keys (fewer after pruning) with its own mask.
- After prefill, `KVPolicy.evict` may drop cached visual entries of any layer.
- Attention rows (which SDPA never returns) are recomputed from the layer's q/k for the rows asked.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..layers.attention import attention_rows, causal_padding_mask
from ..layers.rope import default_position_ids
from .base import LayerState


class LMRun:
    def __init__(self, layer_hooks: Sequence[Any], kv_policies: Sequence[Any], visual: Tensor,
                 attention_mask: Tensor | None, image_side: int | None = None) -> None:
        self.layer_hooks = list(layer_hooks)
        self.kv_policies = list(kv_policies)
        self.visual = visual.bool()  # (B, T0) visual positions of the prompt
        b, t0 = visual.shape
        self.prompt_mask = (attention_mask.bool() if attention_mask is not None
                            else torch.ones(b, t0, dtype=torch.bool, device=visual.device))
        self.num_visual = (self.visual & self.prompt_mask).sum(1)  # (B,) visual tokens per prompt row
        self.image_side = image_side  # each image's patch-grid side when known (Compression.image_side)
        self.decisions: dict[int, Tensor] = {}  # layer -> (B, T0) bool keep over prompt positions
        self.layer_masks: list[Tensor] = []  # per layer: (B, L) key mask of the prefill's cached entries
        self.layer_visual: list[Tensor] = []  # per layer: (B, L) which cached entries are visual
        self.kept: dict[int, Tensor] = {}  # layer -> (B,) visual tokens kept entering it (for reports)
        self._prune_at: dict[int, Any] | None = None

    def prune_at(self, num_layers: int) -> dict[int, Any]:
        if self._prune_at is None:
            self._prune_at = {l: h for h in self.layer_hooks for l in h.prune_layers(num_layers)}
        return self._prune_at

    # ------------------------------------------------------------------ the loop
    def forward(self, lm, x: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache) -> Tensor:
        b, t, _ = x.shape
        past = cache.seq_len() if cache is not None else 0
        if b != self.visual.shape[0]:
            raise InputError(f"this compression run was prepared for batch {self.visual.shape[0]}, got {b}")
        if past:
            return self._decode(lm, x, position_ids, cache)
        t0 = self.visual.shape[1]
        if t < t0:
            raise InputError(f"a compressed prefill needs the whole prompt ({t0} positions), got {t}")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, t, 0, x.device)
        pos = position_ids.expand(b, t)
        km = attention_mask.bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        visual = torch.cat([self.visual, self.visual.new_zeros(b, t - t0)], dim=1)
        index = torch.arange(t, device=x.device).expand(b, t)
        prune_at = self.prune_at(lm.num_layers)
        extra = dict(num_layers=lm.num_layers, num_visual=self.num_visual)
        first = not self.decisions and not self.layer_masks
        h, prev = x, None
        masks, vis_per_layer = [], []
        record = cache is not None and bool(self.kv_policies)  # eviction scores each layer's own attention
        inputs: list[tuple[Tensor, Tensor]] = []  # per layer: (hidden, position ids) entering it
        for i, block in enumerate(lm.layers):
            if i in prune_at:
                if first:
                    state = LayerState(i, h, pos, km, visual, index,
                                       None if prev is None else _rows_fn(lm, i - 1, *prev), **extra)
                    keep = prune_at[i].keep(state)
                    keep = torch.ones_like(km) if keep is None else keep.bool()
                    if keep.shape != km.shape:
                        raise RuntimeError(f"{type(prune_at[i]).__name__}.keep returned {tuple(keep.shape)}, "
                                           f"expected {tuple(km.shape)}")
                    dec = torch.ones(b, t0, dtype=torch.bool, device=x.device)
                    inprompt = index < t0
                    dec[inprompt.nonzero(as_tuple=True)[0], index[inprompt]] = keep[inprompt]
                    self.decisions[i] = dec
                else:
                    dec = self.decisions[i]
                    keep = torch.where(index < t0, dec.gather(1, index.clamp(max=t0 - 1)), True)
                keep = (keep | ~visual) & km
                self.kept[i] = (keep & visual).sum(1)
                h, pos, km, visual, index = _compact(keep, h, pos, km, visual, index)
            cos, sin = lm.rotary(pos, h.dtype)
            mask = causal_padding_mask(km, h.shape[1])  # (B, 1, T, T)
            prev = (h, pos, km)
            if record:
                inputs.append((h, pos))
            out = None
            for hook in self.layer_hooks:
                fn = getattr(hook, "block_forward", None)
                if fn is not None:
                    out = fn(i, block, h, cos, sin, mask, cache,
                             LayerState(i, h, pos, km, visual, index, None, **extra), self)
                    if out is not None:
                        break
            h = block(h, cos, sin, mask, False, cache, i) if out is None else out
            masks.append(km)
            vis_per_layer.append(visual)
        if first or cache is not None:
            self.layer_masks, self.layer_visual = masks, vis_per_layer
        if record:
            self._evict(lm, cache, inputs)
        return lm.model.norm(h)

    def _decode(self, lm, x: Tensor, position_ids: Tensor | None, cache) -> Tensor:
        b, t, _ = x.shape
        if position_ids is None:
            raise InputError("decoding with compression needs explicit position_ids")
        cos, sin = lm.rotary(position_ids, x.dtype)
        h = x
        for i, block in enumerate(lm.layers):
            base = self.layer_masks[i]
            extra = cache.seq_len(i) + t - base.shape[1]
            km = torch.cat([base, base.new_ones(b, extra)], dim=1)  # (B, S_i)
            mask = km[:, None, None, :] if t == 1 else causal_padding_mask(km, t)
            out = None
            for hook in self.layer_hooks:
                fn = getattr(hook, "block_forward", None)
                if fn is not None:
                    vis = torch.zeros(b, t, dtype=torch.bool, device=x.device)
                    out = fn(i, block, h, cos, sin, mask, cache,
                             LayerState(i, h, position_ids.expand(b, t), km[:, -t:], vis, None, None,
                                        lm.num_layers), self)
                    if out is not None:
                        break
            h = block(h, cos, sin, mask, False, cache, i) if out is None else out
        return lm.model.norm(h)

    def _evict(self, lm, cache, inputs: list[tuple[Tensor, Tensor]]) -> None:
        """Apply the KV policies after a cached prefill. `inputs[i]`: (hidden, position ids) entering
        layer i, whose positions are exactly layer i's cached entries; the LayerState's
        `attention_rows` recomputes layer i's OWN attention over them (after any earlier policy's
        eviction). Generation without a cache never evicts."""
        for i in range(lm.num_layers):
            km, vis = self.layer_masks[i], self.layer_visual[i]
            h, pos = inputs[i]
            for policy in self.kv_policies:
                state = LayerState(i, h, pos, km, vis, None, _rows_fn(lm, i, h, pos, km), lm.num_layers,
                                   self.num_visual)
                keep = policy.evict(i, state)
                if keep is None:
                    continue
                keep = (keep.bool() | ~vis) & km
                idx, valid = _pack_index(keep)
                cache.compact(i, idx)
                h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
                pos = pos.gather(1, idx)
                km = valid & km.gather(1, idx)
                vis = valid & vis.gather(1, idx)
            self.layer_masks[i], self.layer_visual[i] = km, vis
            inputs[i] = None  # type: ignore[call-overload]  (free the hidden states as we go)


def _pack_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """keep (B, T) bool -> gather index (B, T') and validity (B, T'): each row's kept positions in
    order, right-aligned (padding slots first, pointing at position 0)."""
    b, t = keep.shape
    counts = keep.sum(1)  # (B,)
    width = int(counts.max()) if b else 0
    slot = (width - counts)[:, None] + keep.long().cumsum(1) - 1  # (B, T) target slot of a kept position
    idx = torch.zeros(b, width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    idx[rows, slot[rows, cols]] = cols
    valid[rows, slot[rows, cols]] = True
    return idx, valid


def _compact(keep: Tensor, h: Tensor, pos: Tensor, km: Tensor, visual: Tensor, index: Tensor):
    idx, valid = _pack_index(keep)
    h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
    return h, pos.gather(1, idx), valid, visual.gather(1, idx) & valid, index.gather(1, idx)


def _rows_fn(lm, layer: int, h_in: Tensor, pos: Tensor, km: Tensor):
    """rows (B, R) -> (B, H, R, T) fp32 attention probabilities of `layer` for those query positions."""

    def rows_fn(rows: Tensor) -> Tensor:
        block = lm.layers[layer]
        cos, sin = lm.rotary(pos, h_in.dtype)
        q, k, _ = block.self_attn.qkv(block.input_layernorm(h_in), cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        mask = causal_padding_mask(km, h_in.shape[1])  # (B, 1, T, T)
        r = rows.long()
        q_rows = q.gather(2, r[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))  # (B, H, R, Dh)
        m_rows = mask.gather(2, r[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))  # (B, 1, R, T)
        return attention_rows(q_rows, k, m_rows)

    return rows_fn
