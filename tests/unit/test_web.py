"""The web demo's logic without a browser: answers, token counts, costs, token maps (with compression), error
messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import torch

import llavakit
from llavakit.compression import BUDGET_PARAMS, Compression
from llavakit.errors import InputError
from llavakit.serve import web
from tests.tiny_models import build

SAMPLE = "llavakit/assets/sample.png"
FASTER = "fastervlm:keep=0.25"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """These tests check behaviour, not speed: one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("web-llava"))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def next_vlm(tmp_path_factory):
    return llavakit.load(str(build("llava_next", tmp_path_factory.mktemp("web-llava-next"))))


@pytest.fixture()
def broken(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    return str(path)


# ----------------------------------------------------------------------------------------- answer

def test_answer_tokens_cost_and_map(vlm):
    text, n, cost, heat = web.answer(vlm, SAMPLE, "what is in the image ?", "none", 1.0, max_new_tokens=4)
    assert isinstance(text, str)
    assert n == vlm.model.num_image_tokens((32, 32)) == 16  # fixed resolution: the 32x32 view, CLS dropped
    assert "request cost" in cost and "llm 16" in cost
    # the cost is VLM.cost of this request: same prompt, the tokens generated, the preprocessed view size
    inputs = vlm.processor(text=[vlm.build_prompt("what is in the image ?", [SAMPLE])], images=[SAMPLE])
    new = int(re.search(r"(\d+) new tokens", cost).group(1))
    assert 1 <= new <= 4
    expected = vlm.cost(prompt_tokens=int(inputs["attention_mask"].sum()) - n, new_tokens=new, image_sizes=[(32, 32)])
    assert cost == expected.summary()
    assert isinstance(heat, Image.Image) and min(heat.size) >= web.DISPLAY_MIN_SIDE
    assert "4x4 patches of 8 px = 16 image tokens" in heat.info["caption"]
    assert "every token kept" in heat.info["caption"]


def test_answer_matches_chat(vlm):
    text, *_ = web.answer(vlm, SAMPLE, "describe the image", max_new_tokens=3)
    assert text == vlm.chat("describe the image", [SAMPLE], max_new_tokens=3)


def test_answer_with_fastervlm(vlm):
    q = "what is in the image ?"
    text, n, cost, heat = web.answer(vlm, SAMPLE, q, "fastervlm", 0.25, max_new_tokens=4)
    assert text == vlm.chat(q, [SAMPLE], max_new_tokens=4, compression=FASTER)
    assert n == 4  # round(16 * 0.25) image tokens reach the LM
    inputs = vlm.processor(text=[vlm.build_prompt(q, [SAMPLE])], images=[SAMPLE])
    new = int(re.search(r"(\d+) new tokens", cost).group(1))
    text_tokens = int(inputs["attention_mask"].sum()) - 16
    assert cost == vlm.cost(prompt_tokens=text_tokens, new_tokens=new, image_sizes=[(32, 32)],
                            compression=FASTER).summary()
    assert "fastervlm 4" in cost and "llm 4" in cost
    assert heat.info["kept"] == (4, 16)
    assert "fastervlm:keep=0.25: 4 of 16 patches kept (green), 12 dropped (red)" in heat.info["caption"]
    assert "The LM receives 4 visual tokens" in heat.info["caption"]


def test_kept_patches_are_the_tokens_the_lm_gets(vlm):
    """The map's kept cells are exactly the patches whose features the LM receives: the compressed features
    equal the uncompressed ones at those patches (the projector is per token), in raster order."""
    comp = Compression.parse(FASTER)
    pv = vlm.processor(text=[vlm.build_prompt("x", [SAMPLE])], images=[SAMPLE])["pixel_values"]
    (mask,), grid = web.kept_patches(vlm, pv, comp)
    assert grid == (4, 4) and mask.shape == (4, 4) and mask.sum() == 4
    with torch.inference_mode():
        full = vlm.model.get_image_features(pv)[0]  # (16, D)
        kept = vlm.model.get_image_features(pv, compression=comp)[0]  # (4, D)
    torch.testing.assert_close(kept, full[torch.from_numpy(mask.reshape(-1))], atol=1e-5, rtol=1e-5)
    assert web.kept_patches(vlm, pv, None) == (None, None)


def test_in_llm_method_map_keeps_every_patch_and_says_why(vlm):
    comp = Compression.parse("fastv:layer=1:keep=0.5")  # the tiny LM has 2 layers
    inputs = vlm.processor(text=[vlm.build_prompt("x", [SAMPLE])], images=[SAMPLE], compression=comp)
    assert web.kept_patches(vlm, inputs["pixel_values"], comp) == (None, None)
    tmap = web.token_map(vlm, inputs, 16, compression=comp)
    assert all(k.all() for k in tmap.kept)
    assert "16 of 16 patches kept" in tmap.caption and web.IN_LLM_NOTE in tmap.caption


def test_none_turns_off_a_default_compression(model_dir):
    squeezed = llavakit.load(str(model_dir), compression=FASTER)
    _, n, _, heat = web.answer(squeezed, SAMPLE, "what ?", "none", 1.0, max_new_tokens=2)
    assert n == 16 and heat.info["kept"] == (16, 16)


@pytest.mark.parametrize("image, question, method, budget, message", [
    (None, "what ?", "none", 1.0, "upload an image first"),
    (SAMPLE, "", "none", 1.0, "type a question"),
    (SAMPLE, "   ", "none", 1.0, "type a question"),
    (SAMPLE, "what ?", "magic", 1.0, "unknown compression method 'magic'; valid: none, "),
    (SAMPLE, "what ?", "none", 0.5, "needs a compression method"),
    (SAMPLE, "what ?", "none", 1.5, "budget must be a fraction"),
    (SAMPLE, "what ?", "fastervlm", 0.0, "budget must be a fraction"),
    (SAMPLE, "what ?", "fastv", 0.5, "fastv: layer 2 is outside the LM's 2 layers"),  # default layer, tiny LM
])
def test_answer_bad_input(vlm, image, question, method, budget, message):
    with pytest.raises(InputError, match=re.escape(message)):
        web.answer(vlm, image, question, method, budget)


def test_anyres_model_refuses_compression(next_vlm):
    with pytest.raises(InputError, match="anyres"):
        web.answer(next_vlm, SAMPLE, "what ?", "fastervlm", 0.5)


def test_method_choices_and_specs(monkeypatch):
    choices = web.method_choices()
    assert choices[0] == "none" and {"fastervlm", "fastv"} <= set(choices)
    assert all(BUDGET_PARAMS[m] is not None for m in choices[1:])
    assert web.compression_spec("fastervlm", 0.25) == FASTER
    assert web.compression_spec("FastV ", 0.1) == "fastv:keep=0.1"
    assert web.compression_spec("none", 1.0) is None and web.compression_spec(None, None) is None
    monkeypatch.setitem(BUDGET_PARAMS, "fastv", None)  # a method without a budget knob is not offered
    assert "fastv" not in web.method_choices()
    with pytest.raises(InputError, match="'fastv' has no single budget parameter"):
        web.check_method("fastv", 0.5)


def test_handle_method_moves_the_slider():
    assert web.handle_method("none", 0.25) == {"__type__": "update", "value": 1.0, "interactive": False}
    assert web.handle_method("fastervlm", 1.0) == {"__type__": "update", "value": 0.5, "interactive": True}
    assert web.handle_method("fastervlm", 0.25) == {"__type__": "update", "interactive": True}


def test_answer_broken_file(vlm, broken):
    with pytest.raises(InputError, match="not an image"):
        web.answer(vlm, broken, "what ?")


def test_check_method_defaults():
    assert web.check_method(None, None) == ("none", 1.0)
    assert web.check_method(" None ", 1) == ("none", 1.0)
    assert web.check_method("fastervlm", 0.25) == ("fastervlm", 0.25)


# ----------------------------------------------------------------------------------------- handlers

def test_handle_submit_ok(vlm):
    status, text, n, cost, heat = web.handle_submit(vlm, SAMPLE, "what colour ?", "none", 1.0, max_new_tokens=2)
    assert status.startswith("Answered.") and "16 image tokens" in status
    assert n == 16 and "total" in cost and heat is not None
    status, text, n, cost, heat = web.handle_submit(vlm, SAMPLE, "what colour ?", "fastervlm", 0.25,
                                                    max_new_tokens=2)
    assert status.startswith("Answered.") and "4 of 16 patches kept" in status and n == 4


@pytest.mark.parametrize("image, question", [(None, "what ?"), ("BROKEN", "what ?"), (SAMPLE, "")])
def test_handle_submit_never_raises(vlm, broken, image, question):
    status, text, n, cost, heat = web.handle_submit(vlm, broken if image == "BROKEN" else image, question, "none", 1.0)
    assert status.startswith("**Error:**") and (text, n, cost, heat) == ("", None, "", None)


def test_handle_submit_unexpected_failure(vlm, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vlm, "chat", boom)  # instance attribute only; undone after the test
    status, *_ = web.handle_submit(vlm, SAMPLE, "what ?", "none", 1.0)
    assert status == "**Error:** the request failed (RuntimeError: out of memory)"


def test_handle_upload(broken):
    assert web.handle_upload(None) == (None, "")
    img, status = web.handle_upload(SAMPLE)
    assert img.size == (224, 224) and status == "Image loaded: 224x224 px."
    img, status = web.handle_upload(broken)
    assert img is None and status.startswith("**Error:**") and "not an image" in status


# ----------------------------------------------------------------------------------------- token map

def test_token_map_anyres_padding_and_counts(next_vlm, tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 90, 3), dtype=np.uint8)).save(path)
    inputs = next_vlm.processor(text=[next_vlm.build_prompt("what ?", [str(path)])], images=[str(path)])
    visual = int((inputs["input_ids"] == next_vlm.processor.image_token_id).sum())
    assert visual == next_vlm.model.num_image_tokens((20, 90))
    tmap = web.token_map(next_vlm, inputs, visual)
    assert tmap.tiles == (1, 2) and len(tmap.views) == 3 and tmap.grids == ((4, 4),) * 3
    base = tmap.present[0].sum()
    tile_cells = sum(int(p.sum()) for p in tmap.present[1:])
    rows_kept = int(np.concatenate(tmap.present[1:], axis=1).any(axis=1).sum())
    # llava_next: base tokens + the unpadded tile map read row by row with one newline per row
    assert visual == base + tile_cells + rows_kept
    assert tile_cells < 2 * 16 and "padding patches removed" in tmap.caption
    assert all((k == p).all() for k, p in zip(tmap.kept, tmap.present))
    heat = web.draw_token_map(tmap)
    assert heat.width > heat.height  # base view beside the 1x2 tiles


