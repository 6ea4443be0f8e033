"""Training recipes on a tiny checkpoint: packing equivalence, resume, bad configs, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.data.dataset import IGNORE_INDEX, TurnLabeler
from llavakit.training import checkpoint
from llavakit.training.apply import apply_trained
from llavakit.training.config import TrainConfig
from llavakit.training.packing import block_mask, collate_packed, encode_rounds, pack
from llavakit.training.trainer import Trainer, train
from tests.tiny_models import build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("tiny-train"))


def _recipe(tmp_path: Path, tiny: Path, **kw) -> Path:
    cfg = {"model": str(tiny), "stage": "instruct", "out_dir": str(tmp_path / "run"),
           "data": [{"kind": "world-instruction", "n": 4}, {"kind": "world-report", "n": 6, "weight": 0.5}],
           "steps": 6, "batch_size": 2, "lr": {"multi_modal_projector": 0.002, "lora": 0.001},
           "lora": {"r": 4, "alpha": 8}, "warmup_steps": 2, "checkpoint_every": 2, "log_every": 1}
    cfg.update(kw)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_packed_blocks_give_the_same_logits_as_alone(tiny):
    vlm = llavakit.load(str(tiny))
    lm, model = vlm.model.language_model, vlm.model
    lab = TurnLabeler(vlm.processor)
    n_img = model.num_image_tokens()
    blocks = [(("what is the colour ?", "red"),), (("describe the square", "a blue square"), ("yes ?", "no"))]
    ex = pack(lab, "k", blocks, n_img)
    batch = collate_packed([ex], vlm.processor._pad_id())
    feats = torch.randn(1, n_img, 32)
    with torch.no_grad():
        emb = model.embed_inputs(batch["input_ids"], image_features=[feats[0]])
        packed = lm.logits(lm(emb, attention_mask=block_mask(batch["block_ids"], batch["valid"]),
                              position_ids=batch["position_ids"]))[0]
        for i, b in enumerate(blocks, start=1):
            ids, labels = encode_rounds(lab, b, n_img, "t")
            alone = lm.logits(lm(model.embed_inputs(torch.tensor([ids]), image_features=[feats[0]])))[0]
            sel = (batch["block_ids"][0] == i)
            n_prefix = int((batch["block_ids"][0] == 0).sum())
            assert torch.allclose(packed[sel], alone[n_prefix:], atol=1e-5)
            assert (batch["labels"][0][sel] == torch.tensor(labels[n_prefix:])).all()
    assert (batch["labels"][0][batch["block_ids"][0] == 0] == IGNORE_INDEX).all()


def test_train_writes_weights_that_reload(tiny, tmp_path, monkeypatch):
    out = train(_recipe(tmp_path, tiny))
    logs = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 7)) and all(r["loss"] > 0 for r in logs)
    assert (out / "loss.png").is_file()
    vlm = llavakit.load(str(tiny))
    before = vlm.model.language_model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_trained(vlm.model, out / "trained.safetensors")
    assert not torch.equal(before, vlm.model.language_model.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(vlm.chat("what is in the image ?", images=str(REPO / "llavakit/assets/sample.png"),
                               max_new_tokens=3), str)
    # the shipping form: LoRA in fp16, the same model to fp16 rounding
    from llavakit.training.apply import compact_trained

    half = compact_trained(out / "trained.safetensors", tmp_path / "half.safetensors")
    assert half.stat().st_size < (out / "trained.safetensors").stat().st_size
    other = llavakit.load(str(tiny))
    apply_trained(other.model, half)
    for (k, a), b in zip(vlm.model.named_parameters(), other.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), k  # fp16 rounding
    # the packed form the package ships: gzip of the same bytes, unpacked once into the cache by trained_weights
    import gzip

    from llavakit.default import build as build_mod

    from safetensors import safe_open

    def content(path):  # metadata and tensors (safetensors writes the metadata keys in no fixed order)
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def same(p, q):
        (ma, ta), (mb, tb) = content(p), content(q)
        return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    packed = compact_trained(out / "trained.safetensors", tmp_path / "half.safetensors.gz")
    assert packed.stat().st_size < half.stat().st_size
    (tmp_path / "plain.safetensors").write_bytes(gzip.decompress(packed.read_bytes()))
    assert same(tmp_path / "plain.safetensors", half)
    package = tmp_path / "pkg"
    (package / "weights").mkdir(parents=True)
    (package / "weights" / "default-trained.safetensors.gz").write_bytes(packed.read_bytes())
    monkeypatch.setattr(build_mod, "__file__", str(package / "build.py"))
    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path / "cache"))
    unpacked = build_mod.trained_weights()
    assert unpacked.parent == tmp_path / "cache" / "default-trained" and same(unpacked, half)
    assert build_mod.trained_weights() == unpacked and len(list(unpacked.parent.iterdir())) == 1  # reused
    (package / "weights" / "default-trained.safetensors.gz").unlink()
    assert build_mod.trained_weights() is None
    # load(trained=RUN) applies a run's weights (the file or its out_dir), the same as apply_trained
    for src in (out, out / "trained.safetensors"):
        via = llavakit.load(str(tiny), trained=src)
        for (k, a), b in zip(vlm.model.named_parameters(), via.model.parameters()):
            assert torch.equal(a, b), k


def test_load_refuses_missing_trained_weights_before_reading_the_model(tiny, tmp_path, monkeypatch):
    from llavakit import loader
    from llavakit.errors import CheckpointError

    monkeypatch.setattr(loader, "load_dir", lambda *a, **k: pytest.fail("model read before the weights were checked"))
    with pytest.raises(CheckpointError, match="do not exist"):
        llavakit.load(str(tiny), trained=tmp_path / "nothing" / "trained.safetensors")
    with pytest.raises(CheckpointError, match="do not exist"):
        llavakit.load(str(tiny), trained=tmp_path)  # an out_dir without trained.safetensors


def _race_groups(keys: list[str]) -> list:
    """One small image per key (its red channel set by the key), as ImageGroups."""
    from PIL import Image

    from llavakit.training.data import ImageGroup

    return [ImageGroup(k, lambda k=k: Image.new("RGB", (40, 30), (10 * len(k), 30, 200)), ()) for k in keys]


def _cache_in_race(tiny: str, root: str, keys: list[str], barrier, out) -> None:
    """One of two processes that build the same feature cache at the same moment."""
    from llavakit.training.features import FeatureCache

    vlm = llavakit.load(tiny)
    groups = _race_groups(keys)
    barrier.wait()
    try:
        cache = FeatureCache(Path(root)).build(vlm.model, vlm.processor, groups)
        out.put((keys[0], cache.get(keys).float().numpy()))  # numpy: a tensor would need this process alive
    except Exception as e:  # reported to the test, which fails on it
        out.put((keys[0], repr(e)))


def test_feature_cache_two_writers_at_once(tiny, tmp_path):
    """Two processes (the ranks of a torchrun job, or two runs sharing LLAVAKIT_FEATURE_CACHE) build one
    cache at the same moment with overlapping keys: both succeed, each key is cached once, and each
    process reads the features a lone build gives. Without the cache's lock this test failed 4 of 4 runs
    here (one process's index entries overwrote the other's), and two builds of the same keys raised
    FileNotFoundError 2 times in 5 (both renamed the same temp shard): how CI's torchrun test fell."""
    import multiprocessing as mp

    from llavakit.training.features import FeatureCache

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    keys = {"a": ["a", "bb", "ccc"], "bb": ["bb", "ccc", "dddd"]}
    procs = [ctx.Process(target=_cache_in_race, args=(str(tiny), str(tmp_path / "f"), k, barrier, out))
             for k in keys.values()]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(not isinstance(v, str) for v in got.values()), got
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert sorted(index) == ["a", "bb", "ccc", "dddd"]
    assert not list((tmp_path / "f").glob("*.tmp"))
    vlm = llavakit.load(str(tiny))
    for first, ks in keys.items():
        alone = FeatureCache(tmp_path / ("alone-" + first)).build(vlm.model, vlm.processor, _race_groups(ks))
        # the same features up to fp16 rounding (a batch of other images can change the last bit)
        torch.testing.assert_close(torch.from_numpy(got[first]), alone.get(ks).float(), atol=4e-3, rtol=4e-3)


