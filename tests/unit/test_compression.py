"""The compression core: spec grammar, refusals before any compute, per-instance defaults, identities,
FastV's / FasterVLM's choices against hand computations, the LM runner's packing and `KVCache.compact`.

Tiny model (tests/tiny_models.py "llava"): CLIP tower, 4x4 patch grid (16 visual tokens, CLS dropped,
feature layer -2 of 3), 2-layer Llama LM. Every contract check of each registered method lives in
tests/contracts/test_compression_contract.py.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.api import VLM
from llavakit.compression import (BUDGET_PARAMS, Compression, MethodSpec, format_spec, method_names, parse_spec,
                                  with_budget)
from llavakit.compression.runner import _pack_index
from llavakit.layers.kv_cache import KVCache
from llavakit.models.vlm import LlavaModel
from tests.tiny_models import IMAGE_TOKEN, build, noise_images

PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]
NEW = 5


@pytest.fixture(scope="module")
def model_dir(tiny_llava_dir, one_torch_thread):
    return tiny_llava_dir


@pytest.fixture(scope="module")
def vlm(model_dir):
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def images():
    return noise_images(len(PROMPTS))


def prefill(vlm, comp, prompts, images):
    """Last-position logits (B, V), the LMRun (or None), input ids, mask and input embeddings."""
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(prompts, images)]
    inp = vlm.processor(text=texts, images=list(images), compression=comp)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    model, lm = vlm.model, vlm.model.language_model
    with torch.inference_mode():
        emb = model.embed_inputs(ids, inp["pixel_values"], compression=comp)  # (B, T, D)
        run = comp.lm_run(model, ids, mask) if comp is not None else None
        logits = lm.logits(lm(emb, mask, None, None, run=run)[:, -1])  # (B, V)
    return logits, run, ids, mask, emb


def answers(vlm, images, **kw):
    """The 3 answers of one left-padded batch."""
    return vlm.chat_batch(PROMPTS, [[im] for im in images], max_new_tokens=NEW, **kw)


@contextmanager
def no_compute(vlm):
    """Counts calls of the vision tower and the LM (forward pre-hooks on this instance only)."""
    calls: list[str] = []
    hooks = [vlm.model.vision_tower.register_forward_pre_hook(lambda *_: calls.append("vision")),
             vlm.model.language_model.register_forward_pre_hook(lambda *_: calls.append("lm"))]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- spec grammar
def test_parse_single():
    assert parse_spec("fastervlm:keep=0.1") == (MethodSpec("fastervlm", {"keep": 0.1}),)
    assert parse_spec(MethodSpec("fastv", {"layer": 2})) == (MethodSpec("fastv", {"layer": 2}),)
    assert parse_spec("fastv") == (MethodSpec("fastv", {}),)
    for off in (None, "", "none", "off", "[]", " None "):
        assert parse_spec(off) == ()


def test_parse_lists_brackets_and_yaml():
    want = (MethodSpec("hired", {"rho": 0.2}), MethodSpec("fastv", {"layer": 2, "keep": 0.5}))
    assert parse_spec("hired:rho=0.2,fastv:layer=2:keep=0.5") == want
    assert parse_spec(" [ hired:rho=0.2 , fastv : layer=2 : keep=0.5 ] ") == want
    assert parse_spec(["hired:rho=0.2", {"fastv": {"layer": 2, "keep": 0.5}}]) == want
    assert parse_spec(yaml.safe_load("- hired:rho=0.2\n- fastv: {layer: 2, keep: 0.5}\n")) == want
    assert parse_spec(yaml.safe_load("compression: [hired:rho=0.2, 'fastv:layer=2:keep=0.5']")["compression"]) == want
    assert parse_spec({"fastervlm": None}) == (MethodSpec("fastervlm", {}),)


def test_value_types():
    (m,) = parse_spec("x:i=3:neg=-2:f=0.25:e=1e-3:t=true:F=False:n=none:nl=null:tup=1/0.5/0.25:s=abc")
    assert m.params == {"i": 3, "neg": -2, "f": 0.25, "e": 0.001, "t": True, "F": False, "n": None, "nl": None,
                        "tup": (1, 0.5, 0.25), "s": "abc"}
    assert type(m.params["i"]) is int and type(m.params["f"]) is float and m.params["t"] is True


@pytest.mark.parametrize("spec", [
    "fastervlm:keep=0.1",
    "[hired:rho=0.2, fastv:layer=2:keep=0.5]",
    "x:a=1:b=0.5:c=true:d=none:e=1/0.5/0.25:f=word",
    ["fastervlm:count=58", {"gsearch": {"ratios": [1, 0.5, 0.25]}}],
])
def test_format_spec_round_trip(spec):
    canon = format_spec(parse_spec(spec))
    assert format_spec(parse_spec(canon)) == canon
    again = parse_spec(canon)
    assert [m.name for m in again] == [m.name for m in parse_spec(spec)]
    assert all(dict(a.params) == {k: tuple(v) if isinstance(v, list) else v for k, v in b.params.items()}
               for a, b in zip(again, parse_spec(spec)))


def test_format_spec_canonical():
    assert format_spec(()) == "none"
    assert format_spec(parse_spec(" [ hired : rho=0.2 , fastv:layer=2:keep=0.5 ] ")) == "hired:rho=0.2,fastv:layer=2:keep=0.5"
    assert format_spec(parse_spec({"gsearch": {"ratios": [1, 0.5], "on": True, "x": None}})) == \
        "gsearch:ratios=1/0.5:on=true:x=none"
    assert Compression.parse("[ fastervlm : keep=0.25 ]").spec == "fastervlm:keep=0.25"


@pytest.mark.parametrize("bad", ["fastervlm:keep", ":keep=1", "fastervlm:keep=1:keep=2", "fastervlm:=1",
                                 "fastervlm:keep=0.1,", "fast vlm:keep=1", {"a": {}, "b": {}}, {"fastv": 3}, 3])
def test_bad_syntax(bad):
    with pytest.raises(InputError):
        parse_spec(bad)


# ----------------------------------------------------------------------------- refusals before any compute
def test_unknown_method_lists_valid_names(tmp_path):
    with pytest.raises(InputError, match="nosuch") as e:
        Compression.parse("nosuch:keep=0.5")
    for name in method_names():
        assert name in str(e.value)
    with pytest.raises(InputError, match="nosuch"):  # before the (missing) directory is even looked at
        llavakit.load(str(tmp_path / "no_model_here"), compression="fastervlm:keep=0.5,nosuch")


@pytest.mark.parametrize("spec, match", [
    ("nosuch:keep=0.5", "fastervlm"),
    ("fastervlm:keep", "key=value"),
    ("fastervlm:keep=0", "keep"),
    ("fastervlm:keep=1.5", "keep"),
    ("fastervlm:keep=-0.5", "keep"),
    ("fastervlm:keep=true", "keep"),
    ("fastervlm:count=17", "17"),  # the tiny tower gives 16 tokens
    ("fastervlm:count=0", "count"),
    ("fastervlm:keep=0.5:count=4", "not both"),
    ("fastervlm:bogus=1", "bogus"),
    ("fastv:kep=0.5", "kep"),
    ("fastv:layer=0", "layer"),
    ("fastv:layer=2", "outside"),  # the tiny LM has layers 0 and 1
    ("fastv:layer=1:keep=2", "keep"),
    ("fastv:layer=1,fastervlm:keep=0.5", "pipeline order"),  # a stage after an in-LLM hook
    ("fastv:layer=1:keep=0.5,fastv:layer=1:keep=0.25", "both prune"),
])
def test_refused_before_any_compute(vlm, images, spec, match):
    with no_compute(vlm) as calls:
        with pytest.raises(InputError, match=match):
            vlm.chat(PROMPTS[0], images[0], compression=spec, max_new_tokens=2)
    assert calls == []


def test_fastv_count_above_visual_tokens_refused_before_compute(vlm, images):
    """The prompt's visual-token count is known from input_ids before the tower runs."""
    with no_compute(vlm) as calls:
        with pytest.raises(InputError, match="17"):
            vlm.chat(PROMPTS[0], images[0], compression="fastv:layer=1:count=17", max_new_tokens=2)
    assert calls == [], f"refused only after {calls} ran"


