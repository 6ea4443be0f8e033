"""Generation engine: greedy parity with transformers' generate, cache == no cache, stop strings,
EOS, sampling (seeded, top-k, top-p), streaming and config validation."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from llavakit.errors import InputError
from llavakit.generation.engine import GenerationConfig, generate, trim_stop
from llavakit.generation.sampling import sample_next, top_k_filter, top_p_filter
from llavakit.generation.streaming import TokenIterator, stream
from llavakit.models.lm import build_lm
from llavakit.models.lm.hf_config import lm_config_from_hf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=0, tie_word_embeddings=True)


def decode(ids: list[int]) -> str:
    """A toy tokenizer: each id is one letter."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**TINY)
    hf = LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # larger weights than HF's init so greedy output varies
        for name, p in hf.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    hf.generation_config.eos_token_id = None
    ours = build_lm(lm_config_from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # second prompt is 5 tokens, left-padded
    return ids, mask


def run(lm, prompts, **kw):
    ids, mask = prompts
    with torch.no_grad():
        embeds = lm.embed(ids)
    decode_fn = kw.pop("decode_fn", None)
    on_token = kw.pop("on_token", None)
    return generate(lm, embeds, mask, GenerationConfig(**kw), decode_fn=decode_fn, on_token=on_token)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_hf_generate(pair, prompts, use_cache):
    hf, ours = pair
    ids, mask = prompts
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = run(ours, prompts, max_new_tokens=20, use_cache=use_cache)
    assert got.shape == (2, 20)
    assert torch.equal(got, ref)
    assert len(set(got[0].tolist())) > 3  # a non-degenerate sequence


def test_cache_equals_no_cache_when_sampling(pair, prompts):
    _, ours = pair
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(run(ours, prompts, **kw, use_cache=True), run(ours, prompts, **kw, use_cache=False))


def test_unpadded_batch_and_single_prompt(pair, prompts):
    _, ours = pair
    ids, _ = prompts
    both = run(ours, (ids[:1], None), max_new_tokens=6)
    assert torch.equal(both, run(ours, (ids[:1], torch.ones(1, 8, dtype=torch.long)), max_new_tokens=6))
    assert run(ours, prompts, max_new_tokens=0).shape == (2, 0)


def test_stop_string_finishes_row_and_is_trimmed(pair, prompts):
    _, ours = pair
    full = run(ours, prompts, max_new_tokens=20)
    text0 = decode(full[0].tolist())
    stop = text0[6:8]
    expected = text0[: text0.find(stop)]
    out = run(ours, prompts, max_new_tokens=20, stop_strings=(stop,), decode_fn=decode, pad_token_id=126)
    n = text0.find(stop) + len(stop)  # row 0 finishes on the token that completes the stop string
    assert torch.equal(out[0, :n], full[0, :n]) and (out[0, n:] == 126).all()
    assert trim_stop(decode(out[0, :n].tolist()), [stop]) == expected
    if stop not in decode(full[1].tolist()):
        assert out.shape[1] == 20 and torch.equal(out[1], full[1])
    with pytest.raises(InputError, match="decode_fn"):
        run(ours, prompts, max_new_tokens=3, stop_strings=("x",))


def test_trim_stop_earliest():
    assert trim_stop("hello world. bye", ["bye", "."]) == "hello world"
    assert trim_stop("abc", ["x"]) == "abc"


def test_eos_finishes_row_with_pad(pair, prompts):
    _, ours = pair
    full = run(ours, prompts, max_new_tokens=10)
    eos = full[0, 3].item()
    out = run(ours, prompts, max_new_tokens=10, eos_token_ids=(eos,), pad_token_id=127)
    first = full[0].tolist().index(eos)
    assert out[0, : first + 1].tolist() == full[0, : first + 1].tolist()  # EOS itself is kept
    assert (out[0, first + 1:] == 127).all()


def test_on_token_sees_every_unfinished_token(pair, prompts):
    _, ours = pair
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = run(ours, prompts, max_new_tokens=7, on_token=lambda i, t: seen[i].append(t))
    assert seen[0] == out[0].tolist() and seen[1] == out[1].tolist()


def test_sampling_seeded_and_top_k_one_is_greedy(pair, prompts):
    _, ours = pair
    kw = dict(max_new_tokens=16, temperature=1.5)
    a, b = run(ours, prompts, **kw, seed=1), run(ours, prompts, **kw, seed=1)
    c = run(ours, prompts, **kw, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = run(ours, prompts, max_new_tokens=16)
    assert torch.equal(run(ours, prompts, **kw, seed=3, top_k=1), greedy)
    assert torch.equal(run(ours, prompts, **kw, seed=3, top_p=1e-6), greedy)
    assert GenerationConfig(temperature=0.7).do_sample and not GenerationConfig().do_sample


def test_filters_match_hf_semantics():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 0.01).isfinite().sum() == 1  # at least one token
    x = torch.randn(4, 50)
    for p in (0.3, 0.8, 0.95):
        assert torch.equal(top_p_filter(x, p), TopPLogitsWarper(p)(None, x.clone()))
    assert top_k_filter(x, 5).isfinite().sum(-1).tolist() == [5] * 4
    assert torch.equal(sample_next(x), x.argmax(-1))


def test_bad_configs_raise():
    for kw in (dict(max_new_tokens=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1),
               dict(top_k=-2), dict(stop_strings=("",)), dict(pad_token_id=-1)):
        with pytest.raises(InputError):
            GenerationConfig(**kw)
    assert GenerationConfig(stop_strings=["a"], eos_token_ids=[1, 2]).eos_token_ids == (1, 2)


def test_streaming_yields_final_text(pair, prompts):
    _, ours = pair
    ids, _ = prompts
    full = run(ours, (ids[:1], None), max_new_tokens=20)
    text = decode(full[0].tolist())
    stop = text[9:11]
    cfg = GenerationConfig(max_new_tokens=20, stop_strings=(stop,))
    with torch.no_grad():
        embeds = ours.embed(ids[:1])
    it = stream(ours, embeds, None, cfg, decode)
    pieces = list(it)
    assert len(pieces) > 3
    assert "".join(pieces) == trim_stop(decode(it.result[0].tolist()), [stop]) == text[: text.find(stop)]
    with pytest.raises(InputError, match="one prompt"):
        stream(ours, ours.embed(ids).detach(), None, cfg, decode)


def test_streaming_consumer_stopping_early_does_not_deadlock(pair, prompts):
    _, ours = pair
    ids, _ = prompts
    with torch.no_grad():
        embeds = ours.embed(ids[:1])
    it = TokenIterator(decode, timeout=30).start(ours, embeds, None, GenerationConfig(max_new_tokens=200))
    for _ in it:
        break
    assert not it._thread.is_alive()  # cancelled and joined when the loop was left
    assert it.result is None and len(it.tokens) < 200
    assert threading.active_count() < 50
