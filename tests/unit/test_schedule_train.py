"""Schedule-aware fine-tuning (llavakit/training/schedule_train.py): the masked training forward computes
what the compression runner computes when a G-Search / P-Sigmoid schedule removes visual tokens, on plain
prompts and on packed training sequences, and a recipe trains with it.

Tiny model (tests/tiny_models.py "llava"): 16 visual tokens per image, a 2-layer LM with 4 query heads /
2 K/V heads, so a schedule prunes before layer 1 only."""

from __future__ import annotations

import pytest
import torch
import yaml

import llavakit
from llavakit import InputError
from llavakit.compression import Compression
from llavakit.data.dataset import IGNORE_INDEX, TurnLabeler
from llavakit.layers.attention import causal_padding_mask
from llavakit.layers.rope import default_position_ids
from llavakit.training.config import TrainConfig
from llavakit.training.packing import block_mask, collate_packed, encode_rounds, pack
from llavakit.training.schedule_train import ScheduleTraining, parse_schedule, query_groups
from llavakit.training.trainer import Trainer
from tests.tiny_models import IMAGE_TOKEN, noise_images
from tests.unit.test_training import _recipe as training_recipe

PROMPTS = ["what is in the image ?", "describe the colour and the shape of the image ?", "red"]
SPECS = ["gsearch:ratios=1/0.25", "gsearch:ratios=1/0.5", "psigmoid:k=2:l0=0.5"]


@pytest.fixture(scope="module")
def vlm(tiny_llava_dir, one_torch_thread):
    return llavakit.load(str(tiny_llava_dir))


def _runner_hidden(vlm, spec, prompt_ids, ids, am_prompt, am, emb_prompt, emb):
    """Inference: the runner decides at the prompt's prefill, then the whole sequence reuses the decision
    (what a cached generation of `ids` after `prompt_ids` computes)."""
    comp = Compression.parse(spec)
    comp.check(vlm.model)
    lm = vlm.model.language_model
    run = comp.lm_run(vlm.model, prompt_ids, am_prompt)
    with torch.inference_mode():
        lm(emb_prompt, am_prompt, None, None, run=run)
        if ids is prompt_ids:
            return lm(emb, am, None, None, run=run), run
        pos = default_position_ids(am, ids.shape[1], 0, emb.device)
        return lm(emb, am, pos, None, run=run), run


@pytest.mark.parametrize("spec", SPECS)
def test_masked_forward_equals_the_runner_on_prompts(vlm, spec):
    images = noise_images(3)
    texts = [vlm.build_prompt(p, [im]) for p, im in zip(PROMPTS, images)]
    inp = vlm.processor(text=texts, images=images)
    ids, am = inp["input_ids"], inp["attention_mask"]
    b, t = ids.shape
    vis = ids == IMAGE_TOKEN
    with torch.inference_mode():
        emb = vlm.model.embed_inputs(ids, inp["pixel_values"])
        got = ScheduleTraining(parse_schedule(spec)).forward(
            vlm.model.language_model, emb, causal_padding_mask(am.bool(), t),
            default_position_ids(am, t, 0, emb.device).expand(b, t), vis, torch.zeros_like(ids),
            torch.full_like(ids, IGNORE_INDEX), am.bool())
    want, run = _runner_hidden(vlm, spec, ids, ids, am, am, emb, emb)
    kept = run.decisions[1]  # (B, T): the runner's choice before layer 1
    assert int((kept & vis).sum(1)[0]) < int(vis[0].sum())  # the spec really prunes
    real = (kept | ~vis) & am.bool()  # the runner's output: each row's kept positions in order, right-aligned
    with torch.inference_mode():
        plain = vlm.model.language_model(emb, am)
    text = ~vis & am.bool()
    assert (got[text] - plain[text]).abs().max() > 1e-3
    want_real = torch.cat([want[i][-int(real[i].sum()):] for i in range(b)])
    torch.testing.assert_close(got[real], want_real, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["gsearch:ratios=1/0.25", "psigmoid:k=2:l0=0.5"])
def test_packed_blocks_equal_each_conversation_alone(vlm, spec):
    """Each block ranks the visual tokens by its own question; with one pruned layer (the tiny LM) the
    packed form is exact: each block's logits are the conversation's at inference (prompt prefill, then
    the answer with the decision frozen)."""
    model, lm = vlm.model, vlm.model.language_model
    lab = TurnLabeler(vlm.processor)
    n_img = model.num_image_tokens()
    blocks = [(("what is the colour ?", "red"),), (("describe the square", "a blue square"), ("yes ?", "no")),
              (("how many ?", "two"),)]
    batch = collate_packed([pack(lab, "k", blocks, n_img)], vlm.processor._pad_id())
    feats = torch.randn(n_img, 32, generator=torch.Generator().manual_seed(0))
    ids = batch["input_ids"]
    with torch.inference_mode():
        emb = model.embed_inputs(ids, image_features=[feats])
        packed = lm.logits(ScheduleTraining(parse_schedule(spec)).forward(
            lm, emb, block_mask(batch["block_ids"], batch["valid"]), batch["position_ids"], ids == IMAGE_TOKEN,
            batch["block_ids"], batch["labels"], batch["valid"]))[0]
    choices = set()
    for i, blk in enumerate(blocks, start=1):
        full, labels = encode_rounds(lab, blk, n_img, "t")
        n_prompt = next(j for j, x in enumerate(labels) if x != IGNORE_INDEX)
        one = torch.tensor([full])
        with torch.inference_mode():
            e = model.embed_inputs(one, image_features=[feats])
            hidden, run = _runner_hidden(vlm, spec, one[:, :n_prompt], one, torch.ones(1, n_prompt, dtype=torch.long),
                                         torch.ones_like(one), e[:, :n_prompt], e)
            alone = lm.logits(hidden)[0]
        choices.add(tuple(run.decisions[1][0].tolist()))
        sel = batch["block_ids"][0] == i
        torch.testing.assert_close(packed[sel], alone[-int(sel.sum()):], atol=1e-4, rtol=1e-4)
    assert len(choices) > 1  # the questions chose different tokens: the per-block ranking matters


