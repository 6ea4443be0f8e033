"""Changing the tower layers a projector reads (LlavaModel.set_feature_layers, recipe key vision_feature_layer):
an added layer changes nothing until trained, a run continues a projector trained on fewer layers, the file
records its layers and reloads them, HF export keeps them, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llavakit
from llavakit import InputError
from llavakit.errors import CheckpointError
from llavakit.training.apply import apply_trained
from llavakit.training.config import TrainConfig
from llavakit.training.trainer import Trainer, train
from tests.tiny_models import build, noise_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("tiny-layers"))  # 3-layer tower, vision_feature_layer -2


def _recipe(tmp_path: Path, tiny: Path, **kw) -> Path:
    cfg = {"model": str(tiny), "stage": "instruct", "out_dir": str(tmp_path / "run"),
           "data": [{"kind": "world-bind", "n": 4}], "steps": 2, "batch_size": 2,
           "train": ["multi_modal_projector"], "lr": {"multi_modal_projector": 0.002, "lora": 0.001},
           "lora": {"r": 4, "alpha": 8}, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1}
    cfg.update(kw)
    p = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _logits(vlm):
    prompts = [vlm.build_prompt(f"what is this {i}?", [None]) for i in range(2)]
    enc = vlm.processor(text=prompts, images=noise_images(2))
    with torch.no_grad():
        return vlm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=enc["pixel_values"]).logits


def test_an_added_layer_changes_nothing_until_trained(tiny):
    vlm = llavakit.load(str(tiny))
    before = _logits(vlm)
    w = vlm.model.multi_modal_projector.linear_1.weight.detach().clone()  # (D, Dv)
    vlm.model.set_feature_layers([1, -2])  # the new layer first, the old one second
    cfg = vlm.config
    assert cfg.feature_layers == (1, -2) and cfg.projector.in_features == 2 * cfg.vision.hidden_size
    new_w = vlm.model.multi_modal_projector.linear_1.weight
    dv = cfg.vision.hidden_size
    assert torch.equal(new_w[:, dv:], w) and not new_w[:, :dv].any()
    assert torch.allclose(_logits(vlm), before, atol=1e-6)
    with torch.no_grad():
        new_w[:, :dv].normal_()
    assert not torch.allclose(_logits(vlm), before, atol=1e-3)  # the new layer is really read
    vlm.model.set_feature_layers(2)  # -2 of a 3-layer tower is hidden state 2: the old block, alone
    assert vlm.config.vision_feature_layer == 2 and torch.equal(vlm.model.multi_modal_projector.linear_1.weight, w)
    assert torch.allclose(_logits(vlm), before, atol=1e-6)


def test_bad_layers_are_refused(tiny):
    vlm = llavakit.load(str(tiny))
    with pytest.raises(InputError, match="twice"):
        vlm.model.set_feature_layers([-1, 3])  # the same layer under two names
    with pytest.raises(InputError, match="out of range"):
        vlm.model.set_feature_layers([7])
    assert vlm.config.feature_layers == (-2,)  # nothing changed
    vlm.model.add_projector_context(3, 4)
    with pytest.raises(InputError, match="context"):
        vlm.model.set_feature_layers([1, -2])
    for bad in ("x", [], [1.5], [True]):
        with pytest.raises(InputError, match="vision_feature_layer"):
            TrainConfig.from_dict({"data": [{"kind": "world-bind"}], "vision_feature_layer": bad})


def test_a_run_widens_a_trained_projector_and_the_file_keeps_its_layers(tiny, tmp_path):
    first = train(_recipe(tmp_path, tiny)) / "trained.safetensors"
    ref = llavakit.load(str(tiny), trained=first)
    t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(first), out_dir=str(tmp_path / "b"),
                                              vision_feature_layer=[1, -2])))
    t.setup()
    dv = t.model.config.vision.hidden_size
    saved = load_file(str(first))
    assert torch.equal(t.mu[dv:], saved["feature_mean"]) and torch.equal(t.sd[dv:], saved["feature_std"])
    untrained = t.save_trained(tmp_path / "step0.safetensors")  # before any step: the first run's model
    with safe_open(str(untrained), "pt") as f:
        assert json.loads(f.metadata()["vision_feature_layer"]) == [1, -2]
    widened = llavakit.load(str(tiny), trained=untrained)
    assert widened.config.feature_layers == (1, -2)
    assert torch.allclose(_logits(widened), _logits(ref), atol=1e-4)

    second = t.run() / "trained.safetensors"
    vlm = llavakit.load(str(tiny), trained=second)
    assert vlm.config.feature_layers == (1, -2)
    assert vlm.model.multi_modal_projector.linear_1.weight[:, :dv].abs().sum() > 0  # the new layer trained
    vlm.save_pretrained(tmp_path / "hf")  # HF LLaVA's list form holds it
    back = llavakit.load(str(tmp_path / "hf"))
    assert back.config.feature_layers == (1, -2)
    assert torch.allclose(_logits(back), _logits(vlm), atol=1e-4)
    # the next stage starts from the widened file without naming the layers again
    t3 = Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(second), out_dir=str(tmp_path / "c"))))
    t3.setup()
    assert t3.model.config.feature_layers == (1, -2)


def test_a_file_whose_projector_does_not_fit_is_refused(tiny, tmp_path):
    vlm = llavakit.load(str(tiny))
    dv, d = vlm.config.vision.hidden_size, vlm.config.projector.out_features
    state = {f"multi_modal_projector.{k}": v.contiguous() for k, v in vlm.model.multi_modal_projector.state_dict().items()}
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(d, 2 * dv)  # two layers' width
    bad = tmp_path / "wide.safetensors"
    save_file(state, str(bad))  # no layers in its metadata
    with pytest.raises(CheckpointError, match="projector does not match"):
        apply_trained(vlm.model, bad)
    save_file(state, str(bad), metadata={"vision_feature_layer": "[9, -1]"})
    with pytest.raises(CheckpointError, match="vision_feature_layer"):
        apply_trained(llavakit.load(str(tiny)).model, bad)
    save_file(state, str(bad), metadata={"vision_feature_layer": "[1, -2]"})
    fixed = llavakit.load(str(tiny))
    apply_trained(fixed.model, bad)  # the metadata says which two layers: it loads
    assert fixed.config.feature_layers == (1, -2)
    save_file({**state, "feature_mean": torch.zeros(2 * dv), "feature_std": torch.ones(2 * dv)}, str(bad))
    with pytest.raises(InputError, match="does not fit"):  # as init_from, without layers in its metadata
        Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(bad)))).setup()