def test_feature_cache_refuses_another_tower(tiny, tmp_path):
    """The cache is stamped with the tower's fingerprint: the same tower reuses it (nothing recomputed);
    a tower with other weights is refused before any feature is read, and the cache is left intact."""
    from PIL import Image

    from llavakit.training.data import ImageGroup
    from llavakit.training.features import TOWER, FeatureCache

    calls = []

    def img():
        calls.append(1)
        return Image.new("RGB", (40, 30), (200, 30, 30))

    groups = [ImageGroup("a", img, ()), ImageGroup("b", img, ())]
    vlm = llavakit.load(str(tiny))
    first = FeatureCache(tmp_path / "f").build(vlm.model, vlm.processor, groups)
    assert len(calls) == 2 and (tmp_path / "f" / TOWER).is_file()
    again = FeatureCache(tmp_path / "f").build(vlm.model, vlm.processor, groups)
    assert len(calls) == 2 and torch.equal(first.get(["a", "b"]), again.get(["a", "b"]))
    files = {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir()}
    with torch.no_grad():
        next(vlm.model.vision_tower.parameters()).add_(0.01)
    with pytest.raises(InputError, match="another vision tower"):
        FeatureCache(tmp_path / "f").build(vlm.model, vlm.processor, groups)
    assert {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir()} == files and len(calls) == 2
    (tmp_path / "f" / TOWER).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        FeatureCache(tmp_path / "f").build(vlm.model, vlm.processor, groups)