def test_query_groups():
    # prefix: 2 text, 3 visual, 1 text; block 1: 2 prompt + 1 answer; block 2: 1 prompt + 2 answer; padding
    blk = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1]])
    vis = torch.zeros_like(blk, dtype=torch.bool)
    vis[0, 2:5] = True
    lab = torch.full_like(blk, IGNORE_INDEX)
    lab[0, [8, 10, 11]] = 7
    valid = blk >= 0
    w, g = query_groups(blk, lab, vis, valid)
    assert (w[0, 0] > 0).nonzero().flatten().tolist() == [5, 6, 7]
    assert (w[0, 1] > 0).nonzero().flatten().tolist() == [5, 9]
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2))
    assert g[0].tolist() == [-1] * 6 + [0, 0, 0, 1, 1, 1, -1]
    w, g = query_groups(torch.where(blk == 2, -1, blk), lab, vis, valid & (blk != 2))  # one conversation
    assert g[0].tolist() == [0] * 9 + [-1] * 4


def test_parse_and_recipe_refusals(tiny_llava_dir, tmp_path):
    for bad in ["fastv:layer=1:keep=0.5", "", "gsearch:ratios=1/0.5,psigmoid", "yopo:window=3", None]:
        with pytest.raises(InputError, match="prune_schedule"):
            parse_schedule(bad)
    base = yaml.safe_load(training_recipe(tmp_path, tiny_llava_dir).read_text())
    with pytest.raises(InputError, match="prune_schedule"):
        TrainConfig.from_dict({**base, "prune_schedule": "fastervlm:keep=0.1"})
    with pytest.raises(InputError, match="stage instruct"):
        TrainConfig.from_dict({**base, "stage": "align", "prune_schedule": "psigmoid"})
    with pytest.raises(InputError, match="cannot train together"):
        TrainConfig.from_dict({**base, "prune_schedule": "psigmoid", "visual_token_drop": 0.3})
    with pytest.raises(InputError, match="cannot train together"):
        TrainConfig.from_dict({**base, "prune_schedule": "psigmoid", "yopo": "yopo:window=3"})


def test_recipe_trains_under_a_schedule(tiny_llava_dir, tmp_path, one_torch_thread):
    def trainer(sub, **kw):
        (tmp_path / sub).mkdir()
        path = training_recipe(tmp_path / sub, tiny_llava_dir, **{"steps": 4, **kw})
        tr = Trainer(TrainConfig.from_dict(yaml.safe_load(path.read_text())))
        tr.setup()
        return tr

    plain, same = trainer("p"), trainer("s", prune_schedule="gsearch:ratios=1/1")
    pruned = trainer("g", prune_schedule="gsearch:ratios=1/0.25")
    groups = plain._batch_groups(0, 0)
    with torch.no_grad():
        a, b = plain.loss(groups), same.loss(groups)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # keeping every token is the plain model
    loss = pruned.loss(groups)
    assert torch.isfinite(loss) and abs(float(loss.detach()) - float(a)) > 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pruned.params)


def test_visual_reinjection_is_refused_at_setup(tiny_llava_dir, tmp_path):
    path = training_recipe(tmp_path, tiny_llava_dir, prune_schedule="gsearch:ratios=1/0.5", visual_inject=[1],
                           visual_inject_rank=4, train=["multi_modal_projector", "visual_inject"],
                           lr={"multi_modal_projector": 0.002, "lora": 0.001, "visual_inject": 0.05})
    tr = Trainer(TrainConfig.from_dict(yaml.safe_load(path.read_text())))
    with pytest.raises(InputError, match="re-injection"):
        tr.setup()


def test_select_keeps_each_querys_top_visible_tokens():
    from llavakit.training.schedule_train import _ranking_rows, _select

    scores = torch.tensor([[[0.1, 0.5, 0.5, 0.9, 0.0], [0.9, 0.1, 0.2, 0.3, 0.0]]])  # (B=1, G=2, T=5)
    seen = torch.tensor([[[True, True, True, False, False], [True, True, True, True, False]]])
    got = _select(scores, seen, [2])
    # query 0: 0.9 is hidden already; the tie 0.5 / 0.5 keeps both; query 1: 0.9 and 0.3
    assert got.tolist() == [[[False, True, True, False, False], [True, False, False, True, False]]]
    assert _select(scores, seen, [4]).tolist() == seen.tolist()  # asking for more keeps what is visible
    w = torch.tensor([[[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 1.0], [0.0] * 4]])
    rows, row_w = _ranking_rows(w)
    assert rows.tolist() == [[1, 2, 3], [3, 0, 0]]
    torch.testing.assert_close(torch.einsum("bgr->bg", row_w), w.sum(-1))
