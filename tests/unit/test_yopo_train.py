"""YOPO fine-tuning (llavakit/training/yopo_train.py): the masked training forward computes what the
inference hook (llavakit/llm_hooks/yopo.py, which skips the work) computes, on plain prompts and on
packed training sequences, and a recipe trains with it.

Tiny model (tests/tiny_models.py "llava"): a 4x4 patch grid, 16 visual tokens per image, a 2-layer LM
with 4 query heads / 2 K/V heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.compression import Compression
from llavakit.data.dataset import TurnLabeler
from llavakit.layers.attention import causal_padding_mask
from llavakit.layers.rope import default_position_ids
from llavakit.llm_hooks import yopo
from llavakit.training.config import TrainConfig
from llavakit.training.packing import block_mask, collate_packed, encode_rounds, pack
from llavakit.training.trainer import Trainer, train
from llavakit.training.yopo_train import YopoTraining, grid_coords, parse_yopo
from tests.tiny_models import IMAGE_TOKEN, noise_images
from tests.unit.test_training import _recipe as training_recipe

PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]
HEADS = [[True, True, False, False], [False, True, False, True]]  # (layer, query head) active


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    return tiny_llava_dir  # read-only here: training writes under tmp_path


@pytest.fixture(scope="module")
def vlm(tiny, one_torch_thread):
    return llavakit.load(str(tiny))


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    return yopo.save_heads({"active": HEADS}, tmp_path_factory.mktemp("heads") / "heads.json")


SPECS = ["yopo:window=3:ffn_ratio=2", "yopo:window=3:ffn_ratio=2:bidirectional=false",
         "yopo:window=3:ffn_ratio=4:heads={h}:start=1", "yopo:window=3:ffn_ratio=2:heads={h}:layercut=1",
         "yopo:window=0:ffn_ratio=2:layercut=1", "yopo:window=5:ffn_ratio=1:heads={h}"]


def _hook_hidden(vlm, spec, ids, am, emb):
    """What inference computes (the hook, skipping work): hidden of the positions it keeps."""
    comp = Compression.parse(spec)
    comp.check(vlm.model)
    with torch.inference_mode():
        return vlm.model.language_model(emb, am, None, None, run=comp.lm_run(vlm.model, ids, am))


@pytest.mark.parametrize("spec", SPECS)
def test_masked_training_forward_equals_the_inference_hook(vlm, heads_file, spec):
    spec = spec.format(h=heads_file)
    images = noise_images(3)
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(PROMPTS, images)]
    inp = vlm.processor(text=texts, images=images)
    ids, am = inp["input_ids"], inp["attention_mask"]
    b, t = ids.shape
    with torch.inference_mode():
        emb = vlm.model.embed_inputs(ids, inp["pixel_values"])
        got = YopoTraining(parse_yopo(spec), 4).forward(
            vlm.model.language_model, emb, causal_padding_mask(am.bool(), t),
            default_position_ids(am, t, 0, emb.device).expand(b, t), ids == IMAGE_TOKEN)
    want = _hook_hidden(vlm, spec, ids, am, emb)
    vis = ids == IMAGE_TOKEN
    if "layercut" in spec:  # inference removed the visual positions; compare the text ones
        got, real = got[~vis].view(b, -1, got.shape[-1]), am.bool()[~vis].view(b, -1)
        assert want.shape[1] == t - int(vis[0].sum())
    else:
        real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    with torch.inference_mode():  # and the spec really changes the model
        plain = vlm.model.language_model(emb, am)
    assert (got[real] - (plain[~vis].view(b, -1, plain.shape[-1]) if "layercut" in spec else plain)[real]
            ).abs().max() > 1e-3


@pytest.mark.parametrize("spec", ["yopo:window=3:ffn_ratio=2:heads={h}",
                                  "yopo:window=3:ffn_ratio=2:heads={h}:layercut=1"])
def test_packed_blocks_under_yopo_equal_each_block_alone(vlm, heads_file, spec):
    """Training packs several conversations behind one image (block mask); each block's logits must be
    those of the conversation alone at inference with the same YOPO spec."""
    spec = spec.format(h=heads_file)
    model, lm = vlm.model, vlm.model.language_model
    lab = TurnLabeler(vlm.processor)
    n_img = model.num_image_tokens()
    blocks = [(("what is the colour ?", "red"),), (("describe the square", "a blue square"), ("yes ?", "no"))]
    batch = collate_packed([pack(lab, "k", blocks, n_img)], vlm.processor._pad_id())
    feats = torch.randn(n_img, 32, generator=torch.Generator().manual_seed(0))
    ids = batch["input_ids"]
    with torch.inference_mode():
        emb = model.embed_inputs(ids, image_features=[feats])
        packed = lm.logits(YopoTraining(parse_yopo(spec), 4).forward(
            lm, emb, block_mask(batch["block_ids"], batch["valid"]), batch["position_ids"],
            ids == IMAGE_TOKEN))[0]
    for i, blk in enumerate(blocks, start=1):
        one = torch.tensor([encode_rounds(lab, blk, n_img, "t")[0]])
        with torch.inference_mode():
            alone = lm.logits(_hook_hidden(vlm, spec, one, torch.ones_like(one),
                                           model.embed_inputs(one, image_features=[feats])))[0]
        sel = batch["block_ids"][0] == i
        torch.testing.assert_close(packed[sel], alone[-int(sel.sum()):], atol=1e-4, rtol=1e-4)


def test_grid_coords_and_refusals():
    vis = torch.tensor([[False] + [True] * 8 + [False], [True] * 4 + [False] * 2 + [True] * 4])
    img, r, c = grid_coords(vis, 2)
    assert img[0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert r[1].tolist() == [0, 0, 1, 1, -1, -1, 0, 0, 1, 1] and c[1].tolist() == [0, 1, 0, 1, -1, -1, 0, 1, 0, 1]
    with pytest.raises(InputError, match="whole 3x3"):
        grid_coords(vis, 3)
    for bad in ["fastv:layer=1:keep=0.5", "yopo:window=4", "", "yopo:window=3,fastervlm:keep=0.5"]:
        with pytest.raises(InputError, match="yopo"):
            parse_yopo(bad)


def _recipe(tmp_path: Path, tiny: Path, **kw) -> Path:
    """test_training's recipe (tiny model, LoRA, two sources) in a fresh directory, 4 steps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return training_recipe(tmp_path, tiny, **{"steps": 4, **kw})