def test_init_from_continues_from_saved_weights(tiny, tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    first = train(_recipe(tmp_path / "a", tiny, steps=2))
    for src in (first, first / "trained.safetensors"):  # a run directory or the weights file itself
        t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path / "b", tiny, steps=2, init_from=str(src))))
        t.setup()
        saved = tmp_path / "resaved.safetensors"
        t.save_trained(saved)  # nothing trained yet: must round-trip the first run's weights exactly
        from safetensors.torch import load_file

        a, b = load_file(str(first / "trained.safetensors")), load_file(str(saved))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    with pytest.raises(InputError, match="init_from"):
        Trainer(TrainConfig.from_yaml(_recipe(tmp_path / "c", tiny, init_from=str(tmp_path / "none")))).setup()


def test_init_from_shipped_names_the_packed_default_weights(tiny, tmp_path, monkeypatch):
    """`init_from: shipped` starts a fine-tune from the trained weights packed in llavakit (no earlier run on
    disk); it is refused for another model, and where the install carries no packed file."""
    from llavakit.default import build as build_mod

    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path / "cache"))
    shipped = Trainer._init_path("shipped")  # the real packed file, unpacked into the cache
    assert shipped == build_mod.trained_weights() and shipped.suffix == ".safetensors"
    assert shipped.is_relative_to(tmp_path / "cache") and shipped.stat().st_size > 0
    monkeypatch.setattr(build_mod, "trained_weights", lambda: None)
    with pytest.raises(InputError, match="no packed trained weights"):
        Trainer._init_path("shipped")
    run = tmp_path / "run"
    assert Trainer._init_path(str(run)) == run / "trained.safetensors"
    assert Trainer._init_path(str(run / "w.safetensors")) == run / "w.safetensors"
    with pytest.raises(InputError, match="default model's packed weights"):
        TrainConfig.from_yaml(_recipe(tmp_path, tiny, init_from="shipped"))


