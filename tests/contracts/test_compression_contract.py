"""The compression plug-in contract, checked for every registered method (architecture.md, timm style).

Parametrised over `llavakit.compression.method_names()` at collection time, so a method that registers
itself is checked without touching this file -- except for one line: its entry in `CONTRACT_SPECS`
(a spec that really compresses on the tiny model). A registered name without an entry fails.

The tiny model (tests/tiny_models.py "llava"): CLIP tower, 32 px views of 8 px patches -> a 4x4 grid,
16 visual tokens per image (CLS dropped); a 2-layer Llama LM of width 32 and vocabulary 128.

What every method must do (each test says which flag or kind it applies to):
- placeholders = features = `num_image_tokens` (processor, visual side and model agree);
- positions: valid (row, col) in the grid, unique, raster order;
- finite logits, valid ids, deterministic (fresh method objects, a different global seed);
- dtype kept (fp32 and bf16 models);
- batch_safe -> a left-padded batch of 3 gives the 3 single answers (and the same logits);
- kv_safe -> generation without a KV cache gives the same tokens as with one;
- the analytic cost never exceeds the uncompressed one, and its per-layer token counts are the ones
  the LM runner actually kept;
- bad parameters / budgets are refused when the spec is parsed (before any compute);
- a layer hook that does not declare `text_query` takes the same decision whatever the question.
"""

from __future__ import annotations

import pytest
import torch

import llavakit
from llavakit import InputError
from llavakit.compression import (BUDGET_PARAMS, Compression, KVPolicy, LayerHook, TokenStage, ViewResize,
                                  method_names, with_budget)
from llavakit.compression.base import KINDS, NEEDS
from llavakit.cost import lm_layer_prefill_flops
from tests.tiny_models import IMAGE_TOKEN, noise_images

# One spec per registered method, run on the tiny model above (16 visual tokens, 2 LM layers).
CONTRACT_SPECS = {
    "fastervlm": "fastervlm:keep=0.25",
    "fastv": "fastv:layer=1:keep=0.5",
    "hired": "hired:rho=0.25",
    "random": "random:keep=0.25",
    "pool": "pool:keep=0.25",
    "downsample": "downsample:keep=0.25",
    "gsearch": "gsearch:ratios=1/0.5",
    "psigmoid": "psigmoid:k=1:l0=1",
    "kvevict": "kvevict:keep=0.5:start=1",
    "yopo": "yopo:window=3:ffn_ratio=2",
}

NAMES = method_names()
PROTOCOLS = {"resize": ViewResize, "stage": TokenStage, "layer": LayerHook, "kv": KVPolicy}
PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]
NEW = 5


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def model_dir(tiny_llava_dir, one_torch_thread):
    return tiny_llava_dir


@pytest.fixture(scope="module")
def vlm(model_dir):
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def vlm_bf16(model_dir):
    return llavakit.load(str(model_dir), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def images():
    return noise_images(len(PROMPTS))


def spec_of(name: str) -> str:
    if name not in CONTRACT_SPECS:
        pytest.fail(f"compression method {name!r} is registered but has no entry in CONTRACT_SPECS of "
                    f"tests/contracts/test_compression_contract.py; add one (a spec that compresses on the "
                    f"tiny 4x4-patch, 2-layer LLaVA), so the method goes through the plug-in contract")
    return CONTRACT_SPECS[name]


def compression(vlm, name: str) -> Compression:
    comp = Compression.parse(spec_of(name))
    assert [m.name for m in comp.methods] == [name], f"CONTRACT_SPECS[{name!r}] must name only {name}"
    comp.check(vlm.model)
    return comp


def prefill(vlm, comp, prompts, images):
    """Last-position logits (B, V) of a left-padded prefill, the LMRun (or None) and the input ids."""
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(prompts, images)]
    inp = vlm.processor(text=texts, images=list(images), compression=comp)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    model, lm = vlm.model, vlm.model.language_model
    with torch.inference_mode():
        emb = model.embed_inputs(ids, inp["pixel_values"].to(vlm.dtype), compression=comp)  # (B, T, D)
        run = comp.lm_run(model, ids, mask) if comp is not None else None
        hidden = lm(emb, mask, None, None, run=run)  # (B, T', D)
        logits = lm.logits(hidden[:, -1]).float()  # (B, V)
    return logits, run, ids


