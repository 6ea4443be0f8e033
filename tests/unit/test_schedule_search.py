"""G-Search / P-Sigmoid layer schedules (H5), their offline search, and the kvevict KV policy (H6),
on a tiny random 4-layer LLaVA (16 visual tokens per image)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llavakit
from llavakit import InputError
from llavakit.compression import BUDGET_PARAMS, Compression, method_names, with_budget
from llavakit.compression import search
from llavakit.compression.runner import _rows_fn
from llavakit.generation.engine import generate
from llavakit.layers.attention import causal_padding_mask
from llavakit.layers.rope import default_position_ids
from llavakit.llm_hooks.schedule import PSigmoid
from tests import tiny_models as tm

LAYERS = 4
PROMPTS = ["what is in the image ?", "describe the colour of the shape of the image", "is a red circle in the image ?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny_models' llava (tokenizer, preprocessor) with a 4-layer LM, weights ~ N(0, 0.6^2) so greedy
    answers vary with the prompt (the default 0.2 makes every answer "yes yes ...")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    d = tm.build("llava", tmp_path_factory.mktemp("sched"))
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=tm._clip_cfg(), text_config=tm._llama_cfg(num_hidden_layers=LAYERS),
                      image_token_index=tm.IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    model.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def vlm(model_dir, one_torch_thread):
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def images():
    return tm.noise_images(len(PROMPTS))


def run_ids(vlm, spec, prompts, imgs, n=6, use_cache=True):
    """(generated ids (B, N), the LMRun) of a greedy generation, through the same path as chat_batch."""
    comp = vlm.resolve_compression(spec)
    texts = [vlm.build_prompt(p, [i]) for p, i in zip(prompts, imgs)]
    inputs = vlm.processor(text=texts, images=list(imgs), compression=comp)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = vlm.model.embed_inputs(ids, inputs["pixel_values"], None, compression=comp)
    run = comp.lm_run(vlm.model, ids, mask) if comp is not None else None
    cfg = vlm.generation_config(max_new_tokens=n, use_cache=use_cache, eos_token_id=[])
    with torch.inference_mode():
        out = generate(vlm.model.language_model, embeds, mask, cfg, run=run)
    return out, run, ids, mask


# ----------------------------------------------------------------------------- parsing
def test_registered_with_flags():
    assert {"gsearch", "psigmoid", "kvevict"} <= set(method_names())
    for name in ("gsearch", "psigmoid"):
        assert BUDGET_PARAMS[name] is None
    assert BUDGET_PARAMS["kvevict"] == "keep"
    g = Compression.parse("gsearch:ratios=1/1/0.5").plugins[0]
    p = Compression.parse("psigmoid").plugins[0]
    e = Compression.parse("kvevict").plugins[0]
    assert (g.kind, g.kv_safe, g.batch_safe) == ("layer", True, True)
    assert (p.kind, p.kv_safe, p.batch_safe) == ("layer", True, True)
    assert (e.kind, e.kv_safe, e.batch_safe, e.start) == ("kv", False, True, 2)
    assert g.needs == p.needs == frozenset({"attention_rows", "text_query"})
    assert with_budget("gsearch:ratios=1/0.5", 0.1) == "gsearch:ratios=1/0.5"
    assert with_budget("kvevict:start=3", 0.25) == "kvevict:start=3:keep=0.25"


def test_gsearch_ratios_parse_and_pad():
    h = Compression.parse("gsearch:ratios=1/1/0.5/0.25").plugins[0]
    assert h.ratios(6) == [1, 1, 0.5, 0.25, 0.25, 0.25]
    assert h.prune_layers(6) == (2, 3)
    assert h.visual_schedule(6, 16) == [16, 16, 8, 4, 4, 4]
    assert h.visual_schedule(6, 30) == [30, 30, 15, 8, 8, 8]  # ceil
    # 0.1 * 30 = 3.0000000000000004: 3, not 4
    assert Compression.parse("gsearch:ratios=1/0.1").plugins[0].visual_schedule(2, 30) == [30, 3]
    assert Compression.parse("gsearch:ratios=1/0.01").plugins[0].visual_schedule(2, 16) == [16, 1]  # at least one
    assert Compression.parse("gsearch:ratios=1").plugins[0].prune_layers(4) == ()
    assert Compression.parse({"gsearch": {"ratios": [1, 0.5]}}).plugins[0].ratios(3) == [1, 0.5, 0.5]


@pytest.mark.parametrize("spec, match", [
    ("gsearch:ratios=1/0.5/0.75", "non-increasing"),
    ("gsearch:ratios=1/0.5/0", r"\(0, 1\]"),
    ("gsearch:ratios=1/1.5", r"\(0, 1\]"),
    ("gsearch:ratios=0.5/0.5", "r_0 = 1"),
    ("gsearch:ratios=1/a", r"\(0, 1\]"),
    ("gsearch:ratio=1/0.5", "unknown parameter 'ratio'"),
    ("gsearch", "exactly one"),
    ("gsearch:ratios=1:file=x.json", "exactly one"),
    ("psigmoid:k=-1", "k must be"),
    ("psigmoid:min_keep=2", "min_keep must be"),
    ("psigmoid:l0=abc", "l0 must be"),
    ("psigmoid:keep=0.5", "unknown parameter 'keep'"),
    ("kvevict:keep=0", r"\(0, 1\]"),
    ("kvevict:start=-1", "start must be"),
    ("kvevict:layer=2", "unknown parameter 'layer'"),
])
def test_bad_specs_fail_at_parse(spec, match):
    with pytest.raises(InputError, match=match):
        Compression.parse(spec)


def test_schedule_longer_than_model_refused_before_compute(vlm, images):
    with pytest.raises(InputError, match="5 ratios but the LM has only 4 layers"):
        vlm.chat("what ?", images[0], compression="gsearch:ratios=1/1/1/1/0.5")


def test_schedule_file_round_trip(tmp_path):
    out = search.save_schedule(tmp_path / "s" / "sched.json", [1, 1, 0.5, 0.25], task="easyvqa")
    assert json.loads(out.read_text())["task"] == "easyvqa"
    assert [p.name for p in out.parent.iterdir()] == ["sched.json"]  # no temp file left behind
    assert search.load_schedule(out) == [1, 1, 0.5, 0.25]
    h = Compression.parse(f"gsearch:file={out}").plugins[0]
    assert h.visual_schedule(5, 16) == [16, 16, 8, 4, 4]
    with pytest.raises(InputError, match="does not exist"):
        Compression.parse(f"gsearch:file={tmp_path}/missing.json")
    (tmp_path / "bad.json").write_text('{"ratios": [1, 2]}')
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        Compression.parse(f"gsearch:file={tmp_path}/bad.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(InputError, match="cannot read"):
        Compression.parse(f"gsearch:file={tmp_path}/junk.json")
    with pytest.raises(InputError, match="non-increasing"):
        search.save_schedule(tmp_path / "x.json", [1, 0.5, 1])


def test_psigmoid_curve():
    p = PSigmoid(k=2.0, l0=2.0)
    r = p.ratios(5)
    assert r[0] == 1 and all(a >= b for a, b in zip(r, r[1:]))
    assert r[2] == pytest.approx(0.5) and r[1] == pytest.approx(1 / (1 + math.exp(-2)))
    assert PSigmoid().ratios(30)[15] == pytest.approx(0.5)  # default l0 = L / 2
    assert min(PSigmoid(k=5, l0=1, min_keep=0.2).ratios(10)) == pytest.approx(0.2)
    assert PSigmoid(k=50, l0=1).visual_schedule(4, 16) == [16, 8, 1, 1]  # r(l0) = 0.5; never below one token
    assert PSigmoid(k=0, l0=1).ratios(3) == [1, 0.5, 0.5]


# ----------------------------------------------------------------------------- in the model
@pytest.mark.parametrize("spec, n_visual", [
    ("gsearch:ratios=1/1/0.75/0.25", 16),
    ("psigmoid:k=1.5:l0=2", 16),
    ("fastervlm:keep=0.5,gsearch:ratios=1/0.5/0.5/0.2", 8),  # N after an H2 stage
])
def test_visual_schedule_matches_what_the_runner_keeps(vlm, images, spec, n_visual):
    _, run, ids, mask = run_ids(vlm, spec, PROMPTS, images, n=2)  # rows of different lengths: left padding
    hook = Compression.parse(spec).layer_hooks[0]
    sched = hook.visual_schedule(LAYERS, n_visual)
    assert set(run.kept) == set(hook.prune_layers(LAYERS))
    for layer, kept in run.kept.items():
        assert kept.tolist() == [sched[layer]] * len(PROMPTS), (layer, sched)
    survivors = ids == vlm.config.image_token_id  # decisions[l]: False = dropped entering l
    for layer in sorted(run.decisions):
        survivors = survivors & run.decisions[layer]
        assert survivors.sum(1).tolist() == [sched[layer]] * len(PROMPTS)
    assert Compression.parse(spec).tokens_per_layer(vlm.model, n_visual, 10) == [s + 10 for s in sched]


def test_original_n_counts_across_hooks(vlm, images):
    """fastv halves at layer 1; gsearch's counts stay relative to the ORIGINAL 16 (ceil(0.75*16) = 12 > 8
    keeps all, ceil(0.25*16) = 4)."""
    spec = "fastv:layer=1:keep=0.5,gsearch:ratios=1/1/0.75/0.25"
    _, run, _, _ = run_ids(vlm, spec, PROMPTS, images, n=1)
    assert {l: k.tolist() for l, k in run.kept.items()} == {1: [8] * 3, 2: [8] * 3, 3: [4] * 3}
    assert Compression.parse(spec).tokens_per_layer(vlm.model, 16, 10) == [26, 18, 18, 14]


def test_all_ones_is_uncompressed(vlm, images):
    base, _, _, _ = run_ids(vlm, None, PROMPTS, images)
    for spec in ("gsearch:ratios=1", "gsearch:ratios=1/1/1/0.99", "psigmoid:k=1:l0=40"):  # ceil(0.99 * 16) = 16
        out, run, _, _ = run_ids(vlm, spec, PROMPTS, images)
        assert torch.equal(out, base), spec
        assert all(k.tolist() == [16] * 3 for k in run.kept.values())
    assert vlm.chat_batch(PROMPTS, [[i] for i in images], compression="gsearch:ratios=1/1/1/0.99", max_new_tokens=6) \
        == vlm.chat_batch(PROMPTS, [[i] for i in images], compression=None, max_new_tokens=6)


@pytest.mark.parametrize("spec", ["gsearch:ratios=1/1/0.5/0.25", "psigmoid:k=1.5:l0=2", "gsearch:ratios=1/0.3"])
def test_batch_invariant_and_cache_invariant(vlm, images, spec):
    base, _, _, _ = run_ids(vlm, None, PROMPTS, images)
    batch, run, ids, _ = run_ids(vlm, spec, PROMPTS, images)
    assert not torch.equal(batch, base)  # the schedule does prune something that matters
    uncached, _, _, _ = run_ids(vlm, spec, PROMPTS, images, use_cache=False)
    assert torch.equal(batch, uncached)
    visual = ids == vlm.config.image_token_id
    for i, (p, im) in enumerate(zip(PROMPTS, images)):
        single, run1, ids1, _ = run_ids(vlm, spec, [p], [im])
        assert torch.equal(single[0], batch[i]), p
        v1 = ids1 == vlm.config.image_token_id
        for layer, dec in run.decisions.items():  # the same visual tokens survive, whatever the batch
            assert torch.equal(dec[i][visual[i]], run1.decisions[layer][0][v1[0]])
    answers = vlm.chat_batch(PROMPTS, [[i] for i in images], compression=spec, max_new_tokens=6)
    assert answers == [vlm.chat(p, i, compression=spec, max_new_tokens=6) for p, i in zip(PROMPTS, images)]


def test_psigmoid_equals_gsearch_of_its_ratios(vlm, images):
    ratios = PSigmoid(k=1.5, l0=2).ratios(LAYERS)
    a, _, _, _ = run_ids(vlm, "psigmoid:k=1.5:l0=2", PROMPTS, images)
    b, _, _, _ = run_ids(vlm, search.schedule_spec(ratios), PROMPTS, images)
    assert torch.equal(a, b)


def test_keep_ranks_by_text_attention_of_previous_layer(vlm, images):
    """The tokens kept entering layer 1 are the top ceil(r N) by head- and row-mean attention from the
    positions after the last visual token, in layer 0 (checked against a hand computation)."""
    spec = "gsearch:ratios=1/0.25"
    _, run, ids, mask = run_ids(vlm, spec, PROMPTS[:1], images[:1], n=1)
    comp = vlm.resolve_compression(spec)
    inputs = vlm.processor(text=[vlm.build_prompt(PROMPTS[0], [images[0]])], images=[images[0]], compression=comp)
    x = vlm.model.embed_inputs(inputs["input_ids"], inputs["pixel_values"], None)
    lm = vlm.model.language_model
    t = x.shape[1]
    pos = default_position_ids(mask, t, 0, x.device)
    km = mask.bool()
    visual = (ids == vlm.config.image_token_id)[0]
    last_vis = int(visual.nonzero().max())
    rows = torch.arange(last_vis + 1, t)[None]
    with torch.inference_mode():
        att = _rows_fn(lm, 0, x, pos, km)(rows)[0].mean(0).mean(0)  # (T,)
        att = att.masked_fill(~visual, -1)
        expected = set(torch.topk(att, 4).indices.tolist())
    assert set((run.decisions[1][0] & visual).nonzero()[:, 0].tolist()) == expected


# ----------------------------------------------------------------------------- kvevict
def _prefill_with_cache(vlm, spec, prompts, imgs):
    comp = vlm.resolve_compression(spec)
    texts = [vlm.build_prompt(p, [i]) for p, i in zip(prompts, imgs)]
    inputs = vlm.processor(text=texts, images=list(imgs), compression=comp)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    x = vlm.model.embed_inputs(ids, inputs["pixel_values"], None, compression=comp)
    lm = vlm.model.language_model
    run = comp.lm_run(vlm.model, ids, mask) if comp is not None else None
    cache = lm.new_cache(x.shape[0], x.shape[1] + 4, dtype=x.dtype, device=x.device)
    pos = default_position_ids(mask, x.shape[1], 0, x.device).expand(x.shape[0], -1)
    m = None if bool(mask.all()) else mask
    with torch.inference_mode():
        h = lm(x, m, pos, cache, run=run)
    return lm, cache, run, ids, mask, x, pos, h


def test_kvevict_shrinks_cache_per_layer(vlm, images):
    lm, cache, run, ids, _, _, _, _ = _prefill_with_cache(vlm, "kvevict:keep=0.25:start=2", PROMPTS[:1], images[:1])
    t = ids.shape[1]
    assert cache.lengths == [t, t, t - 12, t - 12]  # 16 visual -> round(0.25 * 16) = 4 from layer 2 on
    assert [int(v.sum()) for v in run.layer_visual] == [16, 16, 4, 4]
    # batched, with left padding: each row keeps 4 visual entries; the cache is as wide as the longest row
    lm, cache, run, ids, mask, _, _, _ = _prefill_with_cache(vlm, "kvevict:count=3:start=1", PROMPTS, images)
    real = mask.sum(1)
    assert cache.lengths == [ids.shape[1]] + [int(real.max()) - 13] * 3
    assert [run.layer_masks[l].sum(1).tolist() for l in (1, 3)] == [(real - 13).tolist()] * 2
    assert all(v.sum(1).tolist() == [3] * 3 for v in run.layer_visual[1:])


def test_kvevict_keeps_top_entries_by_the_layers_own_last_token_attention(vlm, images):
    lm, cache, _, ids, mask, x, pos, _ = _prefill_with_cache(vlm, "kvevict:keep=0.25:start=2", PROMPTS[:1], images[:1])
    _, full, _, _, _, _, _, _ = _prefill_with_cache(vlm, None, PROMPTS[:1], images[:1])
    visual = (ids == vlm.config.image_token_id)[0]
    t = x.shape[1]
    km = mask.bool()
    h = x
    with torch.inference_mode():
        for layer, block in enumerate(lm.layers):  # the uncompressed prefill, by hand, layer by layer
            if layer >= 2:
                att = _rows_fn(lm, layer, h, pos, km)(torch.tensor([[t - 1]]))[0, :, 0].mean(0)  # (T,)
                att[~visual] = -1
                top = set(torch.topk(att, 4).indices.tolist())
                kept = sorted(top | set((~visual).nonzero()[:, 0].tolist()))
                assert cache.lengths[layer] == len(kept)
                assert torch.equal(cache.keys[layer][:, :, :len(kept)], full.keys[layer][:, :, kept])
                assert torch.equal(cache.values[layer][:, :, :len(kept)], full.values[layer][:, :, kept])
            cos, sin = lm.rotary(pos, h.dtype)
            h = block(h, cos, sin, causal_padding_mask(km, t), False, None, layer)


def test_kvevict_generates_and_keep_one_is_uncompressed(vlm, images):
    base, _, _, _ = run_ids(vlm, None, PROMPTS, images)
    assert torch.equal(run_ids(vlm, "kvevict:keep=1.0", PROMPTS, images)[0], base)
    evicted, _, _, _ = run_ids(vlm, "kvevict:keep=0.25:start=0", PROMPTS, images)
    assert evicted.shape == base.shape and torch.equal(evicted[:, 0], base[:, 0])  # prefill itself is unchanged
    assert not torch.equal(evicted, base)
    # the no-cache path ignores eviction: it is the uncompressed generation
    assert torch.equal(run_ids(vlm, "kvevict:keep=0.25:start=0", PROMPTS, images, use_cache=False)[0], base)
    answers = vlm.chat_batch(PROMPTS, [[i] for i in images], compression="kvevict:keep=0.25", max_new_tokens=6)
    spec = "kvevict:keep=0.25"
    assert answers == [vlm.chat(p, i, compression=spec, max_new_tokens=6) for p, i in zip(PROMPTS, images)]


def test_identity_eviction_through_compaction_is_uncompressed(vlm, images):
    """A policy keeping every entry still packs the cache (padding rows dropped, right-aligned): the
    answers must not change."""
    class KeepAll:
        kind, needs, kv_safe, batch_safe = "kv", frozenset(), False, True

        def evict(self, layer, state):
            first_real = state.key_mask.long().argmax(1, keepdim=True)  # (B, 1)
            assert state.attention_rows(first_real).shape[-1] == state.visual.shape[1]
            return torch.ones_like(state.visual)

    base, _, ids, mask = run_ids(vlm, None, PROMPTS, images)
    comp = Compression(Compression.parse("kvevict").methods, [KeepAll()])
    texts = [vlm.build_prompt(p, [i]) for p, i in zip(PROMPTS, images)]
    inputs = vlm.processor(text=texts, images=list(images))
    x = vlm.model.embed_inputs(inputs["input_ids"], inputs["pixel_values"], None)
    run = comp.lm_run(vlm.model, inputs["input_ids"], inputs["attention_mask"])
    cfg = vlm.generation_config(max_new_tokens=6, eos_token_id=[])
    with torch.inference_mode():
        out = generate(vlm.model.language_model, x, inputs["attention_mask"], cfg, run=run)
    assert torch.equal(out, base)
    assert [m.shape[1] for m in run.layer_masks] == [int(inputs["attention_mask"].sum(1).max())] * LAYERS


# ----------------------------------------------------------------------------- search
def test_greedy_search_finds_the_schedule_with_few_evaluations():
    need = [1, 1, 0.5, 0.25, 0.1, 0.1]  # the lowest ratio each layer tolerates
    calls = []

    def evaluate(r):
        calls.append(list(r))
        return 0.8 - 0.1 * sum(a < b for a, b in zip(r, need))

    out = search.greedy_search(evaluate, 6, eps=0.01)
    assert out == [1, 1, 0.5, 0.25, 0.1, 0.1]
    assert calls[0] == [1.0] * 6 and len(calls) == 10 <= 6 + len(search.GRID) - 1
    assert len({tuple(c) for c in calls}) == len(calls)  # memoised: no schedule evaluated twice
    # eps tolerates a small drop: a 0.005 loss per layer below need is accepted up to 2 layers
    soft = lambda r: 0.8 - 0.005 * sum(a < b for a, b in zip(r, need))  # noqa: E731
    assert search.greedy_search(soft, 6, eps=0.011)[1] < 1
    with pytest.raises(InputError, match="grid"):
        search.greedy_search(evaluate, 6, grid=(1, 0))


def test_fit_sigmoid_curve_recovers_parameters():
    r = PSigmoid(k=0.8, l0=9.5).ratios(24)
    k, l0 = search.fit_sigmoid_curve(r)
    assert k == pytest.approx(0.8, rel=0.05) and l0 == pytest.approx(9.5, abs=0.15)


def test_fit_psigmoid_respects_the_flops_budget(vlm):
    flops = search.prefill_flops_fn(vlm.config, 16, 10)
    assert flops([1.0] * LAYERS) == pytest.approx(1.0) and flops([1, 0.25]) < 0.7
    seen = []
    acc = lambda r: sum(r) / len(r)  # noqa: E731  more visual tokens, more accuracy

    def evaluate(r):
        seen.append(list(r))
        return acc(r)

    init = (2.0, 1.0)  # feasible: 0.63 of the uncompressed prefill
    kw = dict(num_layers=LAYERS, flops_fn=flops, budget=0.7, n_trials=10, init=init, seed=0)
    k, l0 = search.fit_psigmoid(evaluate, **kw)
    assert seen[0] == PSigmoid(*init).ratios(LAYERS)  # the enqueued starting point comes first
    assert len(seen) < 10  # over-budget trials are not evaluated
    assert all(flops(r) <= 0.7 for r in seen)
    best = PSigmoid(k, l0).ratios(LAYERS)
    assert flops(best) <= 0.7 and acc(best) == max(acc(r) for r in seen)
    assert search.fit_psigmoid(evaluate, **kw) == (k, l0)  # seeded
    with pytest.raises(InputError, match="no P-Sigmoid trial met the FLOPs budget"):
        search.fit_psigmoid(evaluate, LAYERS, flops, budget=0.01, n_trials=3)


def test_calibration_evaluator(vlm, images):
    preds = vlm.chat_batch(PROMPTS, [[i] for i in images], compression=None, max_new_tokens=8)
    items = [(p, im, a) for p, im, a in zip(PROMPTS, images, preds)]
    evaluate = search.calibration_evaluator(vlm, items, batch_size=2)
    assert evaluate([1.0] * LAYERS) == 1.0
    pruned = vlm.chat_batch(PROMPTS, [[i] for i in images], compression="gsearch:ratios=1/0.1", max_new_tokens=8)
    assert evaluate([1, 0.1, 0.1, 0.1]) == pytest.approx(sum(a == b for a, b in zip(pruned, preds)) / 3)
    with pytest.raises(InputError):
        evaluate([1, 0.5, 0.75])


def test_world_calibration_items_come_from_training_scenes():
    from llavakit.data.world import CHOICES, scene_split  # noqa: F401

    items = search.calibration_items("world-colour", 6, seed=0)
    assert len(items) == 6 and all(it.answer in CHOICES["world-colour"] for it in items)
    assert all(it.prompt.endswith("Answer with one word.") for it in items)
    again = search.calibration_items("world-colour", 6, seed=0)
    assert [it.prompt for it in items] == [it.prompt for it in again]
    with pytest.raises(InputError, match="no calibration data"):
        search.calibration_items("world-multiround", 2)


def test_world_calibration_scenes_are_train_half(monkeypatch):
    import llavakit.data.world as world
    from llavakit.data.world import scene_split

    splits = []
    real = world.sample_scene

    def spy(*a, **kw):
        s = real(*a, **kw)
        splits.append((kw.get("split"), scene_split(s)))
        return s

    monkeypatch.setattr(world, "sample_scene", spy)
    search.calibration_items("world-count", 4)
    assert splits and all(s == ("train", "train") for s in splits)


def test_easyvqa_calibration_uses_the_train_split():
    pytest.importorskip("easy_vqa")
    items = search.calibration_items("easyvqa", 5, seed=1)
    assert len(items) == 5 and all(it.id.startswith("easyvqa-train-") for it in items)
    assert all(it.answer in it.choices and it.prompt.endswith("Answer with one word.") for it in items)
    assert [it.id for it in items] == [it.id for it in search.calibration_items("easyvqa", 5, seed=1)]
    open_items = search.calibration_items("easyvqa-open", 12, seed=1)
    assert len(open_items) == 12 and all(it.answer not in ("yes", "no") for it in open_items)
    assert all(it.id.startswith("easyvqa-train-") for it in open_items)


def test_calibration_set_pools_tasks_in_order():
    pooled = search.calibration_set("world-colour, world-count", 3, seed=0)
    assert [it.id for it in pooled] == [it.id for it in search.calibration_items("world-colour", 3, seed=0)
                                        + search.calibration_items("world-count", 3, seed=0)]
    assert [it.id for it in search.calibration_set(["world-count"], 2)] == [
        it.id for it in search.calibration_items("world-count", 2)]
    for bad, match in (("world-colour,nope", "no calibration data for task 'nope'"), (" , ", "no calibration task"),
                       ("world-count,world-count", "listed twice")):
        with pytest.raises(InputError, match=match):
            search.calibration_set(bad, 2)


def test_cli_writes_a_schedule_gsearch_reads(vlm, model_dir, tmp_path, images, capsys):
    out = tmp_path / "sched.json"
    rc = search.main(["--model", str(model_dir), "--task", "world-colour", "--limit", "2", "--out", str(out),
                      "--grid", "1,0.5,0.1", "--max-new-tokens", "2", "--psigmoid", "--budget", "0.8",
                      "--trials", "3"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["method"] == "psigmoid" and data["num_layers"] == LAYERS
    assert data["relative_prefill_flops"] <= 0.8 and len(data["ratios"]) == LAYERS
    assert data["evaluations"] <= 1 + (LAYERS - 1) + 2 + 3
    h = Compression.parse(f"gsearch:file={out}").plugins[0]
    assert h.ratios(LAYERS) == pytest.approx(PSigmoid(data["k"], data["l0"]).ratios(LAYERS))
    vlm.chat("what ?", images[0], compression=f"gsearch:file={out}", max_new_tokens=2)
    assert search.main(["--task", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "no calibration data" in capsys.readouterr().err


def test_schedule_then_eviction_compose(vlm, images):
    """gsearch prunes the prefill (cache of layers >= 2 holds 8, then 4 visual entries); kvevict then
    keeps round(0.5 * 4) = 2 of the survivors in layer 3, scored on that layer's own pruned input."""
    spec = "gsearch:ratios=1/1/0.5/0.25,kvevict:keep=0.5:start=3"
    lm, cache, run, ids, _, _, _, _ = _prefill_with_cache(vlm, spec, PROMPTS[:1], images[:1])
    t = ids.shape[1]
    assert cache.lengths == [t, t, t - 8, t - 14]
    assert [int(v.sum()) for v in run.layer_visual] == [16, 16, 8, 2]
    out, _, _, _ = run_ids(vlm, spec, PROMPTS, images)
    assert out.shape == (3, 6)


def test_kvevict_cost_counts_the_evicted_cache(vlm, images):
    lm, cache, _, ids, _, _, _, _ = _prefill_with_cache(vlm, "kvevict:keep=0.25:start=2", PROMPTS[:1], images[:1])
    t = ids.shape[1]
    comp = vlm.resolve_compression("kvevict:keep=0.25:start=2")
    assert comp.kv_tokens_per_layer(vlm.model, 16, t - 16) == cache.lengths  # the analytic count is the real one
    full = vlm.cost(prompt_tokens=t - 16, new_tokens=5, image_sizes=[(32, 32)], compression=None)
    evicted = vlm.cost(prompt_tokens=t - 16, new_tokens=5, image_sizes=[(32, 32)], compression=comp)
    per_pos = full.kv_cache_bytes // (4 * (t + 4))  # bytes per cached position and layer
    assert evicted.kv_cache_bytes == per_pos * (sum(cache.lengths) + 4 * 4)
    assert evicted.lm_prefill_flops == full.lm_prefill_flops  # prefill is unchanged, only decode shrinks
    assert evicted.decode_flops < full.decode_flops