def test_init_from_grows_lora_without_changing_the_model(tiny, tmp_path):
    """A recipe with a larger LoRA (rank 4 -> 8, attention -> attention + MLP) starts from an r4 run:
    the merged model is the same function, and shrinking back is refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = train(_recipe(tmp_path / "a", tiny, steps=2)) / "trained.safetensors"
    big = {"r": 8, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    t = Trainer(TrainConfig.from_yaml(_recipe(tmp_path / "b", tiny, steps=2, init_from=str(first), lora=big)))
    t.setup()
    grown = tmp_path / "grown.safetensors"
    t.save_trained(grown)
    ref, new = llavakit.load(str(tiny)), llavakit.load(str(tiny))
    apply_trained(ref.model, first)
    apply_trained(new.model, grown)
    a, b = dict(ref.model.named_parameters()), dict(new.model.named_parameters())
    assert any(not torch.equal(a[k], llavakit.load(str(tiny)).model.get_parameter(k)) for k in a)  # LoRA did merge
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    with pytest.raises(InputError, match="init_from.*shrink"):
        Trainer(TrainConfig.from_yaml(_recipe(tmp_path / "b", tiny, init_from=str(grown),
                                              lora={"r": 4, "alpha": 8, "targets": big["targets"]}))).setup()


def test_world_qa_and_balanced_easyvqa_sources():
    from llavakit.training.config import DataSource
    from llavakit.training.data import build_groups

    groups = build_groups(DataSource(kind="world-qa", n=30, questions_per_image=16, seed=2))
    assert len(groups) >= 30
    assert all(len(b) == 1 for g in groups for b in g.blocks)  # single-round blocks
    again = build_groups(DataSource(kind="world-qa", n=30, questions_per_image=16, seed=2))
    assert [g.blocks for g in groups] == [g.blocks for g in again]  # deterministic
    questions = " ".join(b[0][0] for g in groups for b in g.blocks).lower()
    for kind in ("colour", "shape", "where", "how many", "is there"):
        assert kind in questions, kind
    answers = {}
    for g in build_groups(DataSource(kind="easyvqa", yes_no="balanced")):
        for ((q, a),) in g.blocks:
            answers[a] = answers.get(a, 0) + 1
    assert abs(answers["yes"] - answers["no"]) < 0.02 * (answers["yes"] + answers["no"])
    assert answers["circle"] > 1000  # open questions are all kept
    with pytest.raises(InputError, match="yes_no"):
        DataSource(kind="world-qa", yes_no="balanced")
    with pytest.raises(InputError, match="valid: all, balanced"):
        DataSource(kind="easyvqa", yes_no="some")


def test_world_bind_source_asks_binding_questions_with_true_answers():
    from llavakit.data.world.language import POSITION_PHRASES
    from llavakit.training.config import DataSource
    from llavakit.training.data import build_groups

    groups = build_groups(DataSource(kind="world-bind", n=40, questions_per_image=32, seed=0))
    assert len(groups) == 40 and len({g.key for g in groups}) == 40  # all of a scene's questions on one image
    again = build_groups(DataSource(kind="world-bind", n=40, questions_per_image=32, seed=0))
    assert [g.blocks for g in groups] == [g.blocks for g in again]  # deterministic
    assert [g.blocks for g in groups] != [g.blocks for g in build_groups(DataSource(kind="world-bind", n=40,
                                                                                  questions_per_image=32, seed=1))]
    qa = [b[0] for g in groups for b in g.blocks]
    assert sum(len(g.blocks) for g in groups) / 40 > 12  # dense
    yes = sum(a == "yes" for _, a in qa)
    no = sum(a == "no" for _, a in qa)
    assert abs(yes - no) < 0.1 * (yes + no)  # yes/no balanced by construction
    q = " ".join(x for x, _ in qa).lower()
    for kind in ("what colour is the", "shape is the", "is there a", "where is the"):
        assert kind in q or kind.replace("colour", "color") in q, kind
    # "What colour is the circle?" is only asked when the circle is the scene's only circle, and answered
    # with its colour: check against the objects of the scene the group was drawn from.
    from llavakit.training.data import _bind_scene

    checked = 0
    for i, group in enumerate(groups):
        scene = _bind_scene(i, 0)[1]
        assert 2 <= len(scene.objects) <= 4
        for ((question, answer),) in group.blocks:
            text = question.split("?")[0].lower()
            if text.startswith("what colour is the ") and text.count(" ") == 4:
                (obj,) = [o for o in scene.objects if o.shape == text.split()[-1]]  # a unique referent
                assert answer == obj.colour
                checked += 1
            if text.startswith(("where is the ", "in which part")):
                assert answer in POSITION_PHRASES
    assert checked >= 10


def test_world_position_source_asks_only_where_each_object_is():
    import re

    from llavakit.data.world.scene import POSITIONS
    from llavakit.training.config import DATA_KINDS, DataSource
    from llavakit.training.data import _world_scene, build_groups

    assert "world-position" in DATA_KINDS
    src = DataSource(kind="world-position", n=60, questions_per_image=16, seed=0)
    groups = build_groups(src)
    assert [g.blocks for g in groups] == [g.blocks for g in build_groups(src)]  # deterministic
    answers = set()
    for group in groups:
        i = int(group.key.split(":")[-1])
        scene = _world_scene(i, 5003, words=False)[1]  # the scene the group was drawn from
        asked = [q for b in group.blocks for q, _ in b]
        assert len(asked) == len(set(asked))  # each question once
        for ((question, answer),) in group.blocks:
            assert answer in POSITIONS
            answers.add(answer)
            where = re.search(r"(?:where is|part of the image is) the (.+?)(?: located)?\?", question.lower())
            ref = where.group(1).split()
            named = [o for o in scene.objects if all(w in (o.colour, o.shape, o.size, "object") for w in ref)]
            assert len(named) == 1 and scene.position(named[0]) == answer, (question, answer)
    assert answers == set(POSITIONS)
    assert sum(len(g.blocks) for g in groups) > 2 * len(groups)  # several questions share one image


def test_non_finite_steps_are_skipped_and_a_diverged_run_stops(tiny, tmp_path, monkeypatch):
    from llavakit.errors import TrainingError
    from llavakit.training import trainer as trainer_mod

    real = Trainer.loss

    def loss_nan_at_step_3(self, groups, where=(0, 0)):
        out = real(self, groups, where)
        return out * float("nan") if self.step == 2 else out

    monkeypatch.setattr(Trainer, "loss", loss_nan_at_step_3)
    out = train(_recipe(tmp_path, tiny))
    logs = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in logs] == [0, 0, 1, 0, 0, 0]
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(out / "trained.safetensors")).values())

    monkeypatch.setattr(Trainer, "loss", lambda self, groups, where=(0, 0): real(self, groups, where) * float("nan"))
    monkeypatch.setattr(trainer_mod, "MAX_BAD_STEPS", 2)
    (tmp_path / "b").mkdir()
    with pytest.raises(TrainingError, match="non-finite"):
        train(_recipe(tmp_path / "b", tiny))


def test_resume_continues_identically(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = train(_recipe(tmp_path / "a", tiny))
    # an interrupted run: 4 steps and their checkpoint, then a kill -9 in the middle of the next write
    recipe = _recipe(tmp_path / "b", tiny)
    part = Trainer(TrainConfig.from_dict(yaml.safe_load(recipe.read_text())))
    part.setup()
    part.out.mkdir(parents=True, exist_ok=True)
    while part.step < 4:
        part.opt.zero_grad()
        part.loss(part._batch_groups(part.step, 0)).backward()
        torch.nn.utils.clip_grad_norm_(part.params, 1.0)
        part.opt.step()
        part.sched.step()
        part.step += 1
    checkpoint.save(part.out, part._state())
    (part.out / ".checkpoint.pt.tmp-999").write_bytes(b"torn")  # a write killed midway
    resumed = train(recipe, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "trained.safetensors")), load_file(str(resumed / "trained.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(resumed.glob(".checkpoint.pt.tmp-*"))


@pytest.mark.parametrize("select", ["random", "cls"])
def test_visual_token_drop_changes_the_loss_and_resumes_identically(tiny, tmp_path, select):
    """Hiding visual tokens changes what the text sees (so the loss), is drawn per (seed, step), and a
    run resumed from its step-4 checkpoint ends with the same weights as the uninterrupted one."""
    kw = {"visual_token_drop": 1.0, "visual_token_keep": [0.2, 0.4], "visual_token_select": select}
    for d in "pdab":
        (tmp_path / d).mkdir()
    plain = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path / "p", tiny).read_text())))
    drop = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path / "d", tiny, **kw).read_text())))
    plain.setup()
    drop.setup()
    groups = plain._batch_groups(0, 0)
    with torch.no_grad():
        a, b, c = plain.loss(groups, (0, 0)), drop.loss(groups, (0, 0)), drop.loss(groups, (0, 0))
    assert torch.isfinite(b) and float(a) != float(b) and float(b) == float(c)

    full = train(_recipe(tmp_path / "a", tiny, **kw))
    recipe = _recipe(tmp_path / "b", tiny, **kw)
    part = Trainer(TrainConfig.from_dict(yaml.safe_load(recipe.read_text())))
    part.setup()
    part.out.mkdir(parents=True, exist_ok=True)
    while part.step < 4:
        part.opt.zero_grad()
        part.loss(part._batch_groups(part.step, 0), (part.step, 0)).backward()
        torch.nn.utils.clip_grad_norm_(part.params, 1.0)
        part.opt.step()
        part.sched.step()
        part.step += 1
    checkpoint.save(part.out, part._state())
    resumed = train(recipe, resume=True)
    from safetensors.torch import load_file

    x, y = load_file(str(full / "trained.safetensors")), load_file(str(resumed / "trained.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_source_without_token_drop_trains_as_plain(tiny, tmp_path):
    """A data source with its own `visual_token_drop: 0` is never hidden from, inside a recipe that hides
    tokens in every other source's sequences; one image in two sources with different chances is refused."""
    data = [{"kind": "world-instruction", "n": 4, "visual_token_drop": 0.0},
            {"kind": "world-report", "n": 6, "weight": 0.5}]
    kw = {"visual_token_drop": 1.0, "visual_token_keep": [0.2, 0.4]}
    for d in "pmx":
        (tmp_path / d).mkdir()
    plain = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path / "p", tiny).read_text())))
    mixed = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path / "m", tiny, data=data, **kw).read_text())))
    plain.setup()
    mixed.setup()
    kept = [g for g in plain.groups if g.key.startswith("world-instruction")][:2]
    hidden = [g for g in plain.groups if g.key.startswith("world-report")][:2]
    with torch.no_grad():
        assert float(mixed.loss(kept, (0, 0))) == float(plain.loss(kept, (0, 0)))
        assert float(mixed.loss(hidden, (0, 0))) != float(plain.loss(hidden, (0, 0)))
    twice = [{"kind": "world-report", "n": 2}, {"kind": "world-report", "n": 2, "visual_token_drop": 0.0}]
    clash = Trainer(TrainConfig.from_dict(yaml.safe_load(_recipe(tmp_path / "x", tiny, data=twice, **kw).read_text())))
    with pytest.raises(InputError, match="world-report:0:0 is in two data sources with different visual_token_drop"):
        clash.setup()