def test_cls_attention_needs_a_cls_token(vlm):
    cfg = vlm.config
    siglip = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, family="siglip",
                                                                 hidden_act="gelu_pytorch_tanh"),
                                 vision_feature_select_strategy="full")
    model = LlavaModel(siglip)
    assert not model.vision_tower.has_cls
    with pytest.raises(InputError, match=r"(?s)fastervlm.*CLS.*siglip"):
        Compression.parse("fastervlm:keep=0.5").check(model)
    with pytest.raises(InputError, match="CLS"):
        VLM(model, vlm.processor, compression="fastervlm:keep=0.5")
    Compression.parse("fastv:layer=1:keep=0.5").check(model)  # needs no CLS


def _skip_unless(*names):
    missing = [n for n in names if n not in method_names()]
    if missing:
        pytest.skip(f"not registered yet: {', '.join(missing)}")


def test_impossible_compositions(vlm):
    _skip_unless("downsample")
    for spec, match in [("downsample:keep=0.5,downsample:keep=0.5", "at most one resize"),
                        ("fastervlm:keep=0.5,downsample:keep=0.5", "pipeline order")]:
        with pytest.raises(InputError, match=match):
            vlm.resolve_compression(spec)
    vlm.resolve_compression("downsample:keep=0.5,fastervlm:keep=0.5,fastv:layer=1:keep=0.5")  # in order: fine


