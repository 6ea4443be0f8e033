"""Public API on tiny checkpoints: load, chat, processor, export round trip, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit import CheckpointError, InputError
from tests.tiny_models import IMAGE_TOKEN, build


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def vlm(llava_dir):
    return llavakit.load(str(llava_dir))


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(p)
    return p


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


def test_chat_with_path_and_pil(vlm, png):
    a = vlm.chat("what is in the image ?", images=str(png), max_new_tokens=5)
    b = vlm.chat("what is in the image ?", images=Image.open(png), max_new_tokens=5)
    assert isinstance(a, str) and a == b


def test_processor_expands_image_tokens(vlm, png):
    out = vlm.processor(text="<image> what is in the image ?", images=[str(png)], return_tensors="pt")
    assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == vlm.model.num_image_tokens() == 16
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_tag_image_mismatch(vlm, png):
    with pytest.raises(InputError, match="2 <image> tag"):
        vlm.processor(text="<image> <image> what", images=[str(png)])
    with pytest.raises(InputError, match="0 <image> tag"):
        vlm.processor(text="what", images=[str(png)])
    with pytest.raises(InputError, match="only 1 image"):
        vlm.chat("<image> <image> what", images=[str(png)])


def test_empty_prompt(vlm):
    with pytest.raises(InputError, match="empty prompt"):
        vlm.chat("   ")


def test_bad_image_files(vlm, tmp_path, png):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    with pytest.raises(InputError):
        vlm.chat("what", images=str(txt))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    with pytest.raises(InputError):
        vlm.chat("what", images=str(trunc))
    # the model still works after bad input
    assert isinstance(vlm.chat("what is in the image ?", images=str(png), max_new_tokens=3), str)


def test_feature_count_mismatch_names_both_counts(vlm, png):
    inputs = vlm.processor(text="<image> what", images=[str(png)])
    ids = inputs["input_ids"][:, 1:]  # drop one image token
    with pytest.raises(InputError, match=r"15 image-token placeholders .* 16 visual tokens"):
        vlm(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_export_import_bit_exact(vlm, tmp_path):
    out = vlm.save_pretrained(tmp_path / "export")
    again = llavakit.load(str(out))
    a, b = vlm.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == vlm.config
    out2 = again.save_pretrained(tmp_path / "export2")
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


def test_export_loads_in_transformers(vlm, tmp_path, png):
    from transformers import LlavaForConditionalGeneration

    out = vlm.save_pretrained(tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    inputs = vlm.processor(text="<image> what is in the image ?", images=[str(png)])
    with torch.no_grad():
        ref = hf(**inputs).logits
    assert (ref - vlm(**inputs).logits).abs().max() <= 1e-4


def test_export_refuses_to_clobber_non_model_dir(vlm, tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to overwrite"):
        vlm.save_pretrained(d)
    assert (d / "precious.txt").read_text() == "keep me"


def test_missing_shard(llava_dir, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(llava_dir, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                             "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        llavakit.load(str(d))


def test_unsupported_architecture(llava_dir, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(llava_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "blip-2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*blip-2"):
        llavakit.load(str(d))


def test_no_tokenizer_still_runs_tensors(llava_dir, tmp_path):
    d = tmp_path / "notok"
    shutil.copytree(llava_dir, d)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    vlm = llavakit.load(str(d))
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 16 + [6, 7]])
    pixel_values = torch.randn(1, 3, 32, 32)
    assert vlm(input_ids=ids, pixel_values=pixel_values).logits.shape == (1, 20, 128)
    assert vlm.generate(ids, pixel_values=pixel_values, max_new_tokens=3).shape == (1, 23)
    with pytest.raises(InputError, match="no tokenizer"):
        vlm.chat("what")


def test_offline_hub_id_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        llavakit.load("nobody/no-such-model")


def test_not_a_source():
    with pytest.raises(InputError):
        llavakit.load("./definitely/not/here")


def test_stream_chat_equals_chat(vlm, png):
    full = vlm.chat("what is in the image ?", images=str(png), max_new_tokens=8)
    streamed = "".join(vlm.stream_chat("what is in the image ?", images=str(png), max_new_tokens=8))
    assert streamed.strip() == full


def test_batched_chat_equals_single(vlm, png):
    prompts = ["what is in the image ?", "describe the red circle and the blue square"]
    batch = vlm.chat_batch(prompts, [[str(png)], []], max_new_tokens=6)
    single = [vlm.chat(prompts[0], str(png), max_new_tokens=6), vlm.chat(prompts[1], max_new_tokens=6)]
    assert batch == single


def test_unknown_generation_option(vlm):
    with pytest.raises(InputError, match="unknown generation option"):
        vlm.chat("what", max_new_tokns=3)
