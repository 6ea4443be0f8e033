"""YOPO (llavakit/llm_hooks/yopo.py) against straightforward masked reference implementations.

The tiny model (tests/tiny_models.py "llava"): 32 px views of 8 px patches -> a 4x4 grid, 16 visual
tokens per image; a 2-layer Llama LM, width 32, 4 query heads / 2 K/V heads, intermediate 64.

The references below run the plain blocks with dense attention and masks (nothing skipped):
window = a boolean (B, 1, T, T) mask whose V x V block is the w x w neighbourhood; inactive heads =
a per-head mask hiding the visual keys + their V-row outputs zeroed before o_proj; ffn_ratio = the
upper intermediate channels zeroed on V rows; layercut = the visual keys hidden from that layer on.
YOPO must give the same numbers while computing less.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llavakit
from llavakit import InputError
from llavakit.compression import Compression
from llavakit.config import LMConfig
from llavakit.layers.attention import causal_padding_mask, sdpa
from llavakit.layers.rope import default_position_ids
from llavakit.llm_hooks import yopo
from tests.tiny_models import IMAGE_TOKEN, noise_images

PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]
# per layer, per query head (heads 0,1 share K/V head 0; heads 2,3 share K/V head 1):
# layer 0 leaves K/V head 1 unread on V rows; layer 1 mixes both groups
HEADS = [[True, True, False, False], [False, True, False, True]]


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir, one_torch_thread):
    return llavakit.load(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def images():
    return noise_images(4)


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    return yopo.save_heads({"active": HEADS}, tmp_path_factory.mktemp("heads") / "heads.json")


def _inputs(vlm, prompts, images, two_images=False):
    if two_images:  # text between the two images, so each is its own visual run
        texts = [vlm.build_prompt(f"<image> {p} <image> and", [a, b]) for p, a, b in zip(prompts, images, images[1:])]
        flat = [x for a, b in zip(images, images[1:len(prompts) + 1]) for x in (a, b)]
    else:
        texts = [vlm.build_prompt(p, [im]) for p, im in zip(prompts, images)]
        flat = list(images[:len(prompts)])
    return vlm.processor(text=texts, images=flat)


def _yopo_hidden(vlm, spec, inp, cache=None):
    comp = Compression.parse(spec)
    comp.check(vlm.model)
    lm = vlm.model.language_model
    with torch.inference_mode():
        emb = vlm.model.embed_inputs(inp["input_ids"], inp["pixel_values"], compression=comp)
        run = comp.lm_run(vlm.model, inp["input_ids"], inp["attention_mask"])
        return lm(emb, inp["attention_mask"], None, cache, run=run), run


def _grid_coords(vis: torch.Tensor):
    """(B, T) visual flags -> image number, row, col per position (4x4 grids; a run of 32 is two images)."""
    img = torch.full(vis.shape, -1, dtype=torch.long)
    rc = torch.zeros(vis.shape + (2,), dtype=torch.long)
    for b in range(vis.shape[0]):
        k, n = -1, 0
        for t in range(vis.shape[1]):
            if vis[b, t]:
                if t == 0 or not vis[b, t - 1] or n == 16:
                    k, n = k + 1, 0
                img[b, t], rc[b, t] = k, torch.tensor([n // 4, n % 4])
                n += 1
    return img, rc


@torch.inference_mode()
def reference(vlm, inp, *, window=0, bidirectional=True, heads=None, ffn_ratio=1, layercut=None, start=0,
              extra_ids=None, dropped=None):
    """Dense masked YOPO: hidden states (B, T, D) after the final norm. `extra_ids` (B, N): generated
    text tokens appended after the prompt (decode semantics: they are text queries). `dropped`:
    (layer, (B, T) bool) positions another hook removed before that layer (hidden as keys from then on)."""
    model, lm = vlm.model, vlm.model.language_model
    ids, am = inp["input_ids"], inp["attention_mask"].bool()
    emb = model.embed_inputs(ids, inp["pixel_values"])
    if extra_ids is not None:
        emb = torch.cat([emb, lm.embed(extra_ids)], 1)
        am = torch.cat([am, torch.ones_like(extra_ids, dtype=torch.bool)], 1)
        ids = torch.cat([ids, extra_ids], 1)
    b, t = ids.shape
    vis = ids == IMAGE_TOKEN
    pos = default_position_ids(am.long(), t, 0, emb.device).expand(b, t)
    cos, sin = lm.rotary(pos, emb.dtype)
    base = causal_padding_mask(am, t)  # (B, 1, T, T)
    img, rc = _grid_coords(vis)
    half = (window - 1) // 2
    near = ((img[:, :, None] == img[:, None, :]) & (img[:, :, None] >= 0)
            & ((rc[:, :, None] - rc[:, None, :]).abs().amax(-1) <= half))  # (B, T, T)
    vv = vis[:, :, None] & vis[:, None, :]
    h = emb
    for i, block in enumerate(lm.layers):
        attn, mlp = block.self_attn, block.mlp
        on = i >= start and (layercut is None or i < layercut)
        m = base.clone()
        if on and window:
            win = near if bidirectional else near & base[:, 0]
            m = torch.where(vv[:, None], win[:, None], m)
        m = m.expand(b, attn.num_heads, t, t).clone()
        if layercut is not None and i >= layercut:
            m &= ~vis[:, None, None, :]
        if dropped is not None and i >= dropped[0]:
            m &= ~dropped[1][:, None, None, :]
        off = [] if not (on and heads) else [j for j, a in enumerate(heads[i]) if not a]
        for j in off:
            m[:, j] &= ~vis[:, None, :]
        q, k, v = attn.qkv(block.input_layernorm(h), cos, sin)
        out = sdpa(q, k, v, m)  # (B, H, T, Dh)
        for j in off:
            out[:, j] = out[:, j] * (~vis)[..., None]
        x = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        y = block.post_attention_layernorm(x)
        g, u = mlp.gate_proj(y), mlp.up_proj(y)
        if on and ffn_ratio > 1:
            cut = torch.zeros_like(g, dtype=torch.bool)
            cut[..., g.shape[-1] // ffn_ratio:] = True
            cut &= vis[..., None]
            g, u = g.masked_fill(cut, 0.0), u.masked_fill(cut, 0.0)
        h = x + mlp.down_proj(mlp.act(g) * u)
    return lm.model.norm(h)


def _close_on_real(a, b, mask, atol=1e-5):
    m = mask.bool()
    torch.testing.assert_close(a[m], b[m], atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("spec", ["yopo:window=7:bidirectional=false:ffn_ratio=1",
                                  "yopo:window=0:ffn_ratio=1", "yopo:window=9:bidirectional=false:ffn_ratio=1:start=1"])
def test_covering_causal_window_is_the_plain_model(vlm, images, spec):
    """A causal window covering the 4x4 grid, no heads file, ffn_ratio=1, no layercut = no compression."""
    inp = _inputs(vlm, PROMPTS, images)
    got, _ = _yopo_hidden(vlm, spec, inp)
    with torch.inference_mode():
        emb = vlm.model.embed_inputs(inp["input_ids"], inp["pixel_values"])
        want = vlm.model.language_model(emb, inp["attention_mask"])
    _close_on_real(got, want, inp["attention_mask"])
    assert vlm.chat_batch(PROMPTS, [[im] for im in images[:3]], compression=spec, max_new_tokens=4) == \
        vlm.chat_batch(PROMPTS, [[im] for im in images[:3]], compression=None, max_new_tokens=4)


# ----------------------------------------------------------------------------- each component vs reference
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("two_images", [False, True])
def test_window_matches_masked_reference(vlm, images, bidirectional, two_images):
    inp = _inputs(vlm, PROMPTS[:2], images, two_images=two_images)
    spec = f"yopo:window=3:ffn_ratio=1:bidirectional={str(bidirectional).lower()}"
    got, _ = _yopo_hidden(vlm, spec, inp)
    want = reference(vlm, inp, window=3, bidirectional=bidirectional)
    _close_on_real(got, want, inp["attention_mask"])
    plain = reference(vlm, inp)
    assert (got - plain).abs().max() > 1e-3  # the window really changes the visual rows


@pytest.mark.parametrize("ratio", [2, 4])
def test_ffn_matches_zeroed_channels(vlm, images, ratio):
    inp = _inputs(vlm, PROMPTS, images)
    got, _ = _yopo_hidden(vlm, f"yopo:window=0:ffn_ratio={ratio}", inp)
    _close_on_real(got, reference(vlm, inp, ffn_ratio=ratio), inp["attention_mask"])
    assert (got - reference(vlm, inp)).abs().max() > 1e-3


def test_inactive_heads_match_masked_heads(vlm, images, heads_file):
    inp = _inputs(vlm, PROMPTS, images)
    got, _ = _yopo_hidden(vlm, f"yopo:window=0:ffn_ratio=1:heads={heads_file}", inp)
    _close_on_real(got, reference(vlm, inp, heads=HEADS), inp["attention_mask"])
    assert (got - reference(vlm, inp)).abs().max() > 1e-3


def test_all_components_and_start(vlm, images, heads_file):
    inp = _inputs(vlm, PROMPTS, images, two_images=True)
    got, _ = _yopo_hidden(vlm, f"yopo:window=3:ffn_ratio=2:heads={heads_file}", inp)
    _close_on_real(got, reference(vlm, inp, window=3, heads=HEADS, ffn_ratio=2), inp["attention_mask"])
    got, _ = _yopo_hidden(vlm, f"yopo:window=3:ffn_ratio=4:heads={heads_file}:start=1", inp)
    _close_on_real(got, reference(vlm, inp, window=3, heads=HEADS, ffn_ratio=4, start=1), inp["attention_mask"])


def test_layercut_matches_reference_and_shrinks_cache(vlm, images):
    inp = _inputs(vlm, PROMPTS, images)
    b, t = inp["input_ids"].shape
    n_vis = int((inp["input_ids"][0] == IMAGE_TOKEN).sum())
    lm = vlm.model.language_model
    cache = lm.new_cache(b, t + 2)
    got, run = _yopo_hidden(vlm, "yopo:window=3:ffn_ratio=2:layercut=1", inp, cache=cache)
    want = reference(vlm, inp, window=3, ffn_ratio=2, layercut=1)
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    assert got.shape[1] == t - n_vis  # the visual tokens left the hidden states before layer 1
    assert cache.seq_len(0) == t and cache.seq_len(1) == t - n_vis
    assert run.kept[1].tolist() == [0, 0, 0]
    assert Compression.parse("yopo:layercut=1").tokens_per_layer(vlm.model, 16, 10) == [26, 10]


# ----------------------------------------------------------------------------- generation
def _generate(vlm, spec, inp, **kw):
    out = vlm.generate(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], compression=spec,
                       max_new_tokens=5, **kw)
    return out[:, inp["input_ids"].shape[1]:]


@pytest.mark.parametrize("extra", ["window=3:ffn_ratio=2", "window=3:ffn_ratio=2:heads={h}",
                                   "window=0:ffn_ratio=1:heads={h}", "window=3:heads={h}:layercut=1"])
def test_cached_equals_uncached(vlm, images, heads_file, extra):
    spec = "yopo:" + extra.format(h=heads_file)
    inp = _inputs(vlm, PROMPTS, images)
    cached = _generate(vlm, spec, inp)
    assert torch.equal(cached, _generate(vlm, spec, inp, use_cache=False))


def test_decode_skips_visual_keys_of_inactive_heads(vlm, images, heads_file):
    """Each token generated with the cache is the reference's greedy choice over prompt + tokens so far
    (the reference hides the visual keys from the inactive heads' text queries)."""
    inp = _inputs(vlm, PROMPTS, images)
    gen = _generate(vlm, f"yopo:window=3:ffn_ratio=2:heads={heads_file}", inp)  # (B, 5), greedy
    hid = reference(vlm, inp, window=3, heads=HEADS, ffn_ratio=2, extra_ids=gen[:, :-1])
    t = inp["input_ids"].shape[1]
    logits = vlm.model.language_model.logits(hid[:, t - 1:])  # (B, 5, V)
    assert torch.equal(logits.argmax(-1), gen)
    # and it differs from decoding with every head (the heads file matters in decode)
    plain = reference(vlm, inp, window=3, ffn_ratio=2, extra_ids=gen[:, :-1])
    assert (plain[:, t:] - hid[:, t:]).abs().max() > 1e-4


def test_batch_invariant(vlm, images, heads_file):
    spec = f"yopo:window=3:ffn_ratio=2:heads={heads_file}:layercut=1"
    singles = [vlm.chat(p, im, compression=spec, max_new_tokens=5) for p, im in zip(PROMPTS, images)]
    assert vlm.chat_batch(PROMPTS, [[im] for im in images[:3]], compression=spec, max_new_tokens=5) == singles
    inp = _inputs(vlm, PROMPTS, images)
    batch, _ = _yopo_hidden(vlm, f"yopo:window=3:ffn_ratio=2:heads={heads_file}", inp)
    for i in range(3):
        one, _ = _yopo_hidden(vlm, f"yopo:window=3:ffn_ratio=2:heads={heads_file}", _inputs(vlm, PROMPTS[i:i + 1], images[i:]))
        torch.testing.assert_close(batch[i, -1], one[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("half", [1, 2])
def test_band_kernel_equals_gather_kernel(causal, half):
    """The two window kernels (band of grid rows as strided views / gathered neighbours) agree on two
    rows of two 5x5 images each, with text around and between them and GQA heads (6 query, 2 K/V)."""
    g = torch.Generator().manual_seed(0)
    vis = torch.zeros(2, 64, dtype=torch.bool)
    vis[:, 3:28] = vis[:, 30:55] = True
    grids = yopo._grids(vis, None)
    index = torch.arange(64).expand(2, 64)
    band = yopo._window_plan(grids, index, vis, half, causal)
    gath = yopo._window_plan(grids, index, vis, half, causal, band=False)
    assert band.side == 5 and band.n_img == 2 and gath.side is None
    k, v = torch.randn(2, 2, 64, 8, generator=g), torch.randn(2, 2, 64, 8, generator=g)
    q = torch.randn(2, 6, 50, 8, generator=g)
    kv_of = torch.tensor([0, 0, 0, 1, 1, 1])
    t_idx, _ = yopo._pack(~vis)
    mask = causal_padding_mask(torch.ones(2, 64, dtype=torch.bool), 64)
    mask_vt = yopo._block(mask, band.v_idx, t_idx)
    kt, vt = yopo._heads_rows_of(k, t_idx), yopo._heads_rows_of(v, t_idx)
    kv, vv = yopo._heads_rows_of(k, band.v_idx), yopo._heads_rows_of(v, band.v_idx)
    a = yopo._band_attend(q, kv_of, kt, vt, mask_vt, kv, vv, band)
    b = yopo._window_attend(q, kv_of, kt, vt, mask_vt, k, v, gath.nb, gath.nb_ok)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sub = torch.tensor([1, 4])  # a subset of query heads (inactive heads elsewhere)
    torch.testing.assert_close(yopo._band_attend(q[:, sub], kv_of[sub], kt, vt, mask_vt, kv, vv, band),
                               b[:, sub], atol=1e-5, rtol=1e-5)


def test_rows_without_images_and_pruned_grids(vlm, images, heads_file):
    """A batch row with no image (the gather kernel, unequal visual counts) and visual tokens pruned by
    FastV before YOPO's layer (incomplete grids): batch = singles, cached = uncached."""
    spec = f"yopo:window=3:ffn_ratio=2:heads={heads_file}"
    prompts, ims = ["what is in the image ?", "red square"], [[images[0]], []]
    singles = [vlm.chat(p, im, compression=spec, max_new_tokens=5) for p, im in zip(prompts, ims)]
    assert vlm.chat_batch(prompts, ims, compression=spec, max_new_tokens=5) == singles
    both = "fastv:layer=1:keep=0.5," + spec
    inp = _inputs(vlm, PROMPTS, images)
    assert torch.equal(_generate(vlm, both, inp), _generate(vlm, both, inp, use_cache=False))
    got, run = _yopo_hidden(vlm, both, inp)
    dropped = (1, ~run.decisions[1] & (inp["input_ids"] == IMAGE_TOKEN))
    assert int(dropped[1][0].sum()) == 8  # half of the 4x4 grid left before layer 1
    want = reference(vlm, inp, window=3, heads=HEADS, ffn_ratio=2, dropped=dropped)
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the work is really skipped
def _flops(vlm, spec, inp, linear_only=False) -> int:
    with FlopCounterMode(display=False) as fc:
        _yopo_hidden(vlm, spec, inp) if spec else _plain(vlm, inp)
    if linear_only:  # the projections and the MLP (mm / addmm), not attention
        return sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm"))
    return fc.get_total_flops()


def _plain(vlm, inp):
    with torch.inference_mode():
        emb = vlm.model.embed_inputs(inp["input_ids"], inp["pixel_values"])
        return vlm.model.language_model(emb, inp["attention_mask"])


def test_fewer_flops_really_run(vlm, images, heads_file):
    inp = _inputs(vlm, PROMPTS[:1], images)
    cfg = vlm.config.lm
    n, d, i = 16, cfg.hidden_size, cfg.intermediate_size
    base = _flops(vlm, None, inp)
    ffn = _flops(vlm, "yopo:window=0:ffn_ratio=2", inp)
    # gate, up, down on the 16 visual rows shrink to half their channels, in both layers
    assert base - ffn == 2 * 3 * 2 * n * d * (i - i // 2)
    heads = _flops(vlm, f"yopo:window=0:ffn_ratio=1:heads={heads_file}", inp)
    assert heads < base
    # inactive heads' q / o columns on the visual rows (2 heads in each layer), and K/V head 1 in
    # layer 0 (no active query head reads it): 2 FLOPs x 16 rows x width x head_dim each
    unit = 2 * n * d * cfg.dim_head
    lin_base = _flops(vlm, None, inp, linear_only=True)
    lin_heads = _flops(vlm, f"yopo:window=0:ffn_ratio=1:heads={heads_file}", inp, linear_only=True)
    assert lin_base - lin_heads == unit * ((2 + 2 + 2) + (2 + 2))
    cut = _flops(vlm, "yopo:window=0:ffn_ratio=1:layercut=1", inp)
    assert cut < base


# ----------------------------------------------------------------------------- calibration
def test_calibrate_matches_eager_attention_and_round_trips(vlm, images, tmp_path):
    from transformers import LlavaForConditionalGeneration

    samples = [(p, im) for p, im in zip(PROMPTS, images)]
    table = yopo.calibrate(vlm, samples, tau=0.0, n=1)
    assert table["num_samples"] == 1 and table["num_layers"] == 2 and table["num_heads"] == 4
    # rho from transformers' eager attention probabilities of the same checkpoint
    hf = LlavaForConditionalGeneration.from_pretrained(vlm.source, attn_implementation="eager").eval()
    inp = _inputs(vlm, PROMPTS[:1], images)
    with torch.no_grad():
        att = hf(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], output_attentions=True).attentions
    vis = inp["input_ids"][0] == IMAGE_TOKEN
    rows = (~vis & (vis.long().cumsum(0) > 0)).nonzero()[:, 0]
    for l, a in enumerate(att):
        a = a[0][:, rows]  # (H, R, T)
        rho = a[..., vis].sum((1, 2)) / a[..., ~vis].sum((1, 2))
        torch.testing.assert_close(torch.tensor(table["rho_mean"][l], dtype=torch.float64), rho.double(), atol=1e-5, rtol=1e-4)
    # majority vote over 3 samples at a threshold that splits the heads
    tau = float(np.median(table["rho_mean"]))
    table = yopo.calibrate(vlm, samples, tau=tau, n=3)
    assert table["num_samples"] == 3 and table["tau"] == tau
    flat = [a for row in table["active"] for a in row]
    assert any(flat) and not all(flat)
    path = yopo.save_heads(table, tmp_path / "sub" / "heads.json")
    assert [p.name for p in path.parent.iterdir()] == ["heads.json"]  # no temp file left behind
    assert yopo.load_heads(path) == json.loads(json.dumps(table))
    hook = Compression.parse(f"yopo:heads={path}").plugins[0]
    assert hook.active_heads(2, 4).tolist() == table["active"]
    assert isinstance(vlm.chat(PROMPTS[0], images[0], compression=f"yopo:heads={path}", max_new_tokens=3), str)


# ----------------------------------------------------------------------------- cost report and errors
def test_visual_compute_report():
    lc = LMConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3)
    off = yopo.YOPO(window=0, ffn_ratio=1).visual_compute(lc, 256, 20, 10)
    assert off["skipped"] == 0 and off["full"] == off["yopo"]
    rep = yopo.YOPO(window=5, ffn_ratio=2, layercut=15).visual_compute(lc, 256, 20, 10)
    assert rep["yopo"][15:] == [0] * 15 and all(s == 1 for s in rep["skipped_per_layer"][15:])
    ffn_only = yopo.YOPO(window=0, ffn_ratio=2).visual_compute(lc, 256, 20, 10)
    assert ffn_only["full"][0] - ffn_only["yopo"][0] == 2 * 256 * 3 * 576 * (1536 - 768)
    assert 0.5 < rep["skipped"] < 1
    assert yopo.YOPO(layercut=3).visual_schedule(5, 16) == [16, 16, 16, 0, 0]


@pytest.mark.parametrize("spec,match", [
    ("yopo:window=4", "odd"), ("yopo:window=-1", "window"), ("yopo:ffn_ratio=0", "ffn_ratio"),
    ("yopo:layercut=0", "layercut"), ("yopo:start=-1", "start"), ("yopo:start=2:layercut=2", "start"),
    ("yopo:heads=5", "heads"), ("yopo:bidirectional=maybe", "bidirectional"), ("yopo:grid=0", "grid"),
    ("yopo:no_such=1", "no_such"), ("yopo:window=2.5", "window")])
def test_bad_params_refused_at_parse(spec, match):
    with pytest.raises(InputError, match=match):
        Compression.parse(spec)


def test_bad_inputs_refused_before_compute(vlm, tmp_path):
    with pytest.raises(InputError, match="not found"):
        Compression.parse(f"yopo:heads={tmp_path}/missing.json").check(vlm.model)
    (tmp_path / "bad.json").write_text(json.dumps({"active": [[True] * 4] * 3}))
    with pytest.raises(InputError, match="3 layers"):
        Compression.parse(f"yopo:heads={tmp_path}/bad.json").check(vlm.model)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        Compression.parse(f"yopo:heads={tmp_path}/junk.json").check(vlm.model)
    with pytest.raises(InputError, match="outside"):
        Compression.parse("yopo:layercut=2").check(vlm.model)
    with pytest.raises(InputError, match="full"):
        Compression.parse("fastervlm:keep=0.5,yopo").check(vlm.model)
    with pytest.raises(InputError, match="square"):
        yopo._grids(torch.tensor([[False] + [True] * 15 + [False]]), None)
    with pytest.raises(InputError, match="4x4"):
        yopo._grids(torch.tensor([[True] * 24]), 4)
    g = yopo._grids(torch.tensor([[False] + [True] * 32 + [False]]), 4)  # two images back to back
    assert g.n_img == 2 and g.img[0, 17].item() == 1 and g.row[0, 17].item() == 0


def test_back_to_back_images_use_the_models_grid(vlm, images):
    """Two images with no text between them form one visual run of 32 tokens; the run is cut at the
    model's own 4x4 grid (Compression.image_side), as with an explicit grid=4."""
    comp = Compression.parse("yopo:window=3:ffn_ratio=1")
    assert comp.image_side(vlm.model) == 4
    assert Compression.parse("downsample:keep=0.25,yopo").image_side(vlm.model) == 2
    assert Compression.parse("fastv:keep=0.5").image_side(vlm.model) == 4
    prompt = vlm.build_prompt("<image><image>\ncompare", [images[0], images[1]])
    inp = vlm.processor(text=[prompt], images=[images[0], images[1]])
    vis = inp["input_ids"][0] == IMAGE_TOKEN
    first = int(vis.nonzero()[0])
    assert bool(vis[first:first + 32].all())  # really back to back
    got, _ = _yopo_hidden(vlm, "yopo:window=3:ffn_ratio=1", inp)
    explicit, _ = _yopo_hidden(vlm, "yopo:window=3:ffn_ratio=1:grid=4", inp)
    torch.testing.assert_close(got, explicit, atol=0, rtol=0)
    want = reference(vlm, inp, window=3)  # the reference cuts runs every 16 tokens (one 4x4 image each)
    _close_on_real(got, want, inp["attention_mask"])


def test_yopo_speed_bench_times_extra_specs():
    """benchmarks/yopo_speed.py --spec S adds S to the timed rows, after the fixed ones."""
    from tests.benchmarks import load_benchmark

    bench = load_benchmark("yopo_speed")
    extra = "yopo:window=0:ffn_ratio=2:layercut=20"
    specs = bench.specs_for(30, None, False, [extra])
    assert specs == {"none": None, "yopo": "yopo:window=5:ffn_ratio=2:layercut=15", extra: extra}
    assert list(bench.specs_for(30, None, False)) == ["none", "yopo"]
