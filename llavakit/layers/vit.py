"""Building blocks shared by the ViT vision towers (CLIP, SigLIP, DINOv2).

Sources: ViT (Dosovitskiy et al., 2021, arXiv:2010.11929) pre-norm encoder blocks, written to hold
the same parameter names as transformers 5.x `CLIPEncoderLayer` / `SiglipEncoderLayer` so that a
transformers `state_dict` loads strictly.

Our choices:
- Attention always runs through `llavakit.layers.attention.sdpa`. Attention probabilities are never
  materialised for the whole map: a caller asks for a few query rows (e.g. the CLS row) and
  `run_encoder` recomputes them with `attention_rows` from the q/k that layer used (fp32 result).
- `run_encoder` stops after the deepest layer anybody asked for (LLaVA's layer -2 skips the last
  layer), and indexes hidden states like transformers' `output_hidden_states` (0 = embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .attention import attention_rows, sdpa

Rows = slice | Tensor | Sequence[int]


def _quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU (transformers `QuickGELUActivation`)."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    """Tanh approximation of GELU (transformers `gelu_pytorch_tanh`, SigLIP)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,  # exact erf GELU (DINOv2; transformers `GELUActivation`)
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called `name` (transformers' `hidden_act` names); exact match."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"unknown hidden_act {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}") from None


@dataclass
class VisionOutput:
    """What a vision tower returns.

    hidden_states: one (B, T, D) tensor per requested layer index, in the order requested (no final
        layer norm applied). T includes the CLS token where the family has one.
    attentions: {key of `attention_rows`: (B, heads, R, T)} fp32 probabilities of the requested
        query rows in that encoder layer.
    """

    hidden_states: list[Tensor] = field(default_factory=list)
    attentions: dict[int, Tensor] = field(default_factory=dict)


class Attention(nn.Module):
    """Multi-head self-attention with q_proj/k_proj/v_proj and an output projection named `out_name`
    (`out_proj` in CLIP/SigLIP, `o_proj` in transformers 5.x DINOv2)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, out_name: str = "out_proj") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_name = out_name
        self.add_module(out_name, nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, T, D) -> (output (B, T, D), (q, k) each (B, H, T, Dh))."""
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        out = sdpa(q, k, v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return getattr(self, self.out_name)(out), (q, k)


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (transformers `CLIPMLP` / `SiglipMLP` / `Dinov2MLP` names)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = get_activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, D)


class PreNormLayer(nn.Module):
    """CLIP/SigLIP encoder layer: x + attn(ln1(x)), then + mlp(ln2(.)).

    Returns the new hidden state and the (q, k) the attention used (for `attention_rows`).
    """

    def __init__(self, dim: int, intermediate: int, num_heads: int, eps: float, act: str, qkv_bias: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, out_name="out_proj")
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, act)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn, qk = self.self_attn(self.layer_norm1(x))
        x = x + attn  # (B, T, D)
        x = x + self.mlp(self.layer_norm2(x))  # (B, T, D)
        return x, qk


def resolve_hidden_index(index: int, num_layers: int) -> int:
    """transformers' `output_hidden_states` index (0 = embeddings, negatives from the end) -> 0..L."""
    n = num_layers + 1
    if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
        raise InputError(f"vision layer index {index!r} out of range; valid: integers in [{-n}, {n - 1}] "
                         f"({num_layers} encoder layers, index 0 = embeddings)")
    return index % n


def resolve_layer_number(index: int, num_layers: int) -> int:
    """Encoder-layer number for `attention_rows` (0-based, negatives from the end) -> 0..L-1."""
    if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
        raise InputError(f"attention_rows layer {index!r} out of range; valid: integers in "
                         f"[{-num_layers}, {num_layers - 1}] (encoder layer numbers, 0-based)")
    return index % num_layers


def select_rows(q: Tensor, rows: Rows) -> Tensor:
    """q: (B, H, T, Dh) -> (B, H, R, Dh) for rows given as a slice or a 1-D sequence of token indices."""
    if isinstance(rows, slice):
        return q[:, :, rows]
    idx = torch.as_tensor(rows, device=q.device)
    t = q.shape[2]
    if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point():
        raise InputError("attention rows must be a slice or a 1-D integer tensor/sequence of token indices")
    if idx.numel() and (int(idx.min()) < -t or int(idx.max()) >= t):
        raise InputError(f"attention rows {idx.tolist()} out of range for {t} tokens")
    return q.index_select(2, idx % t)


def run_encoder(layers: Sequence[nn.Module], x: Tensor, wanted: Sequence[int],
                rows: Mapping[int, Rows] | None = None) -> VisionOutput:
    """Run encoder `layers` on embeddings x (B, T, D), only as deep as needed.

    wanted: hidden-state indices as in transformers' `output_hidden_states` (0 = x, i = output of
    layer i, negatives from the end). rows: {layer number: query rows} — layer l's attention, whose
    input is hidden state l. Each layer must return (hidden, (q, k)).
    """
    n = len(layers)
    want = [resolve_hidden_index(i, n) for i in wanted]
    by_layer: dict[int, list[tuple[int, Rows]]] = {}
    for key, r in (rows or {}).items():
        by_layer.setdefault(resolve_layer_number(key, n), []).append((key, r))
    stop = max([*want, *(l + 1 for l in by_layer)], default=0)

    states: dict[int, Tensor] = {0: x}
    attentions: dict[int, Tensor] = {}
    for l in range(stop):
        x, (q, k) = layers[l](x)
        for key, r in by_layer.get(l, ()):
            attentions[key] = attention_rows(select_rows(q, r), k)  # (B, H, R, T)
        if l + 1 in want:
            states[l + 1] = x
    return VisionOutput(hidden_states=[states[i] for i in want], attentions=attentions)


class ViTTower(nn.Module):
    """What every vision tower shares: patch counting and the native-size input check."""

    has_cls: bool = True
    config: "object"

    def num_patches(self, height: int, width: int) -> int:
        """Patch tokens (CLS excluded) for an image of height x width pixels."""
        p = self.config.patch_size
        return (height // p) * (width // p)

    def check_native_size(self, pixel_values: Tensor, interpolate_pos_encoding: bool, name: str) -> None:
        h, w = pixel_values.shape[-2:]
        size = self.config.image_size
        if not interpolate_pos_encoding and (h != size or w != size):
            raise InputError(f"{name} input is {h}x{w} px but the tower is {size}x{size}; resize the image "
                             "or pass interpolate_pos_encoding=True")


def prenorm_encoder(config) -> nn.Module:
    """`encoder.layers`: the CLIP/SigLIP stack of pre-norm transformer layers (transformers' names)."""
    encoder = nn.Module()
    encoder.layers = nn.ModuleList(
        PreNormLayer(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.layer_norm_eps, config.hidden_act)
        for _ in range(config.num_hidden_layers))
    return encoder
