"""Visual re-injection (models/visual_inject.py): zero-init changes nothing, only visual rows move, cached and
uncached generation agree, training ships and reloads the branch, export and impossible combinations refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.config import VLMConfig
from llavakit.errors import CheckpointError
from llavakit.models.visual_inject import VisualInjection
from llavakit.training.apply import apply_trained
from llavakit.training.config import TrainConfig
from llavakit.training.trainer import Trainer, train
from tests.tiny_models import build, noise_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("tiny-inject"))


def _recipe(tmp_path: Path, tiny: Path, **kw) -> Path:
    cfg = {"model": str(tiny), "stage": "instruct", "out_dir": str(tmp_path / "run"),
           "data": [{"kind": "world-bind", "n": 4}], "steps": 3, "batch_size": 2,
           "train": ["multi_modal_projector", "visual_inject"],
           "lr": {"multi_modal_projector": 0.002, "lora": 0.001, "visual_inject": 0.05},
           "lora": {"r": 4, "alpha": 8}, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1,
           "visual_inject": [1], "visual_inject_rank": 4}
    cfg.update(kw)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _inputs(vlm, n=2):
    prompts = [vlm.build_prompt(f"what is this {i}?", [None]) for i in range(n)]
    return vlm.processor(text=prompts, images=noise_images(n))


def _logits(vlm, enc):
    with torch.no_grad():
        return vlm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=enc["pixel_values"]).logits


def test_zero_init_changes_nothing_then_moves_only_visual_rows(tiny):
    vlm = llavakit.load(str(tiny))
    enc = _inputs(vlm)
    before = _logits(vlm, enc)
    vlm.model.add_visual_inject([1], 4)
    assert vlm.config.visual_inject_layers == (1,) and vlm.config.visual_inject_rank == 4
    assert torch.equal(_logits(vlm, enc), before)
    torch.nn.init.normal_(vlm.model.visual_inject.up["1"].weight)
    after = _logits(vlm, enc)
    visual = enc["input_ids"] == vlm.config.image_token_id
    first = int(visual.float().argmax(1).min())
    assert torch.equal(after[:, :first], before[:, :first])  # before the image: untouched (causal)
    assert not torch.allclose(after[:, first:], before[:, first:])
    with pytest.raises(InputError, match="already"):
        vlm.model.add_visual_inject([1], 4)


def test_only_the_bound_visual_rows_are_written():
    inj = VisualInjection(8, [2], 3)
    torch.nn.init.normal_(inj.up["2"].weight)
    emb = torch.randn(2, 5, 8)  # (B, T, D)
    visual = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    bound = inj.bind(emb, visual)
    h = torch.randn(2, 7, 8)  # two more (generated) positions than the prompt
    out = bound(h, 2)
    assert torch.equal(out[~torch.cat([visual, visual.new_zeros(2, 2)], 1)],
                       h[~torch.cat([visual, visual.new_zeros(2, 2)], 1)])
    want = inj.up["2"](inj.down["2"](emb[visual]))
    assert torch.allclose(out[:, :5][visual] - h[:, :5][visual], want, atol=1e-6)
    with pytest.raises(InputError, match="bound"):
        bound(torch.randn(2, 4, 8), 2)  # shorter than the prompt it was bound to
    with pytest.raises(InputError, match="distinct"):
        VisualInjection(8, [2, 2], 3)
    with pytest.raises(InputError, match="rank"):
        VisualInjection(8, [2], 0)


def test_generation_with_and_without_cache_agree(tiny):
    vlm = llavakit.load(str(tiny))
    vlm.model.add_visual_inject([1], 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(vlm.model.visual_inject.up["1"].weight, std=0.5)
    enc = _inputs(vlm)
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
              max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        cached = vlm.generate(**kw, use_cache=True)
        full = vlm.generate(**kw, use_cache=False)
    assert torch.equal(cached, full)


def test_in_llm_compression_is_refused(tiny):
    vlm = llavakit.load(str(tiny))
    vlm.model.add_visual_inject([1], 4)
    enc = _inputs(vlm, 1)
    with pytest.raises(InputError, match="re-injection"):
        vlm.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], max_new_tokens=2,
                     compression="fastv:layer=1:keep=0.5")


def test_trained_branch_ships_and_reloads(tiny, tmp_path):
    out = train(_recipe(tmp_path, tiny)) / "trained.safetensors"
    t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(out), out_dir=str(tmp_path / "b"))))
    t.setup()
    assert t.model.visual_inject.up["1"].weight.abs().sum() > 0  # trained, and loaded back
    vlm = llavakit.load(str(tiny))
    apply_trained(vlm.model, out)  # a plain model gains the branch from the file
    assert vlm.config.visual_inject_layers == (1,) and vlm.config.visual_inject_rank == 4
    for k, v in t.model.visual_inject.state_dict().items():
        assert torch.allclose(vlm.model.visual_inject.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="re-injection"):
        vlm.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(InputError, match="visual_inject"):  # the branch cannot be silently dropped
        Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(out), visual_inject=[],
                                              train=["multi_modal_projector"],
                                              lr={"multi_modal_projector": 0.002, "lora": 0.001},
                                              out_dir=str(tmp_path / "c")))).setup()


def test_recipe_and_config_errors():
    with pytest.raises(InputError, match="visual_inject"):
        TrainConfig.from_dict({"data": [{"kind": "world-bind"}], "train": ["visual_inject"],
                               "lr": {"visual_inject": 0.01}})
    with pytest.raises(InputError, match="list of LM layer"):
        TrainConfig.from_dict({"data": [{"kind": "world-bind"}], "visual_inject": 3})
    with pytest.raises(InputError, match="go together"):
        VLMConfig(visual_inject_layers=(1,))
    with pytest.raises(InputError, match="only"):
        VLMConfig.from_dict({"visual_inject_layers": [99], "visual_inject_rank": 4})


def test_cost_counts_the_branch_in_its_layers(tiny):
    vlm = llavakit.load(str(tiny))
    before = vlm.cost(prompt_tokens=30, new_tokens=2, image_sizes=[(32, 32)])
    vlm.model.add_visual_inject([1], 4)
    after = vlm.cost(prompt_tokens=30, new_tokens=2, image_sizes=[(32, 32)])
    d, v = vlm.config.lm.hidden_size, after.visual_tokens["llm"]
    assert after.lm_prefill_flops_per_layer[0] == before.lm_prefill_flops_per_layer[0]
    assert after.lm_prefill_flops_per_layer[1] - before.lm_prefill_flops_per_layer[1] == 2 * 2 * v * d * 4


def test_forward_without_input_ids_is_refused_when_the_branch_needs_them(tiny):
    vlm = llavakit.load(str(tiny))
    vlm.model.add_visual_inject([1], 4)
    enc = _inputs(vlm, 1)
    with torch.no_grad():
        emb = vlm.model.embed_inputs(enc["input_ids"], enc["pixel_values"])
        with pytest.raises(InputError, match="input_ids"):
            vlm.model(inputs_embeds=emb)
        assert torch.equal(vlm.model(input_ids=enc["input_ids"], inputs_embeds=emb).logits,
                           vlm.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits)


def test_a_file_with_another_branch_is_refused(tiny, tmp_path):
    out = train(_recipe(tmp_path, tiny)) / "trained.safetensors"
    vlm = llavakit.load(str(tiny))
    vlm.model.add_visual_inject([1], 2)  # rank 2, the file has rank 4
    with pytest.raises(CheckpointError, match="does not match"):
        apply_trained(vlm.model, out)
