"""The web demo's logic without a browser: answers, token counts, costs, token maps, error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import llavakit
from llavakit.errors import InputError
from llavakit.serve import web
from tests.tiny_models import build

SAMPLE = "llavakit/assets/sample.png"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return llavakit.load(str(build("llava", tmp_path_factory.mktemp("web-llava"))))


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


@pytest.mark.parametrize("image, question, method, budget, message", [
    (None, "what ?", "none", 1.0, "upload an image first"),
    (SAMPLE, "", "none", 1.0, "type a question"),
    (SAMPLE, "   ", "none", 1.0, "type a question"),
    (SAMPLE, "what ?", "fastv", 0.5, "not available yet"),
    (SAMPLE, "what ?", "magic", 1.0, "unknown compression method 'magic'; valid: none"),
    (SAMPLE, "what ?", "none", 0.5, "needs a compression method"),
    (SAMPLE, "what ?", "none", 1.5, "budget must be a fraction"),
])
def test_answer_bad_input(vlm, image, question, method, budget, message):
    with pytest.raises(InputError, match=re.escape(message)):
        web.answer(vlm, image, question, method, budget)


def test_answer_broken_file(vlm, broken):
    with pytest.raises(InputError, match="not an image"):
        web.answer(vlm, broken, "what ?")


def test_check_method_defaults():
    assert web.check_method(None, None) == ("none", 1.0)
    assert web.check_method(" None ", 1) == ("none", 1.0)


# ----------------------------------------------------------------------------------------- handlers

def test_handle_submit_ok(vlm):
    status, text, n, cost, heat = web.handle_submit(vlm, SAMPLE, "what colour ?", "none", 1.0, max_new_tokens=2)
    assert status.startswith("Answered.") and "16 image tokens" in status
    assert n == 16 and "total" in cost and heat is not None


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
    assert [c[0] for c in method.choices] == ["none"]
