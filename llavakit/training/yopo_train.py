"""YOPO fine-tuning: the LM forward of training with YOPO's pruning on, in masked form.

Zhang et al. 2024, "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See"
(arXiv 2410.06169). The paper keeps accuracy by fine-tuning LLaVA with the pruning applied (its
released checkpoints); training-free, YOPO keeps 24-83 % of our default model's world score. This
module lets a recipe train with a YOPO spec on (`yopo: "yopo:window=5:ffn_ratio=3:layercut=24"`,
recipes/default-yopo2.yaml), so the model learns the network it will run as at inference, where
`llavakit/llm_hooks/yopo.py` skips the pruned work. Measured (docs/compression/README.md, "YOPO
fine-tuned"): that spec skips 61 % of the LM's visual compute and, after 300 steps, loses 0-1 point
on easy-vqa and world colour / shape, 2.5 on world count and 4.5 on world position (1,000 items).

Training runs the same function as inference, written with masks and zeros so that it is
differentiable, works through peft's LoRA layers and with the packed block masks of `packing.py`:
- (a) window: the V x V block of each layer's mask becomes the w x w neighbourhood on the patch grid
  (bidirectional unless `bidirectional=false`); text <-> vision entries are left as they are.
- (b) inactive heads: a per-head mask hides the visual keys from the inactive query heads (before the
  softmax: our inference's renormalised form, not the reference's zeroing after it) and their outputs
  on visual rows are zeroed before o_proj.
- (c) ffn_ratio r: on visual rows, the intermediate channels from I/r on are zeroed (gate and up), as
  slicing the weights does.
- (d) layercut L: from layer L on the visual rows are removed (gathered out, as the runner's pruning
  does; this also saves their compute in training), so text sees no visual key there.
(a)-(c) act in layers `start` .. L-1 (`YOPO.applies`). The parity test (tests/unit/test_yopo_train.py)
checks this forward against the inference hook's hidden states.

Ours: inactive heads renormalised over the keys they keep (as our inference hook; the reference
zeroes after the softmax); the visual rows gathered out at the layer cut rather than masked; LoRA on
the LM as what trains (the recipe's choice); the requirement that every row's visual tokens form
whole side x side grids in raster order (one image per packed sequence in our training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..layers.attention import sdpa
from ..llm_hooks.yopo import YOPO, _block, _grids, _pack, _rows


def parse_yopo(spec: str) -> YOPO:
    """A one-method compression spec naming yopo -> its hook (a clear error for anything else)."""
    from ..compression import Compression

    return Compression.single(spec, YOPO, "yopo", "yopo", "yopo:window=5:ffn_ratio=2")


def grid_coords(visual: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor]:
    """visual (B, T) bool -> image number, row, col (B, T) long of every visual position (-1 elsewhere),
    as the inference hook places them (`yopo._grids`: each run of visual tokens cut into side x side
    images in raster order; a run that is not whole grids is refused)."""
    g = _grids(visual, side)
    text = g.img < 0
    return g.img, g.row.masked_fill(text, -1), g.col.masked_fill(text, -1)


@dataclass(frozen=True)
class YopoTraining:
    """The masked YOPO forward of one model: `hook` holds the spec, `side` the patch-grid side."""

    hook: YOPO
    side: int

    def window_mask(self, visual: Tensor, base: Tensor) -> Tensor:
        """(B, 1, T, T): `base` with its V x V block replaced by the w x w window."""
        if not self.hook.window:
            return base
        img, r, c = grid_coords(visual, self.hook.grid or self.side)
        half = (self.hook.window - 1) // 2
        near = ((img[:, :, None] == img[:, None, :])
                & ((r[:, :, None] - r[:, None, :]).abs() <= half)
                & ((c[:, :, None] - c[:, None, :]).abs() <= half))  # (B, T, T)
        if not self.hook.bidirectional:
            near = near & base[:, 0]
        vv = visual[:, :, None] & visual[:, None, :]  # (B, T, T)
        return torch.where(vv[:, None], near[:, None], base)

    def forward(self, lm, emb: Tensor, mask: Tensor, position_ids: Tensor, visual: Tensor) -> Tensor:
        """emb (B, T, D), mask bool (B, 1, T, T), position_ids (B, T), visual (B, T) bool -> hidden after
        the final norm (B, T, D); visual rows removed at layercut come back as zeros (no label sits there)."""
        layers = lm.layers
        heads = self.hook.active_heads(len(layers), layers[0].self_attn.num_heads)  # (L, H) or None
        b, t, _ = emb.shape
        cos, sin = lm.rotary(position_ids, emb.dtype)  # (B, T, Dh)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        windowed = self.window_mask(visual, mask)
        h, vis, keep = emb, visual, None
        for i, block in enumerate(layers):
            if self.hook.layercut is not None and i == self.hook.layercut:
                h, cos, sin, mask, keep = _drop_visual(h, cos, sin, mask, vis)
                vis = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
            if keep is not None or not self.hook.applies(i):
                h = block(h, cos, sin, mask, False, None, i)
                continue
            off = None if heads is None or bool(heads[i].all()) else ~heads[i].to(h.device)  # (H,) inactive
            h = _layer(block, h, cos, sin, windowed, vis, off, self.hook.ffn_ratio)
        h = lm.model.norm(h)
        if keep is None:
            return h
        out = h.new_zeros(b, t, h.shape[-1])
        out[torch.arange(b, device=h.device)[:, None], keep] = h
        return out


def _drop_visual(h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, vis: Tensor):
    """Keep each row's text positions only (every row holds the same number of visual tokens)."""
    keep, ok = _pack(~vis)  # (B, K) text positions in order
    if not bool(ok.all()):
        raise InputError(f"yopo layercut in training needs the same visual count per sequence, got "
                         f"{vis.sum(1).tolist()}")
    return _rows(h, keep), _rows(cos, keep), _rows(sin, keep), _block(mask, keep, keep), keep


def _layer(block, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, vis: Tensor, off: Tensor | None,
           ratio: int, probe: dict | None = None) -> Tensor:
    """One decoder layer with (a)-(c) as masks: mask (B, 1, T, T) already windowed; off (H,) bool inactive
    query heads, or None when every head is active. `probe` (a dict) receives the layer's detached "q" and
    "k" (schedule_train.py ranks tokens by them)."""
    attn, mlp = block.self_attn, block.mlp
    b, t, _ = h.shape
    q, k, v = attn.qkv(block.input_layernorm(h), cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh) x2
    if probe is not None:
        probe["q"], probe["k"] = q.detach(), k.detach()
    if off is not None:
        eye = torch.eye(t, dtype=torch.bool, device=h.device)
        hide = vis[:, None, :] & ~eye  # (B, T, T): visual keys, except each row's own (no empty row)
        mask = mask & ~(off[None, :, None, None] & hide[:, None])  # (B, H, T, T)
    out = sdpa(q, k, v, mask)  # (B, H, T, Dh)
    if off is not None:
        out = out * ~(off[None, :, None, None] & vis[:, None, :, None])  # inactive heads: 0 on V rows
    x = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    y = block.post_attention_layernorm(x)
    g, u = mlp.gate_proj(y), mlp.up_proj(y)  # (B, T, I)
    if ratio > 1:  # Trainer._yopo checked that I // ratio >= 1
        i = g.shape[-1] // ratio
        cut = vis[..., None] & (torch.arange(g.shape[-1], device=g.device) >= i)  # (B, T, I)
        g, u = g.masked_fill(cut, 0.0), u.masked_fill(cut, 0.0)
    return x + mlp.down_proj(mlp.act(g) * u)
