"""Analytic cost accounting from config and token counts alone (no model, no GPU).

FLOP convention (the one place it is stated; every figure llavakit reports uses it)
------------------------------------------------------------------------------------
- One multiply-add = 2 FLOPs. A matmul (m, k) @ (k, n) costs 2 * m * k * n.
- Counted: every matmul of the forward pass.
    * Linear layers: q/k/v/o projections, MLP (ViT fc1/fc2; Llama-style gate/up/down), the projector,
      the lm_head, and the ViT patch embedding (a stride-p conv = a matmul of the p*p*C patch pixels by
      the (p*p*C, hidden) kernel, per patch).
    * Attention: scores Q K^T and the weighted sum A V, each 2 * head_dim FLOPs per (query, key) pair
      per query head (grouped-query attention does not reduce them; it only shrinks k/v projections
      and the KV cache).
      - Vision towers: full bidirectional attention, T * T pairs.
      - Language model: causal, and only the pairs actually attended are counted: with `past` cached
        tokens, new query i (0-based) attends past + i + 1 keys (itself included), so a prefill of T
        tokens has T * past + T * (T + 1) / 2 pairs; one decoded token attends `context_len` keys.
- Not counted: norms, softmax, activations, RoPE, residual adds, bias adds, layer-scale, embedding
  look-ups, position-embedding adds/interpolation, CLS concatenation, SigLIP's pooling head (LLaVA
  reads hidden states, not the pooled output), sampling.
- lm_head: prefill computes logits at the last position only by default (what generation needs), or
  at every position (`prefill_logits_all=True`, e.g. training or scoring). Each decode step computes
  logits for its one position.
- Generation of N new tokens = one prefill (its last-position logits give token 1) + N - 1 decode
  steps (token j is fed back to produce token j + 1; the last token is never fed). Decode step j
  (1-based) attends prompt + j keys. The KV cache at the end holds prompt + N - 1 positions per layer.
- KV cache bytes = 2 (K and V) * layers * kv_heads * head_dim * tokens * dtype_bytes * batch.
- Units in `summary()`: MFLOPs = 1e6, GFLOPs = 1e9, TFLOPs = 1e12 FLOPs; MB = 1e6 bytes.

Vision layers run: the tower stops at the deepest feature layer LLaVA reads. hidden_states[k] is the
input to layer k (hidden_states[0] = embeddings), so feature layer k >= 0 runs k layers and k < 0 runs
L + 1 + k (LLaVA's -2 skips the last layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig
from .errors import InputError


def _count(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul."""
    return 2 * m * k * n


# ----------------------------------------------------------------------------------------- vision

def vision_intermediate_size(vc: VisionConfig) -> int:
    """MLP width of the tower: DINOv2 uses hidden * mlp_ratio (as transformers does), others the field."""
    return vc.hidden_size * vc.mlp_ratio if vc.family == "dinov2" else vc.intermediate_size


def vision_layers_run(config: VLMConfig) -> int:
    """Encoder layers that must run to produce the deepest feature layer in `config.feature_layers`."""
    n = config.vision.num_hidden_layers
    runs = []
    for k in config.feature_layers:
        run = k if k >= 0 else n + 1 + k
        if not 0 <= run <= n:
            raise InputError(f"vision_feature_layer {k} is out of range for a {n}-layer tower "
                             f"(valid: {-(n + 1)}..{n})")
        runs.append(run)
    return max(runs)


def vision_flops(vc: VisionConfig, num_images_or_views: int, num_layers_run: int | None = None,
                 grid: int | tuple[int, int] | None = None) -> int:
    """Patch embedding + `num_layers_run` encoder layers (default: all) for each view.

    `grid`: patches per side (int) or (rows, cols); default `vc.grid`. Tokens per view = patches,
    + 1 CLS when the family has one. Attention is full bidirectional.
    """
    views = _count("num_images_or_views", num_images_or_views)
    layers = vc.num_hidden_layers if num_layers_run is None else _count("num_layers_run", num_layers_run)
    if layers > vc.num_hidden_layers:
        raise InputError(f"num_layers_run={layers} exceeds the tower's {vc.num_hidden_layers} layers")
    g = vc.grid if grid is None else grid
    rows, cols = (g, g) if isinstance(g, int) else tuple(g)
    patches = _count("grid rows", rows, 1) * _count("grid cols", cols, 1)
    t, d = patches + int(vc.has_cls), vc.hidden_size
    patch_embed = _mm(patches, vc.num_channels * vc.patch_size ** 2, d)
    per_layer = (4 * _mm(t, d, d)  # q, k, v, o
                 + 2 * _mm(t, vc.head_dim, t) * vc.num_attention_heads  # Q K^T and A V, all pairs
                 + 2 * _mm(t, d, vision_intermediate_size(vc)))  # fc1, fc2
    return views * (patch_embed + layers * per_layer)