def generate_ids(vlm, spec, prompts, images, **kw):
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(prompts, images)]
    comp = vlm.resolve_compression(spec)
    inp = vlm.processor(text=texts, images=list(images), compression=comp)
    out = vlm.generate(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], compression=spec,
                       max_new_tokens=NEW, **kw)
    return out[:, inp["input_ids"].shape[1]:]


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", NAMES)
def test_declares_its_contract(vlm, name):
    comp = compression(vlm, name)
    (p,) = comp.plugins
    assert p.kind in KINDS, f"{name}: kind {p.kind!r} is not one of {KINDS}"
    assert isinstance(p, PROTOCOLS[p.kind]), f"{name}: does not implement the {p.kind} protocol"
    assert isinstance(p.needs, frozenset) and p.needs <= NEEDS, f"{name}: needs {set(p.needs) - NEEDS} unknown"
    assert isinstance(p.kv_safe, bool) and isinstance(p.batch_safe, bool)
    assert name in BUDGET_PARAMS


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_refused_at_parse(name):
    spec = spec_of(name)
    with pytest.raises(InputError, match="no_such_param"):
        Compression.parse(spec + ":no_such_param=1")
    key = BUDGET_PARAMS[name]
    if key is None:
        return
    for bad in (0, 1.5, -0.25):
        with pytest.raises(InputError, match=key):
            Compression.parse(with_budget(spec, bad))


@pytest.mark.parametrize("name", NAMES)
def test_counts_agree(vlm, images, name):
    """Processor placeholders = features the visual side makes = model.num_image_tokens (num_out)."""
    comp = compression(vlm, name)
    text = vlm.build_prompt(PROMPTS[0], images[:2])  # two images in one prompt
    inp = vlm.processor(text=text, images=images[:2], compression=comp)
    view = tuple(inp["pixel_values"].shape[-2:])
    n = vlm.model.num_image_tokens(view, compression=comp)
    assert int((inp["input_ids"] == IMAGE_TOKEN).sum()) == 2 * n
    feats = comp.image_features(vlm.model, inp["pixel_values"])
    assert [f.shape for f in feats.features] == [(n, vlm.config.lm.hidden_size)] * 2
    assert [p.shape for p in feats.positions] == [(n, 2)] * 2
    full = vlm.model.num_image_tokens(view)
    if comp.plugins[0].kind in ("resize", "stage"):
        assert n < full, f"CONTRACT_SPECS[{name!r}] should compress (got {n} of {full} tokens)"
    else:
        assert n == full