def test_full_grid_method_after_a_stage_refused(vlm):
    _skip_unless("yopo")
    assert "full_grid" in Compression.parse("yopo:window=3:ffn_ratio=2").needs
    with pytest.raises(InputError, match="full"):
        vlm.resolve_compression("fastervlm:keep=0.5,yopo:window=3:ffn_ratio=2")


def test_anyres_model_refused(tmp_path, images):
    d = build("llava_next", tmp_path / "next")
    with pytest.raises(InputError, match="anyres"):
        llavakit.load(str(d), compression="fastervlm:keep=0.5")
    nxt = llavakit.load(str(d))
    with no_compute(nxt) as calls:
        with pytest.raises(InputError, match="anyres"):
            nxt.chat(PROMPTS[0], images[0], compression="fastv:layer=1:keep=0.5", max_new_tokens=2)
    assert calls == []


# ----------------------------------------------------------------------------- instance defaults, no global state
def test_load_sets_default_and_none_turns_off(model_dir, vlm, images):
    spec = "fastervlm:keep=0.25"
    plain = answers(vlm, images=images)
    compressed = answers(vlm, images=images, compression=spec)
    assert plain != compressed, "the tiny model should answer differently with 4 of 16 visual tokens"
    comp_vlm = llavakit.load(str(model_dir), compression=spec)
    assert comp_vlm.compression.spec == spec
    assert answers(comp_vlm, images=images) == compressed
    assert answers(comp_vlm, images=images, compression=None) == plain
    assert answers(comp_vlm, images=images, compression="none") == plain
    view = [(32, 32)]
    assert comp_vlm.cost(10, 1, view).visual_tokens["llm"] == 4
    assert comp_vlm.cost(10, 1, view, compression=None).visual_tokens["llm"] == 16
    assert vlm.compression is None and answers(vlm, images=images) == plain


def test_two_instances_keep_their_own_compression(model_dir, vlm, images):
    specs = {"a": "fastervlm:keep=0.25", "b": "fastv:layer=1:keep=0.25"}
    want = {k: answers(vlm, images=images, compression=s) for k, s in specs.items()}
    assert want["a"] != want["b"]
    inst = {k: llavakit.load(str(model_dir), compression=s) for k, s in specs.items()}
    for _ in range(2):  # interleaved calls
        for k in ("a", "b"):
            assert answers(inst[k], images=images) == want[k]
    assert answers(vlm, images=images) == answers(inst["a"], images=images, compression=None)


@pytest.mark.parametrize("spec", ["fastervlm:keep=1.0", "fastv:layer=1:keep=1.0", "fastervlm:count=16"])
def test_keeping_everything_is_the_uncompressed_model(vlm, images, spec):
    comp = vlm.resolve_compression(spec)
    assert answers(vlm, images=images, compression=spec) == answers(vlm, images=images, compression=None)
    a = prefill(vlm, comp, PROMPTS, images)[0]
    b = prefill(vlm, None, PROMPTS, images)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_with_budget():
    assert with_budget("fastv:layer=2", 0.1) == "fastv:layer=2:keep=0.1"
    assert with_budget("fastv:layer=2:keep=0.5", 0.25) == "fastv:layer=2:keep=0.25"
    assert with_budget("fastervlm:count=58", 0.5) == "fastervlm:keep=0.5"
    assert Compression.parse(with_budget("fastervlm", 0.5)).plugins[0].num_out(16) == 8
    for name, key in BUDGET_PARAMS.items():
        if key is None:
            assert with_budget(name, 0.5) == name
    with pytest.raises(InputError, match="fastervlm"):
        with_budget("nosuch:keep=0.5", 0.5)


