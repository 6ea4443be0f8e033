"""Llama decoder language model (Touvron et al. 2023), pure PyTorch, SDPA attention.

Module and parameter names mirror transformers' `LlamaForCausalLM` exactly
(`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`), so
`lm.load_state_dict(hf_model.state_dict())` works; numerics follow transformers' eager/SDPA code.

Our choices (not in the reference):
  - The caller passes `inputs_embeds`; `embed`, `forward` (hidden states after the final norm) and
    `logits` are separate so a VLM can splice image embeddings in and ask for last-position logits only.
  - A preallocated `KVCache` (llavakit.layers.kv_cache) instead of a growing one.
  - Attention-mask policy: no mask and SDPA's `is_causal` when there is no padding and nothing cached;
    no mask at all for one-token decode without padding; a boolean (B, 1, T, S) mask otherwise.
  - One-token decode with grouped-query attention folds the query heads of a KV group into the
    query-length axis, (B, H, 1, Dh) -> (B, Hkv, H/Hkv, Dh), so SDPA never copies K/V per query head
    (transformers' `pack_gqa` does the same).
  - `layer_attention_rows` recomputes a few rows of one layer's attention probabilities from the same
    RoPE-rotated q/k (FastV-style methods need them) without switching to eager attention.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import LMConfig
from ...errors import InputError
from ...layers.attention import attention_rows, causal_padding_mask, sdpa
from ...layers.kv_cache import KVCache
from ...layers.norms import RMSNorm
from ...layers.rope import RotaryEmbedding, apply_rope, default_position_ids

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (q/k/v/o projections named as in transformers)."""

    def __init__(self, cfg: LMConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_head
        d, dh = cfg.hidden_size, cfg.dim_head
        self.q_proj = nn.Linear(d, self.num_heads * dh, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * dh, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * dh, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * dh, d, bias=o_bias)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q (B, H, T, Dh), k, v (B, Hkv, T, Dh); q and k RoPE-rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                cache: KVCache | None, layer: int) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)  # (B, H, T, Dh), (B, Hkv, T, Dh) x2
        if cache is not None:
            k_all, v_all = cache.update(layer, k, v)  # (B, Hkv, S, Dh)
            if not is_causal:  # is_causal implies an empty cache before this call: the new k/v are all keys
                k, v = k_all, v_all
        n_rep = self.num_heads // self.num_kv_heads
        if t == 1 and n_rep > 1:
            # Decode: (B, H, 1, Dh) -> (B, Hkv, n_rep, Dh); a (B, 1, 1, S) mask broadcasts unchanged.
            out = sdpa(q.reshape(b, self.num_kv_heads, n_rep, self.head_dim), k, v, mask)
            out = out.reshape(b, self.num_heads, 1, self.head_dim)  # (B, H, 1, Dh)
        else:
            out = sdpa(q, k, v, mask, is_causal=is_causal)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise InputError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        # Registration order = transformers' state_dict order.
        self.self_attn = Attention(cfg, qkv_bias, o_bias)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                cache: KVCache | None, layer: int) -> Tensor:  # (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Holds the weights under transformers' `model.` prefix (embed_tokens, layers, norm)."""

    def __init__(self, cfg: LMConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, qkv_bias, o_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaLM(nn.Module):
    """Llama causal LM: `embed` -> `forward` (hidden after final norm) -> `logits`."""

    @staticmethod
    def attention_biases(cfg: LMConfig) -> tuple[bool, bool]:
        """(q/k/v bias, o bias). Llama: both follow `attention_bias`."""
        return cfg.attention_bias, cfg.attention_bias

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        qkv_bias, o_bias = self.attention_biases(cfg)
        self.model = DecoderStack(cfg, qkv_bias, o_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.dim_head, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, input_ids: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:  # (B, T, D) -> (B, T, V)
        return self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        w = self.model.embed_tokens.weight
        cfg = self.config
        return KVCache(self.num_layers, batch, cfg.num_key_value_heads, max_len, cfg.dim_head,
                       dtype=dtype or w.dtype, device=device or w.device)

    def _mask(self, attention_mask: Tensor | None, b: int, t: int, past: int,
              device: torch.device) -> tuple[Tensor | None, bool]:
        """(bool mask (B, 1, T, S) or None, is_causal) for T new queries after `past` cached keys."""
        if attention_mask is not None and attention_mask.dim() == 4:  # a ready bool mask (B, 1, T, S)
            if attention_mask.shape[-2:] != (t, past + t) or attention_mask.dtype != torch.bool:
                raise InputError(f"a 4-D attention_mask must be bool (batch, 1, {t}, {past + t}), "
                                 f"got {tuple(attention_mask.shape)} {attention_mask.dtype}")
            return attention_mask, False
        if attention_mask is not None:
            if attention_mask.shape != (b, past + t):
                raise InputError(f"attention_mask must be (batch, cached + new) = {(b, past + t)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                return causal_padding_mask(attention_mask, t), False
        if past == 0:
            return None, t > 1
        if t == 1:
            return None, False
        return causal_padding_mask(torch.ones(b, past + t, dtype=torch.bool, device=device), t), False

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: KVCache | None = None, run=None,
                inject=None) -> Tensor:
        """inputs_embeds (B, T, D); attention_mask (B, S) 0/1 over cached + new keys, or None (no padding),
        or a ready bool mask (B, 1, T, S) (e.g. block masks of packed training sequences; then pass
        position_ids); position_ids (B, T) or None. Appends this step's keys/values to `cache`. Returns hidden (B, T, D).
        `run`: a `compression.runner.LMRun` (in-LLM pruning / KV policies of one generation), which then
        runs the layer loop (after pruning, prefill returns fewer positions; the last one is kept).
        `inject`: a `models.visual_inject.BoundInjection` for this prompt, called before its layers on a
        pass that starts at position 0 (prefill or full recompute); decode steps are left alone."""
        b, t, _ = inputs_embeds.shape
        past = cache.seq_len() if cache is not None else 0
        if inject is not None and run is not None:
            raise InputError("visual re-injection cannot be combined with in-LLM compression or KV policies "
                             "(they move or drop the visual positions it writes to); use a pre-LLM method")
        if run is not None:
            return run.forward(self, inputs_embeds, attention_mask, position_ids, cache)
        if past:
            inject = None
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, t, past, inputs_embeds.device)
        mask, is_causal = self._mask(attention_mask, b, t, past, inputs_embeds.device)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)  # (B or 1, T, Dh)
        h = inputs_embeds
        for i, block in enumerate(self.model.layers):
            if inject is not None and i in inject.layers:
                h = inject(h, i)
            h = block(h, cos, sin, mask, is_causal, cache, i)
        return self.model.norm(h)

    @torch.no_grad()
    def layer_attention_rows(self, layer: int, hidden_in: Tensor, position_ids: Tensor | None, rows: Tensor,
                             attention_mask: Tensor | None = None) -> Tensor:
        """Attention probabilities of query `rows` in `layer`, recomputed without a cache.

        hidden_in (B, T, D): the input of that layer (before its input_layernorm); rows (R,) query indices;
        attention_mask (B, T) 0/1 or None. Returns (B, H, R, T) fp32, as eager attention would give.
        """
        b, t, _ = hidden_in.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, t, 0, hidden_in.device)
        block = self.model.layers[layer]
        cos, sin = self.rotary(position_ids, hidden_in.dtype)
        q, k, _ = block.self_attn.qkv(block.input_layernorm(hidden_in), cos, sin)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=hidden_in.device)
        mask = causal_padding_mask(attention_mask, t)[:, :, rows]  # (B, 1, R, T)
        return attention_rows(q[:, :, rows], k, mask)