def tokens_per_image(config: VLMConfig) -> int:
    """Visual tokens one image gives the LM in the fixed-resolution `llava` architecture.

    grid^2, + 1 when the strategy is "full" and the tower has a CLS token. Several feature layers are
    concatenated on the channel dim, so they do not change the count.
    """
    if config.architecture != "llava":
        raise InputError(f"tokens_per_image is fixed only for architecture 'llava'; "
                         f"{config.architecture!r} depends on the image size (ask the processor)")
    return _tokens_per_view(config)


def _tokens_per_view(config: VLMConfig) -> int:
    vc = config.vision
    return config.view_grid ** 2 + int(config.vision_feature_select_strategy == "full" and vc.has_cls)


# -------------------------------------------------------------------------------- projector / LM

def projector_flops(pc: ProjectorConfig, num_tokens: int, context_tokens: int | None = None) -> int:
    """`linear`: in -> out; `mlp2x_gelu`: in -> out -> out; plus the local-context branch when present
    (in -> C, k x k conv C -> C, C -> in per token), which runs on the full grids before any pruning
    stage: `context_tokens` (default `num_tokens`) is the tower's token count."""
    t = _count("num_tokens", num_tokens)
    flops = _mm(t, pc.in_features, pc.out_features)
    if pc.context_kernel:
        tc = t if context_tokens is None else _count("context_tokens", context_tokens)
        c, k = pc.context_channels, pc.context_kernel
        flops += _mm(tc, pc.in_features, c) + _mm(tc, c * k * k, c) + _mm(tc, c, pc.in_features)
    if pc.kind == "mlp2x_gelu":
        flops += _mm(t, pc.out_features, pc.out_features)
    return flops


def _lm_linear_flops(lc: LMConfig, num_tokens: int) -> int:
    """Projections + gated MLP of one LM layer for `num_tokens` positions (no attention pairs)."""
    d, hd = lc.hidden_size, lc.dim_head
    q, kv = lc.num_attention_heads * hd, lc.num_key_value_heads * hd
    return (_mm(num_tokens, d, q) + 2 * _mm(num_tokens, d, kv) + _mm(num_tokens, q, d)
            + 3 * _mm(num_tokens, d, lc.intermediate_size))  # gate, up, down


def _lm_attention_flops(lc: LMConfig, pairs: int) -> int:
    """Q K^T + A V over `pairs` (query, key) pairs, every query head."""
    return 2 * 2 * lc.dim_head * lc.num_attention_heads * pairs


def lm_layer_prefill_flops(lc: LMConfig, num_tokens: int, past: int = 0) -> int:
    """One LM layer on `num_tokens` new positions after `past` cached ones (causal pairs only)."""
    t, p = _count("num_tokens", num_tokens), _count("past", past)
    return _lm_linear_flops(lc, t) + _lm_attention_flops(lc, t * p + t * (t + 1) // 2)


def lm_head_flops(lc: LMConfig, num_positions: int = 1) -> int:
    """Logits for `num_positions` positions."""
    return _mm(_count("num_positions", num_positions), lc.hidden_size, lc.vocab_size)


def lm_decode_token_flops(lc: LMConfig, context_len: int) -> int:
    """One decode step, all layers + lm_head: one new token attending `context_len` keys (incl. itself)."""
    c = _count("context_len", context_len, 1)
    return lc.num_hidden_layers * lm_layer_prefill_flops(lc, 1, past=c - 1) + lm_head_flops(lc, 1)


def kv_cache_bytes(lc: LMConfig, num_tokens: int, dtype_bytes: int = 2, batch: int = 1) -> int:
    """K and V of every layer for `num_tokens` positions."""
    tokens, nbytes = _count("num_tokens", num_tokens), _count("dtype_bytes", dtype_bytes, 1)
    per_token = 2 * lc.num_hidden_layers * lc.num_key_value_heads * lc.dim_head * nbytes
    return per_token * tokens * _count("batch", batch)


# ------------------------------------------------------------------------------------ one request

def _fmt_flops(n: int) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} FLOPs"