def test_with_budget_in_a_fresh_process():
    """with_budget registers the built-in methods itself (it used to fail in a fresh interpreter before
    anything else had imported llavakit.compression.methods)."""
    import subprocess
    import sys

    code = "from llavakit.compression import with_budget; print(with_budget('fastervlm:pos=original', 0.1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fastervlm:pos=original:keep=0.1"


def test_with_budget_takes_one_method():
    with pytest.raises(InputError):  # a clear message, not "too many values to unpack"
        with_budget("fastervlm:keep=0.5,fastv:layer=1", 0.5)


# ----------------------------------------------------------------------------- methods against hand computations
def test_fastv_keeps_highest_last_token_attention(vlm, images):
    """Entering layer 1, FastV keeps the 4 of 16 visual tokens with the highest head-mean attention of
    the last prompt token in layer 0, per row, whatever the row's left padding."""
    comp = vlm.resolve_compression("fastv:layer=1:keep=0.25")
    _, run, ids, mask, emb = prefill(vlm, comp, PROMPTS, images)
    lm = vlm.model.language_model
    assert run.kept[1].tolist() == [4, 4, 4]
    for i in range(3):
        real = mask[i].bool()
        row_ids, row_emb = ids[i][real], emb[i][real][None]  # the row alone, unpadded
        att = lm.layer_attention_rows(0, row_emb, None, torch.tensor([row_ids.shape[0] - 1]))  # (1, H, 1, T)
        score = att[0, :, 0].mean(0)  # (T,)
        vis = (row_ids == IMAGE_TOKEN).nonzero()[:, 0]
        want = vis[score[vis].argsort(descending=True)[:4]].sort().values
        got = (run.decisions[1][i][real] & (row_ids == IMAGE_TOKEN)).nonzero()[:, 0]
        assert got.tolist() == want.tolist()


def test_fastervlm_keeps_highest_cls_attention_and_their_features(vlm, images):
    """FasterVLM keeps the patches with the highest head-mean [CLS] attention of the feature layer
    (hidden state -2 of 3 layers = the output of layer 1); their features are the uncompressed ones."""
    model = vlm.model
    pv = vlm.processor(text="<image> <image> what", images=images[:2])["pixel_values"]
    comp = vlm.resolve_compression("fastervlm:keep=0.25")
    out = comp.image_features(model, pv)
    with torch.inference_mode():
        _, attn = model._select_with_attention(pv, {1: slice(0, 1)})
        full = model.get_image_features(pv)  # per image (16, D)
    score = attn[1][:, :, 0, 1:].mean(1)  # (N, 16) CLS column dropped
    for i in range(2):
        flat = out.positions[i][:, 0] * out.grid[1] + out.positions[i][:, 1]
        assert flat.tolist() == score[i].argsort(descending=True)[:4].sort().values.tolist()
        torch.testing.assert_close(out.features[i], full[i][flat], atol=1e-5, rtol=1e-5)


def test_stage_after_stage_follows_positions(vlm, images):
    """Keeping half twice by the same score = keeping a quarter once (the second stage reads scores
    through the positions the first one kept)."""
    pv = vlm.processor(text="<image> what", images=images[:1])["pixel_values"]
    twice = vlm.resolve_compression("fastervlm:keep=0.5,fastervlm:keep=0.5").image_features(vlm.model, pv)
    once = vlm.resolve_compression("fastervlm:count=4").image_features(vlm.model, pv)
    assert twice.positions[0].tolist() == once.positions[0].tolist()
    torch.testing.assert_close(twice.features[0], once.features[0])