@pytest.mark.parametrize("name", NAMES)
def test_positions_travel(vlm, images, name):
    """Each kept token's (row, col) is a patch of the grid; unique, in raster order."""
    comp = compression(vlm, name)
    inp = vlm.processor(text=vlm.build_prompt("what", images), images=images, compression=comp)
    feats = comp.image_features(vlm.model, inp["pixel_values"])
    h, w = comp.view_size(vlm.model, tuple(inp["pixel_values"].shape[-2:]))
    patch = vlm.config.vision.patch_size
    assert feats.grid == (h // patch, w // patch)
    for pos in feats.positions:
        assert pos.dtype == torch.long
        rows, cols = pos[:, 0], pos[:, 1]
        assert bool(((rows >= 0) & (rows < feats.grid[0]) & (cols >= 0) & (cols < feats.grid[1])).all()), pos
        flat = rows * feats.grid[1] + cols
        assert bool((flat[1:] > flat[:-1]).all()), f"{name}: positions not unique / raster order: {pos.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_finite_and_deterministic(vlm, images, name):
    """Same call twice (fresh method objects, another global seed) -> the same logits and tokens."""
    comp = compression(vlm, name)
    torch.manual_seed(1)
    a, _, _ = prefill(vlm, comp, PROMPTS, images)
    torch.manual_seed(2)
    b, _, _ = prefill(vlm, compression(vlm, name), PROMPTS, images)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    torch.manual_seed(3)
    ids1 = generate_ids(vlm, spec_of(name), PROMPTS, images)
    torch.manual_seed(4)
    ids2 = generate_ids(vlm, spec_of(name), PROMPTS, images)
    assert torch.equal(ids1, ids2)
    assert ids1.shape[0] == 3 and bool(((ids1 >= 0) & (ids1 < vlm.config.lm.vocab_size)).all())


@pytest.mark.parametrize("name", NAMES)
def test_dtype_kept(vlm, vlm_bf16, images, name):
    for model in (vlm, vlm_bf16):
        comp = compression(model, name)
        inp = model.processor(text=model.build_prompt("what", images[:1]), images=images[:1], compression=comp)
        feats = comp.image_features(model.model, inp["pixel_values"])
        want = model.model.multi_modal_projector.linear_1.weight.dtype
        assert all(f.dtype == want for f in feats.features), (name, want)
        logits, _, _ = prefill(model, comp, PROMPTS, images)
        assert bool(torch.isfinite(logits).all()), f"{name}: non-finite logits in {want}"
    assert isinstance(vlm_bf16.chat(PROMPTS[0], images[0], compression=spec_of(name), max_new_tokens=3), str)


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariant(vlm, images, name):
    """3 prompts of different lengths (different left padding), different images: batch = singles."""
    comp = compression(vlm, name)
    if not comp.batch_safe:
        pytest.skip(f"{name} declares batch_safe = False")
    spec = spec_of(name)
    singles = [vlm.chat(p, im, compression=spec, max_new_tokens=NEW) for p, im in zip(PROMPTS, images)]
    batch = vlm.chat_batch(PROMPTS, [[im] for im in images], compression=spec, max_new_tokens=NEW)
    assert batch == singles
    logits, _, _ = prefill(vlm, comp, PROMPTS, images)
    for i in range(3):
        one, _, _ = prefill(vlm, comp, PROMPTS[i:i + 1], images[i:i + 1])
        torch.testing.assert_close(logits[i], one[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_cached_generation(vlm, images, name):
    """Generation with and without a KV cache gives the same tokens (left-padded batch of 3)."""
    comp = compression(vlm, name)
    if not comp.kv_safe:
        pytest.skip(f"{name} declares kv_safe = False")
    cached = generate_ids(vlm, spec_of(name), PROMPTS, images)
    uncached = generate_ids(vlm, spec_of(name), PROMPTS, images, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", NAMES)
def test_cost_follows_what_ran(vlm, images, name):
    """Analytic cost <= uncompressed, and its per-layer token counts are those the runner kept."""
    comp = compression(vlm, name)
    spec = spec_of(name)
    _, run, ids = prefill(vlm, comp, PROMPTS[:1], images[:1])
    n_vis = int((ids == IMAGE_TOKEN).sum())
    text = ids.shape[1] - n_vis
    view = (vlm.config.input_size, vlm.config.input_size)
    assert n_vis == comp.num_image_tokens(vlm.model, view)
    full = vlm.cost(text, 4, image_sizes=[view], compression=None)
    cost = vlm.cost(text, 4, image_sizes=[view], compression=spec)
    assert cost.visual_tokens["llm"] == n_vis <= full.visual_tokens["llm"]
    assert cost.vision_flops <= full.vision_flops
    assert cost.lm_prefill_flops <= full.lm_prefill_flops
    assert cost.total_flops <= full.total_flops
    # visual tokens each LM layer actually processed: the count kept at the last pruning at or before it
    n_layers = vlm.config.lm.num_hidden_layers
    kept = {} if run is None else {l: int(k[0]) for l, k in run.kept.items()}
    actual, cur = [], n_vis
    for layer in range(n_layers):
        cur = kept.get(layer, cur)
        actual.append(cur + text)
    assert comp.tokens_per_layer(vlm.model, n_vis, text) == actual
    lc = vlm.config.lm
    assert list(cost.lm_prefill_flops_per_layer) == [lm_layer_prefill_flops(lc, k) for k in actual]


@pytest.mark.parametrize("name", NAMES)
def test_budget_is_monotone(vlm, name):
    """A smaller budget never costs more (budget-matched evaluation sets this parameter)."""
    if BUDGET_PARAMS.get(name) is None:
        pytest.skip(f"{name} has no budget parameter")
    view = (vlm.config.input_size, vlm.config.input_size)
    costs = [vlm.cost(20, 4, image_sizes=[view], compression=with_budget(spec_of(name), r)) for r in (1.0, 0.5, 0.25)]
    for big, small in zip(costs, costs[1:]):
        assert small.visual_tokens["llm"] <= big.visual_tokens["llm"]
        assert small.lm_prefill_flops <= big.lm_prefill_flops


@pytest.mark.parametrize("name", NAMES)
def test_text_query_declared(vlm, images, name):
    """A layer hook that does not declare `text_query` must keep the same visual tokens whatever the
    question (the text before the image is the same template prefix, so visual states are identical)."""
    comp = compression(vlm, name)
    if comp.plugins[0].kind != "layer" or "text_query" in comp.needs:
        pytest.skip(f"{name}: not a layer hook, or declares text_query")
    picks = []
    for q in PROMPTS[:2]:
        _, run, ids = prefill(vlm, comp, [q], images[:1])
        vis = ids[0] == IMAGE_TOKEN
        first = int(vis.nonzero()[0])
        picks.append({l: ((d[0] & vis).nonzero()[:, 0] - first).tolist() for l, d in run.decisions.items()})
    assert picks[0] == picks[1], f"{name} reads the question: declare needs 'text_query'"