@dataclass(frozen=True)
class RequestCost:
    """Analytic cost of one request (see the module docstring for the convention).

    `lm_head_flops` is the prefill's lm_head; each entry of `decode_flops_per_token` (one per generated
    token after the first) includes its own lm_head. `total_flops` sums vision, projector, LM prefill,
    prefill lm_head and decode. `kv_cache_bytes` is the cache at the end of generation.
    `visual_tokens` maps stage -> visual-token count after it (empty for a text-only model).
    """

    vision_flops: int
    projector_flops: int
    lm_prefill_flops_per_layer: tuple[int, ...]
    lm_prefill_flops: int
    lm_head_flops: int
    decode_flops_per_token: tuple[int, ...]
    decode_flops: int
    total_flops: int
    kv_cache_bytes: int
    visual_tokens: Mapping[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples as lists)."""
        return {
            "vision_flops": self.vision_flops,
            "projector_flops": self.projector_flops,
            "lm_prefill_flops_per_layer": list(self.lm_prefill_flops_per_layer),
            "lm_prefill_flops": self.lm_prefill_flops,
            "lm_head_flops": self.lm_head_flops,
            "decode_flops_per_token": list(self.decode_flops_per_token),
            "decode_flops": self.decode_flops,
            "total_flops": self.total_flops,
            "kv_cache_bytes": self.kv_cache_bytes,
            "visual_tokens": dict(self.visual_tokens),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
        }

    def summary(self) -> str:
        """Human-readable multi-line report."""
        per_tok, steps = self.decode_flops_per_token, len(self.decode_flops_per_token)
        per_tok = f"{_fmt_flops(per_tok[0])} .. {_fmt_flops(per_tok[-1])} per token" if steps else "none"
        layers = len(self.lm_prefill_flops_per_layer)
        rows = [
            ("visual tokens", " -> ".join(f"{k} {v}" for k, v in self.visual_tokens.items()) or "none"),
            ("prompt / new", f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens"),
            ("vision tower", _fmt_flops(self.vision_flops)),
            ("projector", _fmt_flops(self.projector_flops)),
            ("LM prefill", f"{_fmt_flops(self.lm_prefill_flops)} ({layers} layers)"),
            ("lm_head (prefill)", _fmt_flops(self.lm_head_flops)),
            ("decode", f"{_fmt_flops(self.decode_flops)} ({steps} steps; {per_tok})"),
            ("total", _fmt_flops(self.total_flops)),
            ("KV cache (end)", f"{self.kv_cache_bytes / 1e6:.3f} MB"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["request cost (analytic; multiply-add = 2 FLOPs)"]
                         + [f"  {k:<{width}}  {v}" for k, v in rows])


def _visual_stages(config: VLMConfig, given: Mapping[str, int], views: int, visual: int) -> dict[str, int]:
    """{"vision", *intermediate stages in the caller's order, "projector", "llm"} -> visual-token count."""
    counts = {name: _count(f"visual_tokens_per_stage[{name!r}]", k) for name, k in given.items()}
    if counts.get("llm", visual) != visual:
        raise InputError(f"visual_tokens_per_stage['llm']={counts['llm']} disagrees with "
                         f"visual_tokens={visual}")
    stages = {"vision": counts.pop("vision", _tokens_per_view(config) * views)}
    projector_in = counts.pop("projector", visual)
    counts.pop("llm", None)
    stages.update(counts)
    stages.update(projector=projector_in, llm=visual)
    return stages


def request_cost(config: VLMConfig, *, visual_tokens_per_stage: Mapping[str, int] | None = None,
                 num_views: int = 1, visual_tokens: int, text_tokens: int, new_tokens: int,
                 dtype_bytes: int = 2, tokens_per_layer: Sequence[int] | None = None,
                 prefill_logits_all: bool = False, view_grid: tuple[int, int] | None = None,
                 kv_tokens_per_layer: Sequence[int] | None = None) -> RequestCost:
    """Cost of one request: `num_views` tower views, `visual_tokens` + `text_tokens` prompt, `new_tokens` out.

    `visual_tokens_per_stage`: counts after intermediate stages (e.g. {"fasterv": 64}), inserted between
    "vision" (tower output per view after feature selection, times views) and "projector" (projector
    input; defaults to `visual_tokens`, pass it when a resampler or added separators make it differ).
    "llm" is always `visual_tokens`. `tokens_per_layer`: positions each LM layer processes in prefill
    (in-LLM pruning); default every layer sees visual + text. Its KV cache and decode context follow it.
    `view_grid`: the tower's patch grid (rows, cols) per view when it differs from the configured one
    (a downsampling resize). `kv_tokens_per_layer`: positions each layer keeps cached after prefill when
    a KV policy evicts some (default: `tokens_per_layer`); decode attention and KV bytes follow it.
    """
    lc = config.lm
    v, t = _count("visual_tokens", visual_tokens), _count("text_tokens", text_tokens)
    n, views = _count("new_tokens", new_tokens), _count("num_views", num_views)
    prompt = _count("visual_tokens + text_tokens", v + t, 1)
    layers = lc.num_hidden_layers
    per_layer_tokens = tuple(tokens_per_layer) if tokens_per_layer is not None else (prompt,) * layers
    if len(per_layer_tokens) != layers:
        raise InputError(f"tokens_per_layer has {len(per_layer_tokens)} entries; the LM has {layers} layers")
    for i, k in enumerate(per_layer_tokens):
        _count(f"tokens_per_layer[{i}]", k, 1)
    kv_tokens = tuple(kv_tokens_per_layer) if kv_tokens_per_layer is not None else per_layer_tokens
    if len(kv_tokens) != layers:
        raise InputError(f"kv_tokens_per_layer has {len(kv_tokens)} entries; the LM has {layers} layers")
    for i, (k, full) in enumerate(zip(kv_tokens, per_layer_tokens)):
        if _count(f"kv_tokens_per_layer[{i}]", k, 1) > full:
            raise InputError(f"kv_tokens_per_layer[{i}] = {k} exceeds the {full} positions that layer processes")

    if config.architecture == "lm":  # text-only: no tower, no projector
        if v or visual_tokens_per_stage:
            raise InputError("a text-only ('lm') model takes no visual tokens; pass visual_tokens=0")
        stages: dict[str, int] = {}
        vis = proj = 0
    else:
        stages = _visual_stages(config, visual_tokens_per_stage or {}, views, v)
        vis = vision_flops(config.vision, views, vision_layers_run(config),
                           grid=config.view_grid if view_grid is None else view_grid)
        proj = projector_flops(config.projector, stages["projector"], stages["vision"])
    prefill = tuple(lm_layer_prefill_flops(lc, k) for k in per_layer_tokens)
    if config.visual_inject_layers:  # re-injection: D -> r -> D per visual token at each listed layer
        r = config.visual_inject_rank
        prefill = tuple(f + (2 * _mm(v, lc.hidden_size, r) if i in config.visual_inject_layers else 0)
                        for i, f in enumerate(prefill))
    head = lm_head_flops(lc, prompt if prefill_logits_all else 1)
    # Decode step j (1-based) adds one position to every layer: layer l attends kv_tokens[l] + j keys.
    step_const = layers * _lm_linear_flops(lc, 1) + lm_head_flops(lc, 1)
    cached = sum(kv_tokens)
    decode = tuple(step_const + _lm_attention_flops(lc, cached + layers * j) for j in range(1, n))
    cached_end = sum(k + max(n - 1, 0) for k in kv_tokens)  # positions cached, all layers
    kv = 2 * lc.num_key_value_heads * lc.dim_head * _count("dtype_bytes", dtype_bytes, 1) * cached_end
    return RequestCost(
        vision_flops=vis, projector_flops=proj, lm_prefill_flops_per_layer=prefill,
        lm_prefill_flops=sum(prefill), lm_head_flops=head, decode_flops_per_token=decode,
        decode_flops=sum(decode), total_flops=vis + proj + sum(prefill) + head + sum(decode),
        kv_cache_bytes=kv, visual_tokens=stages, prompt_tokens=prompt, new_tokens=n)