def test_draw_token_map_colours():
    view = Image.new("RGB", (16, 16), (128, 128, 128))
    kept = np.array([[True, False], [True, True]])
    tmap = web.TokenMap(views=(view,), grids=((2, 2),), present=(np.ones((2, 2), bool),), kept=(kept,),
                        tiles=(0, 0), caption="")
    img = np.asarray(web.draw_token_map(tmap, alpha=0.5)).astype(int)
    h, w = img.shape[:2]
    top_left, top_right = img[h // 4, w // 4], img[h // 4, 3 * w // 4]
    assert top_left[1] > top_left[0] and top_left[1] > top_left[2]  # kept: green tint
    assert top_right[0] > top_right[1] and top_right[0] > top_right[2]  # dropped: red tint


def test_token_map_rejects_wrong_mask(vlm):
    inputs = vlm.processor(text=[vlm.build_prompt("x", [SAMPLE])], images=[SAMPLE])
    with pytest.raises(InputError, match="do not match"):
        web.token_map(vlm, inputs, 16, kept=[np.ones((3, 3), bool)])


# ----------------------------------------------------------------------------------------- Gradio page

def test_build_demo_wires_the_page(vlm):
    gr = pytest.importorskip("gradio", reason="gradio is not installed")
    demo = web.build_demo(vlm, max_new_tokens=4)
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"image-file", "question", "method", "budget", "submit", "status", "answer", "visual-tokens", "cost",
            "token-map"} <= ids
    method = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "method")
    assert [c[0] for c in method.choices] == web.method_choices()