def _trainer(tmp_path: Path, tiny: Path, **kw) -> Trainer:
    tr = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path, tiny, **kw).read_text())))
    tr.setup()
    return tr


def test_recipe_trains_under_yopo(tiny, tmp_path, heads_file, one_torch_thread):
    plain = _trainer(tmp_path / "p", tiny)
    same = _trainer(tmp_path / "s", tiny, yopo="yopo:window=7:bidirectional=false:ffn_ratio=1")  # covers the grid
    pruned = _trainer(tmp_path / "y", tiny, yopo=f"yopo:window=3:ffn_ratio=2:heads={heads_file}:layercut=1")
    groups = plain._batch_groups(0, 0)
    with torch.no_grad():
        a, b = plain.loss(groups), same.loss(groups)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # packed + padded rows: the identity spec is the model
    loss = pruned.loss(groups)
    assert torch.isfinite(loss) and abs(float(loss.detach()) - float(a)) > 1e-4
    loss.backward()
    lora = [p.grad for n, p in pruned.model.named_parameters() if ".lora_B" in n]
    assert lora and all(g is not None for g in lora) and any(float(g.abs().max()) > 0 for g in lora)

    out = train(_recipe(tmp_path / "run", tiny, yopo=f"yopo:window=3:ffn_ratio=2:heads={heads_file}:layercut=1"))
    vlm = llavakit.load(str(tiny), trained=str(out))
    spec = f"yopo:window=3:ffn_ratio=2:heads={heads_file}:layercut=1"
    text = vlm.chat("what is in the image ?", images=noise_images(1), compression=spec, max_new_tokens=3)
    assert isinstance(text, str)


@pytest.mark.parametrize("kw,needle", [({"yopo": "fastv:layer=1:keep=0.5"}, "exactly one yopo"),
                                       ({"yopo": "yopo:window=2"}, "window must be odd"),
                                       ({"yopo": "yopo:window=3", "stage": "align"}, "stage instruct"),
                                       ({"yopo": "yopo:window=3", "visual_token_drop": 0.5}, "cannot train together")])
def test_bad_yopo_recipes_are_refused(kw, needle):
    raw = {"data": [{"kind": "world-qa", "n": 2}], "stage": "instruct", **kw}
    with pytest.raises(InputError, match=needle):
        TrainConfig.from_dict(raw)


@pytest.mark.parametrize("spec,needle", [("yopo:layercut=5", "past the LM"),
                                         ("yopo:ffn_ratio=128", "no intermediate channel")])
def test_impossible_specs_for_this_lm_are_refused_at_setup(tiny, tmp_path, spec, needle):
    with pytest.raises(InputError, match=needle):
        _trainer(tmp_path, tiny, yopo=spec)
