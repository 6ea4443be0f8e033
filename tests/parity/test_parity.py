"""Parity: llavakit vs transformers on the same tiny random checkpoints (fp32).

For every supported family: logits max abs diff <= 1e-4 on a left-padded batch of 2 prompts of
different lengths (and different image counts), identical greedy generations of 20 tokens, with and
without our KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from tests.tiny_models import KINDS, build

ATOL = 1e-4


def _hf_model(kind: str, path):
    import transformers as tf

    cls = {"llava": tf.LlavaForConditionalGeneration, "llava_multilayer": tf.LlavaForConditionalGeneration,
           "llava_next": tf.LlavaNextForConditionalGeneration,
           "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
           "llama": tf.LlamaForCausalLM, "llama_tied": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[kind]
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _inputs(kind: str, vlm):
    if kind in ("llama", "llama_tied", "qwen2"):
        texts = ["what is the colour of the square ?", "describe a red circle"]
        return vlm.processor(text=texts)
    if kind in ("llava_next", "llava_onevision"):  # one image each, non-square, different grids
        texts = ["<image> what is in the image ?", "<image> describe the shape of the red circle and the square"]
        return vlm.processor(text=texts, images=[_image(60, 30, 1), _image(40, 90, 2)])
    texts = ["<image> <image> what is in the image ?", "describe a red circle and the blue square"]
    return vlm.processor(text=texts, images=[_image(40, 30, 1), _image(32, 32, 2)])


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    path = build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, _hf_model(request.param, path), llavakit.load(str(path))


def test_logits_match(pair):
    kind, hf, vlm = pair
    inputs = _inputs(kind, vlm)
    assert inputs["attention_mask"][0].sum() != inputs["attention_mask"][1].sum(), "lengths must differ"
    with torch.no_grad():
        ref = hf(**inputs).logits
    ours = vlm(**inputs).logits
    real = inputs["attention_mask"].bool()
    diff = (ref[real] - ours[real]).abs().max().item()
    assert diff <= ATOL, f"{kind}: max abs logit diff {diff:.2e}"


def test_logits_without_mask(pair):
    kind, hf, vlm = pair
    inputs = _inputs(kind, vlm)
    one = {k: v[1:] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    one.pop("attention_mask")
    if "pixel_values" in one:
        n_img = {"llava": 0, "llava_multilayer": 0}.get(kind)
        if n_img == 0:  # second llava prompt has no image
            one.pop("pixel_values")
        else:
            one["pixel_values"], one["image_sizes"] = inputs["pixel_values"][1:], inputs["image_sizes"][1:]
    with torch.no_grad():
        ref = hf(**one).logits
    ours = vlm(**one).logits
    assert (ref - ours).abs().max().item() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches(pair, use_cache):
    kind, hf, vlm = pair
    inputs = _inputs(kind, vlm)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=3, eos_token_id=2)
    ours = vlm.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=3, eos_token_id=2,
                        use_cache=use_cache)
    n = inputs["input_ids"].shape[1]
    ref_new, ours_new = ref[:, n:], ours[:, n:]
    width = max(ref_new.shape[1], ours_new.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=3)  # noqa: E731
    assert torch.equal(pad(ref_new), pad(ours_new)), f"{kind}: {ref_new.tolist()} vs {ours_new.tolist()}"
    assert ours_new.shape[1] >= 1
