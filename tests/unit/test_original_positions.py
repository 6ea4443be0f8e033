"""`pos=original` on pre-LLM token stages: kept visual tokens keep their raster position ids.

Tiny model (tests/tiny_models.py "llava"): 4x4 patch grid (16 visual tokens), 2-layer Llama LM.
"""

from __future__ import annotations

import pytest
import torch

import llavakit
from llavakit.compression import Compression
from llavakit.compression.pipeline import ImageFeatures
from tests.tiny_models import noise_images

PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir, one_torch_thread):
    return llavakit.load(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def images():
    return noise_images(len(PROMPTS))


def _ids(vlm, spec, images, use_cache=True, prompts=PROMPTS):
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(prompts, images)]
    inp = vlm.processor(text=texts, images=list(images), compression=vlm.resolve_compression(spec))
    return vlm.generate(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], compression=spec,
                        max_new_tokens=5, use_cache=use_cache)[:, inp["input_ids"].shape[1]:]


def test_position_ids_follow_the_raster_grid():
    comp = Compression.parse("random:keep=0.5:pos=original")
    img = 7
    # row 0: two pads, text, 3 kept tokens (patches 1, 5, 14 of a 4x4 grid), text, text
    # row 1: text, 2 kept tokens (patches 0, 15), text
    ids = torch.tensor([[0, 0, 3, img, img, img, 4, 5], [0, 0, 0, 3, img, img, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    pos = [torch.tensor([[0, 1], [1, 1], [3, 2]]), torch.tensor([[0, 0], [3, 3]])]
    feats = ImageFeatures([torch.zeros(3, 2), torch.zeros(2, 2)], pos, (4, 4))
    got = comp.prompt_position_ids(ids, mask, img, feats)
    assert got.tolist() == [[1, 1, 0, 2, 6, 15, 17, 18], [1, 1, 1, 0, 1, 16, 17, 18]]
    assert Compression.parse("random:keep=0.5").prompt_position_ids(ids, mask, img, feats) is None


def test_keeping_everything_with_original_positions_is_the_uncompressed_model(vlm, images):
    assert _ids(vlm, "fastervlm:keep=1.0:pos=original", images).tolist() == _ids(vlm, None, images).tolist()


def test_original_positions_change_the_answer_inputs_but_stay_kv_and_batch_safe(vlm, images):
    spec = "fastervlm:keep=0.25:pos=original"
    batched = _ids(vlm, spec, images)
    assert batched.tolist() == _ids(vlm, spec, images, use_cache=False).tolist()
    for i, (p, im) in enumerate(zip(PROMPTS, images)):
        alone = _ids(vlm, spec, [im], prompts=[p])[0]
        assert alone.tolist() == batched[i, :len(alone)].tolist()
    # the position ids are the only difference from the default re-indexing: the prefill logits differ
    comp_o, comp_c = Compression.parse(spec), Compression.parse("fastervlm:keep=0.25")
    texts = [vlm.build_prompt(PROMPTS[0], [images[0]])]
    inp = vlm.processor(text=texts, images=[images[0]], compression=comp_o)
    model, lm = vlm.model, vlm.model.language_model
    with torch.inference_mode():
        e_o, p_o = model.embed_compressed(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], None, comp_o)
        e_c, p_c = model.embed_compressed(inp["input_ids"], inp["attention_mask"], inp["pixel_values"], None, comp_c)
        assert p_c is None and torch.equal(e_o, e_c)
        assert int(p_o[0, -1]) == inp["input_ids"].shape[1] - 1 + 16 - 4  # the text continues after the full grid
        a = lm.logits(lm(e_o, inp["attention_mask"], p_o, None))[0, -1]
        b = lm.logits(lm(e_c, inp["attention_mask"], None, None))[0, -1]
    assert not torch.allclose(a, b)


def test_pos_survives_budgets_and_round_trips():
    from llavakit.compression import with_budget

    spec = with_budget("fastervlm:pos=original", 0.1)
    assert spec == "fastervlm:pos=original:keep=0.1"
    comp = Compression.parse(spec)
    assert comp.original_positions and Compression.parse(comp.spec).original_positions
