"""Batched autoregressive generation over a llavakit language model.

The model is anything with the `LlamaLM` interface: `embed`, `forward(inputs_embeds, attention_mask,
position_ids, cache)`, `logits`, `new_cache`. Prompts arrive as embeddings (a VLM splices image
features in before calling) and are LEFT-padded. The prompt is prefilled once; then one token per
step goes through the preallocated KV cache (or, with `use_cache=False`, the whole sequence is
recomputed each step — slow, used by tests to prove the cache changes nothing).

Semantics follow transformers' `generate`: positions are cumsum(mask) - 1; a row that produced an
EOS token (kept in the output, as transformers does) is finished and gets `pad_token_id` from then on;
generation ends when every row is finished or after `max_new_tokens`. Our additions: stop strings are
checked on the decoded text of each row's generated tokens (`decode_fn`), and `trim_stop` cuts the
returned text at the stop string; `on_token(batch_index, token_id)` sees each new token of an
unfinished row as soon as it is chosen (streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..layers.rope import default_position_ids
from .sampling import sample_next


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. temperature 0 = greedy; `do_sample` is derived (temperature > 0)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        # Accept lists / a single value from YAML or callers; store tuples (the dataclass is frozen).
        for name in ("stop_strings", "eos_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.pad_token_id < 0:
            raise InputError(f"pad_token_id must be a token id >= 0 (finished rows feed it to the model), "
                             f"got {self.pad_token_id}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise InputError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def trim_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` cut before the earliest occurrence of any stop string (unchanged if none occurs)."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate(lm, inputs_embeds: Tensor, attention_mask: Tensor | None, config: GenerationConfig, *,
             decode_fn: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None, run=None,
             position_ids: Tensor | None = None, inject=None) -> Tensor:
    """Generate up to `config.max_new_tokens` tokens for each left-padded prompt.

    inputs_embeds (B, T, D); attention_mask (B, T) 1 = real token, 0 = left padding (None: no padding).
    Returns the generated ids only, (B, N) long with N <= max_new_tokens; finished rows hold pad_token_id.
    `run`: the in-LLM compression state of this generation (`Compression.lm_run`), passed to every LM call.
    `inject`: the prompt's visual re-injection (`LlavaModel.injection`), applied on every pass over the prompt.
    `position_ids` (B, T): the prompt's LM positions (None: consecutive over real tokens); new tokens
    continue after each row's last one.
    """
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if config.stop_strings and decode_fn is None:
        raise InputError("stop_strings need a decode_fn (token ids -> text) to be checked")
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    if attention_mask.shape != (b, t):
        raise InputError(f"attention_mask must be (batch, prompt length) = {(b, t)}, got {tuple(attention_mask.shape)}")
    vocab = lm.config.vocab_size
    if config.pad_token_id >= vocab:
        raise InputError(f"pad_token_id {config.pad_token_id} is outside the vocabulary (size {vocab})")
    if config.max_new_tokens == 0:
        return torch.empty(b, 0, dtype=torch.long, device=device)

    padded = not bool(attention_mask.all())
    mask = attention_mask.long() if padded else None  # (B, S), grows by one column per step
    if position_ids is None:
        positions = default_position_ids(attention_mask, t, 0, device).expand(b, t)  # (B, T)
    elif position_ids.shape != (b, t):
        raise InputError(f"position_ids must be (batch, prompt length) = {(b, t)}, got {tuple(position_ids.shape)}")
    else:
        positions = position_ids.to(device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    cache = lm.new_cache(b, t + config.max_new_tokens, dtype=inputs_embeds.dtype, device=device) \
        if config.use_cache else None

    hidden = lm(inputs_embeds, mask, positions, cache, run=run, inject=inject)  # (B, T, D)
    logits = lm.logits(hidden[:, -1:])[:, 0]  # (B, V)
    all_embeds, all_pos = inputs_embeds, positions  # only used without a cache

    eos = set(config.eos_token_ids)
    finished = [False] * b
    generated: list[list[int]] = [[] for _ in range(b)]
    steps: list[Tensor] = []
    for step in range(config.max_new_tokens):
        chosen = sample_next(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                             generator=generator).tolist()
        for i in range(b):
            if finished[i]:
                chosen[i] = config.pad_token_id
                continue
            tok = chosen[i]
            generated[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in eos:
                finished[i] = True
            elif config.stop_strings and any(s in decode_fn(generated[i]) for s in config.stop_strings):
                finished[i] = True
        tokens = torch.tensor(chosen, dtype=torch.long, device=device)  # (B,)
        steps.append(tokens)
        if all(finished) or step == config.max_new_tokens - 1:
            break

        emb = lm.embed(tokens[:, None])  # (B, 1, D)
        pos, next_pos = next_pos, next_pos + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        if cache is not None:
            hidden = lm(emb, mask, pos, cache, run=run)
        else:
            all_embeds = torch.cat([all_embeds, emb], dim=1)
            all_pos = torch.cat([all_pos, pos], dim=1)
            hidden = lm(all_embeds, mask, all_pos, None, run=run, inject=inject)
        logits = lm.logits(hidden[:, -1:])[:, 0]
    return torch.stack(steps, dim=1)