def test_positions_valid_when_the_cls_token_is_a_feature(tmp_path, images):
    """With vision_feature_select_strategy "full" the CLS token is one of the features (17 tokens for a
    4x4 grid). Either compression refuses such a model, or every position stays inside the grid and,
    keeping everything, the 16 patches are all named."""
    m = llavakit.load(str(build("llava_multilayer", tmp_path / "ml")))
    try:
        comp = m.resolve_compression("fastervlm:keep=1.0")
    except InputError:
        return  # refusing is a valid answer
    pv = m.processor(text="<image> what", images=images[:1])["pixel_values"]
    out = comp.image_features(m.model, pv)
    grid, pos = out.grid, out.positions[0]
    inside = (pos[:, 0] >= 0) & (pos[:, 0] < grid[0]) & (pos[:, 1] >= 0) & (pos[:, 1] < grid[1])
    assert bool(inside.all()), f"positions outside the {grid} grid: {pos[~inside].tolist()}"
    assert {tuple(p) for p in pos.tolist()} == {(r, c) for r in range(grid[0]) for c in range(grid[1])}


# ----------------------------------------------------------------------------- the LM runner
class _RaggedHook:
    """A test-only layer hook (not registered): entering layer 1, each row keeps its visual tokens whose
    hidden state's first feature is above that row's visual mean -- a per-row, content-based choice, so
    rows keep different numbers of tokens."""

    kind = "layer"
    needs = frozenset()
    kv_safe = True
    batch_safe = True

    def prune_layers(self, num_layers):
        return (1,)

    def keep(self, state):
        x = state.hidden[..., 0].float()  # (B, T)
        vis = state.visual
        mean = (x * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True)  # (B, 1)
        return vis & (x > mean)

    def visual_schedule(self, num_layers, num_visual):
        return [num_visual] * num_layers


def test_runner_ragged_pruning_batch_equals_singles(vlm, images):
    comp = Compression((MethodSpec("ragged"),), [_RaggedHook()])
    comp.check(vlm.model)
    logits, run, *_ = prefill(vlm, comp, PROMPTS, images)
    kept = run.kept[1].tolist()
    assert len(set(kept)) > 1 and all(0 < k < 16 for k in kept), kept  # ragged rows
    for i in range(3):
        one, one_run, *_ = prefill(vlm, comp, PROMPTS[i:i + 1], images[i:i + 1])
        assert one_run.kept[1].tolist() == [kept[i]]
        torch.testing.assert_close(logits[i], one[0], atol=1e-4, rtol=1e-4)
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(PROMPTS, images)]
    inp = vlm.processor(text=texts, images=images, compression=comp)
    gen = [vlm.generate(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], compression=comp,
                        max_new_tokens=NEW, use_cache=c) for c in (True, False)]
    assert torch.equal(gen[0], gen[1])


def test_pack_index_right_aligns_ragged_rows():
    keep = torch.tensor([[1, 0, 1, 1, 0],
                         [0, 1, 0, 0, 0],
                         [0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0]], dtype=torch.bool)
    idx, valid = _pack_index(keep)
    assert idx.tolist() == [[0, 2, 3], [0, 0, 1], [0, 0, 0], [0, 1, 2]]
    assert valid.tolist() == [[True, True, True], [False, False, True], [False, False, False], [True, True, True]]
    idx, valid = _pack_index(torch.zeros(2, 3, dtype=torch.bool))
    assert idx.shape == valid.shape == (2, 0)


def test_kv_cache_compact():
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=2, max_len=8, head_dim=3)
    k = torch.arange(2 * 2 * 5 * 3, dtype=torch.float32).reshape(2, 2, 5, 3)  # (B, Hkv, S, Dh)
    for layer in (0, 1):
        cache.update(layer, k, -k)
    index = torch.tensor([[0, 2, 4], [3, 1, 4]])  # (B, S'): per-row positions, in that order
    cache.compact(0, index)
    assert cache.seq_len(0) == 3 and cache.seq_len(1) == 5
    g = index[:, None, :, None].expand(-1, 2, -1, 3)
    assert torch.equal(cache.keys[0][:, :, :3], k.gather(2, g))
    assert torch.equal(cache.values[0][:, :, :3], -k.gather(2, g))
    assert torch.equal(cache.keys[1][:, :, :5], k)  # other layers untouched
    new = torch.full((2, 2, 1, 3), 7.0)
    keys, values = cache.update(0, new, -new)  # appends after the compacted entries
    assert keys.shape[2] == 4 and torch.equal(keys[:, :, :3], k.gather(2, g)) and torch.equal(keys[:, :, 3:], new)
    assert torch.equal(values[:, :, 3:], -new)