def test_resume_refuses_other_model(tiny, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, tiny, steps=2)
    train(recipe)
    other = build("llava_multilayer", tmp_path / "other")
    ckpt = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    # the checkpoint is checked before the feature cache is opened, so its refusal is the one that speaks
    with pytest.raises(InputError, match="different model"):
        train(recipe, resume=True, overrides={"model": str(other)})
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == ckpt
    monkeypatch.setenv("LLAVAKIT_FEATURE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(InputError, match="different model"):
        train(recipe, resume=True, overrides={"model": str(other)})
    assert not (tmp_path / "cache2").exists()  # refused before any feature was computed


def test_existing_checkpoint_needs_resume(tiny, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, tiny, steps=2)
    train(recipe)
    with pytest.raises(InputError, match="--resume"):
        train(recipe)
    monkeypatch.setenv("LLAVAKIT_FEATURE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(InputError, match="--resume"):
        train(recipe)
    assert not (tmp_path / "cache2").exists()  # refused before any feature was computed


def test_unknown_key_is_named(tmp_path, tiny):
    with pytest.raises(InputError, match=r"unknown key 'lerning_rate'.*valid keys: .*lr"):
        train(_recipe(tmp_path, tiny, lerning_rate=0.1))
    with pytest.raises(InputError, match=r"unknown key 'wieght' in data\[0\]"):
        train(_recipe(tmp_path, tiny, data=[{"kind": "easyvqa", "wieght": 1}]))
    with pytest.raises(InputError, match="unknown data kind"):
        train(_recipe(tmp_path, tiny, data=[{"kind": "imagenet"}]))


def test_torchrun_two_processes(tiny, tmp_path):
    recipe = _recipe(tmp_path, tiny, steps=2, checkpoint_every=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llavakit.cli", "train", str(recipe)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    # a failing rank's own traceback comes before torchrun's summary: show it, not just the summary
    first = max(res.stderr.find("Traceback"), 0)
    assert res.returncode == 0, res.stderr[first:first + 3000] + "\n...\n" + res.stderr[-1000:]
    logs = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]
    # the ranks cached one at a time: one shard, no temp file left behind
    cache = tmp_path / "run" / "features"
    assert sorted(p.name for p in cache.glob("[!.]*")) == ["features-0000.safetensors", "index.json", "tower.json"]


def test_every_shipped_recipe_parses():
    """Each recipes/*.yaml is a valid TrainConfig (an unknown key or a bad value would fail here, not in
    the middle of someone's hour-long run), and each init_from is a file in the repository, the output of
    another recipe (its out_dir, or the trained.safetensors in it), or the packed default weights ("shipped")."""
    from llavakit.training.config import TrainConfig

    root = Path(__file__).resolve().parents[2]
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    cfgs = {path: TrainConfig.from_yaml(path) for path in recipes}
    outputs = {c.out_dir.rstrip("/") for c in cfgs.values()}
    for path, cfg in cfgs.items():
        assert cfg.steps > 0 and cfg.model == "default", path
        if cfg.init_from and cfg.init_from != "shipped":
            run = cfg.init_from[: -len("/trained.safetensors")] if cfg.init_from.endswith("/trained.safetensors") \
                else cfg.init_from.rstrip("/")
            assert (root / cfg.init_from).is_file() or (run in outputs and run != cfg.out_dir.rstrip("/")), \
                f"{path.name}: init_from {cfg.init_from} is neither in the repository nor another recipe's output"


def test_world_check_source_decomposes_report_checking():
    import re

    from llavakit.data.world.language import POSITION_PHRASES
    from llavakit.training.config import DATA_KINDS, DataSource
    from llavakit.training.data import _world_scene, build_groups

    assert "world-check" in DATA_KINDS
    src = DataSource(kind="world-check", n=60, questions_per_image=16, seed=0)
    groups = build_groups(src)
    assert [g.blocks for g in groups] == [g.blocks for g in build_groups(src)]  # deterministic
    phrase_to_cell = {v: k for k, v in POSITION_PHRASES.items()}
    stmt = re.compile(r"(?:there is an? (\w+) (\w+) (\w+) (.+?)\.|an? (\w+) (\w+) (\w+) is (.+?)\.|(.+?), there is an? (\w+) (\w+) (\w+)\.)")
    kinds = {"statement": [0, 0], "report": [0, 0]}
    counts = set()
    for group in groups:
        i = int(group.key.split(":")[-1])
        scene = _world_scene(i, 15485863, words=False, n_objects=(1, 5))[1]
        truth = {(o.size, o.colour, o.shape, scene.position(o)) for o in scene.objects}
        for ((question, answer),) in group.blocks:
            q = question.split("\n")[0].lower()
            if q.startswith("is this statement about the image true?"):
                m = stmt.search(question.lower().split("true? ", 1)[1])
                g = m.groups()
                size, colour, shape, where = (g[0:4] if g[0] else (g[4:8] if g[4] else (g[9], g[10], g[11], g[8])))
                claim = (size, colour, shape, phrase_to_cell[where.strip()])
                assert answer == ("yes" if claim in truth else "no"), (question, answer)
                kinds["statement"][answer == "no"] += 1
            elif q.startswith("what is "):
                cell = phrase_to_cell[re.match(r"what is (.+?)\?", q).group(1)]
                there = [o for o in scene.objects if scene.position(o) == cell]
                assert answer == (f"a {there[0].size} {there[0].colour} {there[0].shape}" if there else "nothing")
            elif q.startswith("how many"):
                assert answer == str(len(scene.objects))
                counts.add(answer)
            else:
                assert "report:" in question.lower() and answer in ("yes", "no")
                report = question.split("Report: ", 1)[1].split("\n")[0]
                n_statements = report.count(".")
                wrong = answer == "yes"
                if not wrong:
                    assert n_statements == len(scene.objects)
                kinds["report"][wrong] += 1
    assert kinds["statement"][0] == kinds["statement"][1] > 0  # one false statement per true one
    assert kinds["report"][0] == kinds["report"][1] > 0  # two correct and two wrong reports per scene
    assert counts == {"1", "2", "3", "4", "5"}


def test_world_count_source_splits_counts_into_rows_columns_and_sizes():
    import re

    from llavakit.data.world.scene import POSITIONS
    from llavakit.training.config import DataSource
    from llavakit.training.data import _world_scene, build_groups

    src = DataSource(kind="world-count", n=50, questions_per_image=16, seed=0)
    groups = build_groups(src)
    assert [g.blocks for g in groups] == [g.blocks for g in build_groups(src)]  # deterministic
    rows = {"top": 0, "middle": 1, "bottom": 2}
    cols = {"left": 0, "middle": 1, "right": 2}
    seen = set()
    for group in groups:
        scene = _world_scene(int(group.key.split(":")[-1]), 32452843, words=False, n_objects=(1, 5))[1]
        cells = [POSITIONS.index(scene.position(o)) for o in scene.objects]
        asked = [q for b in group.blocks for q, _ in b]
        assert len(asked) == len(set(asked)) == 12
        for ((question, answer),) in group.blocks:
            q = question.lower()
            if m := re.search(r"in the (\w+) row", q):
                want = sum(c // 3 == rows[m.group(1)] for c in cells)
                seen.add("row")
            elif m := re.search(r"in the (\w+) column", q):
                want = sum(c % 3 == cols[m.group(1)] for c in cells)
                seen.add("column")
            elif m := re.search(r"how many (small|large) shapes", q):
                want = sum(o.size == m.group(1) for o in scene.objects)
            elif m := re.search(r"how many (\w+) shapes are there", q):
                want = sum(o.colour == m.group(1) for o in scene.objects)
            elif q.startswith(("how many shapes are there", "how many objects", "how many shapes can")):
                want = len(scene.objects)
            else:
                from llavakit.data.world.language import PLURALS

                plural = re.search(r"how many (\w+) are there", q).group(1)
                (shape,) = [k for k, v in PLURALS.items() if v == plural]
                want = sum(o.shape == shape for o in scene.objects)
            assert answer == str(want), (question, answer)
    assert seen == {"row", "column"}


def test_world_omit_source_teaches_the_remove_error():
    import re

    import pytest

    from llavakit.data.world import omission_checks
    from llavakit.data.world.language import POSITION_PHRASES
    from llavakit.errors import InputError
    from llavakit.training.config import DATA_KINDS, DataSource
    from llavakit.training.data import _world_scene, build_groups

    assert "world-omit" in DATA_KINDS
    src = DataSource(kind="world-omit", n=60, questions_per_image=16, seed=0)
    groups = build_groups(src)
    assert [g.blocks for g in groups] == [g.blocks for g in build_groups(src)]  # deterministic
    phrase_to_cell = {v: k for k, v in POSITION_PHRASES.items()}
    simple = {"yes": 0, "no": 0}
    for group in groups:
        scene = _world_scene(int(group.key.split(":")[-1]), 49979687, words=False, n_objects=(2, 5))[1]
        assert 2 <= len(scene.objects) <= 5
        cells = {scene.position(o): o for o in scene.objects}
        asked = [(q, a) for b in group.blocks for q, a in b]
        assert len(asked) == 10
        for question, answer in asked:
            if "\nReport: " not in question:
                assert question.lower().startswith("how many") and answer == str(len(scene.objects))
                continue
            head, report = question.split("\nReport: ", 1)
            report = report.split("\n")[0]
            # which cells the report names: each statement names exactly one cell phrase
            named = {c for c, p in POSITION_PHRASES.items() if re.search(rf"(^|\. ){re.escape(p)}, |{re.escape(p)}\.", report, re.I)}
            assert named <= set(cells)  # every statement is true: an incomplete report only leaves out
            missing = set(cells) - named
            assert len(missing) <= 1
            if head.startswith("Which shape"):
                if missing:
                    o = cells[missing.pop()]
                    assert answer == f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[scene.position(o)]}"
                else:
                    assert answer == "none"
            elif head.startswith("Does this report mention"):
                where = re.match(r"Does this report mention the shape (.+)\?", head).group(1)
                assert answer == ("yes" if phrase_to_cell[where] in named else "no")
            elif head.startswith("How many shapes does"):
                assert missing and answer == str(len(named)) == str(len(scene.objects) - 1)
            else:
                assert answer == ("yes" if missing else "no"), (question, answer)
                simple[answer] += 1
    assert simple["yes"] == simple["no"] == 2 * len(groups)  # two complete and two incomplete reports a scene
    one = _world_scene(0, 49979687, words=False, n_objects=(1, 1))[1]
    with pytest.raises(InputError, match="2 or more objects"):
        omission_checks(one)
