"""The projector's local-context branch (models/projector.py): zero-init is the identity, the
standardisation folds exactly, training/shipping round-trips, pruning sees the full grid, export refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.compression.pipeline import Compression
from llavakit.config import ProjectorConfig
from llavakit.errors import CheckpointError
from llavakit.models.projector import Projector
from llavakit.training.apply import apply_trained
from llavakit.training.config import TrainConfig
from llavakit.training.trainer import Trainer, fold_standardization, train, unfold_standardization
from tests.tiny_models import build, noise_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("tiny-ctx"))


def _recipe(tmp_path: Path, tiny: Path, **kw) -> Path:
    cfg = {"model": str(tiny), "stage": "instruct", "out_dir": str(tmp_path / "run"),
           "data": [{"kind": "world-bind", "n": 4}], "steps": 3, "batch_size": 2,
           "lr": {"multi_modal_projector": 0.002, "lora": 0.001, "projector_context": 0.01},
           "lora": {"r": 4, "alpha": 8}, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 1,
           "projector_context": 3, "projector_context_channels": 8}
    cfg.update(kw)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _pixels(vlm, n=2):
    return vlm.processor(text=["<image> hi"] * n, images=noise_images(n))["pixel_values"]


def test_added_branch_changes_nothing_until_trained(tiny):
    vlm = llavakit.load(str(tiny))
    pv = _pixels(vlm)
    with torch.no_grad():
        before = torch.stack(vlm.model.get_image_features(pv))
        vlm.model.add_projector_context(3, 8)
        after = torch.stack(vlm.model.get_image_features(pv))
    assert vlm.config.projector.context_kernel == 3 and vlm.model.multi_modal_projector.has_context
    assert torch.equal(before, after)
    torch.nn.init.normal_(vlm.model.multi_modal_projector.context.up.weight)
    with torch.no_grad():
        assert not torch.allclose(torch.stack(vlm.model.get_image_features(pv)), before)


def test_standardisation_folds_exactly():
    cfg = ProjectorConfig(in_features=12, out_features=10, context_kernel=3, context_channels=5)
    trained, shipped = Projector(cfg), Projector(cfg)
    torch.nn.init.normal_(trained.context.up.weight)
    mu, sd = torch.randn(12), torch.rand(12) + 0.5
    folded = fold_standardization(trained.state_dict(), mu, sd)
    shipped.load_state_dict(folded)
    x = torch.randn(3, 16, 12)  # (N, T, Dv): 4x4 grids
    with torch.no_grad():
        assert torch.allclose(trained((x - mu) / sd), shipped(x), atol=1e-5)
    back = unfold_standardization(folded, mu, sd)
    for k, v in trained.state_dict().items():
        assert torch.allclose(back[k], v, atol=1e-5), k


def test_branch_needs_a_full_grid():
    p = Projector(ProjectorConfig(in_features=4, out_features=4, context_kernel=3))
    with pytest.raises(InputError, match="square"):
        p(torch.randn(1, 10, 4))
    with pytest.raises(InputError, match="full patch grid"):
        p(torch.randn(1, 12, 4), grid=(4, 4))
    with pytest.raises(InputError, match="odd"):
        ProjectorConfig(context_kernel=2)


def test_trained_branch_ships_and_reloads(tiny, tmp_path):
    out = train(_recipe(tmp_path, tiny)) / "trained.safetensors"
    t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(out), out_dir=str(tmp_path / "b"))))
    t.setup()
    assert t.model.multi_modal_projector.context.up.weight.abs().sum() > 0  # trained, and loaded back
    vlm = llavakit.load(str(tiny))
    meta = apply_trained(vlm.model, out)  # a plain model gains the branch from the file
    assert meta["steps"] == "3" and vlm.config.projector.context_kernel == 3
    feats = torch.randn(2, 16, 32)  # (B, N, Dv) raw tower features of 4x4 grids
    with torch.no_grad():
        want = t.model.multi_modal_projector((feats - t.mu) / t.sd)
        assert torch.allclose(vlm.model.multi_modal_projector(feats), want, atol=1e-5)
    with pytest.raises(CheckpointError, match="local-context"):
        vlm.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(InputError, match="projector_context"):  # the branch cannot be silently dropped
        Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(out), projector_context=0,
                                              lr={"multi_modal_projector": 0.002, "lora": 0.001},
                                              out_dir=str(tmp_path / "c")))).setup()


def test_context_recipe_starts_from_a_plain_run(tiny, tmp_path):
    plain = train(_recipe(tmp_path, tiny, projector_context=0, lr={"multi_modal_projector": 0.002, "lora": 0.001}))
    t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from=str(plain), out_dir=str(tmp_path / "b"))))
    t.setup()
    assert t.model.multi_modal_projector.context.up.weight.abs().sum() == 0
    names = [{id(p) for p in g["params"]} for g in t.opt.param_groups]
    ctx = {id(p) for p in t.model.multi_modal_projector.context.parameters()}
    assert sum(bool(ctx & g) for g in names) == 1 and any(g == ctx for g in names)  # its own lr group only
    with pytest.raises(InputError, match="projector_context"):
        TrainConfig.from_dict({"data": [{"kind": "world-bind"}], "lr": {"projector_context": 0.01}})


def test_pruning_keeps_the_full_grid_context(tiny):
    vlm = llavakit.load(str(tiny))
    vlm.model.add_projector_context(3, 8)
    torch.nn.init.normal_(vlm.model.multi_modal_projector.context.up.weight, std=0.1)
    pv = _pixels(vlm)
    comp = Compression.parse("random:keep=0.5")
    with torch.no_grad():
        full = torch.stack(vlm.model.get_image_features(pv))  # (N, 16, D)
        kept = comp.image_features(vlm.model, pv)
    for f, pos, ref in zip(kept.features, kept.positions, full):
        idx = pos[:, 0] * kept.grid[1] + pos[:, 1]
        assert torch.allclose(f, ref[idx], atol=1e-5)  # each kept token = its token of the full-grid pass
