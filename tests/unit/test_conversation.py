"""LLaVA conversation JSON <-> Sample <-> chat messages, and every bad-input case."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from llavakit import InputError
from llavakit.data.conversation import (Sample, from_chat_messages, read_llava_json, to_chat_messages,
                                        write_llava_json)


def _conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"")  # never opened: reading must not decode images
    (tmp_path / "v.mp4").write_bytes(b"")
    return tmp_path


ENTRIES = [
    {"id": "s1", "image": "imgs/a.jpg",
     "conversations": _conv(("human", "<image>\nwhat is the colour ?"), ("gpt", "red"),
                            ("human", "what shape ?"), ("gpt", "circle"))},
    {"id": 7, "image": ["imgs/b.jpg", "imgs/c.jpg"],
     "conversations": _conv(("system", "be brief"), ("human", "<image>\n<image>\ncompare"), ("gpt", "same"))},
    {"id": "t", "conversations": _conv(("human", "hello"), ("gpt", "hi"))},
    {"id": "v", "video": "v.mp4", "conversations": _conv(("human", "<image>\nwhat happens ?"), ("gpt", "a dance"))},
]


def _write(path, entries):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_read_llava_json(data_dir, suffix):
    samples = read_llava_json(_write(data_dir / f"d{suffix}", ENTRIES))
    s1, s2, s3, s4 = samples
    assert s1.id == "s1" and s1.images == (str(data_dir / "imgs/a.jpg"),)
    assert s1.turns == (("user", "<image>\nwhat is the colour ?"), ("assistant", "red"),
                        ("user", "what shape ?"), ("assistant", "circle"))
    assert s1.rounds() == 2
    assert s2.id == "7" and len(s2.images) == 2 and s2.turns[0] == ("system", "be brief")
    assert s3.images == () and s3.num_media == 0
    assert s4.videos == (str(data_dir / "v.mp4"),) and s4.images == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s1.id = "x"  # type: ignore[misc]


def test_image_root(data_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    f = _write(other / "d.json", ENTRIES[:1])
    with pytest.raises(InputError, match="does not exist"):
        read_llava_json(f)  # default root: the JSON file's directory
    assert read_llava_json(f, image_root=data_dir)[0].images == (str(data_dir / "imgs/a.jpg"),)
    assert read_llava_json(f, check_images=False)[0].images == (str(other / "imgs/a.jpg"),)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_read_round_trip(data_dir, suffix):
    samples = read_llava_json(_write(data_dir / "in.json", ENTRIES))
    out = write_llava_json(samples, data_dir / "sub" / f"out{suffix}", image_root=data_dir)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    entries = [json.loads(x) for x in out.read_text().splitlines()] if suffix == ".jsonl" else json.loads(out.read_text())
    assert entries[0]["image"] == "imgs/a.jpg" and entries[1]["image"] == ["imgs/b.jpg", "imgs/c.jpg"]
    assert "image" not in entries[2] and entries[3]["video"] == "v.mp4"
    assert entries[0]["conversations"] == ENTRIES[0]["conversations"]
    assert read_llava_json(out, image_root=data_dir) == samples
    # without image_root paths are written as stored (absolute here) and read back unchanged
    out2 = write_llava_json(samples, data_dir / "abs.json")
    assert read_llava_json(out2) == samples


def test_write_refuses_pil_images(tmp_path):
    s = Sample("p", (Image.new("RGB", (4, 4)),), (("user", "<image>\nq"), ("assistant", "a")))
    with pytest.raises(InputError, match="'p'.*PIL"):
        write_llava_json([s], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_chat_messages_round_trip(data_dir):
    samples = read_llava_json(_write(data_dir / "d.json", ENTRIES[:3]))
    for s in samples:
        msgs = to_chat_messages(s)
        back = from_chat_messages(msgs, id=s.id)  # images travel inside the image parts
        assert back == s
        assert from_chat_messages(to_chat_messages(s, with_images=False), images=s.images, id=s.id) == s
    msgs = to_chat_messages(samples[0])
    assert msgs[0] == {"role": "user", "content": [{"type": "image", "image": samples[0].images[0]},
                                                   {"type": "text", "text": "what is the colour ?"}]}
    assert msgs[1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def test_from_chat_messages_like_inference():
    # transformers chat format, image part after the text: rendered images-first, as VLM.chat does
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is it ?"}, {"type": "image", "path": "x.png"}]},
            {"role": "assistant", "content": "a cat"}]
    s = from_chat_messages(msgs, id="m")
    assert s.images == ("x.png",) and s.turns == (("user", "<image>\nwhat is it ?"), ("assistant", "a cat"))
    pil = Image.new("RGB", (4, 4))
    s2 = from_chat_messages([{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}], [pil])
    assert s2.images == (pil,)


def test_auto_image_tag(data_dir):
    e = {"id": "n", "image": ["imgs/a.jpg", "imgs/b.jpg"], "conversations": _conv(("human", "compare"), ("gpt", "x"))}
    f = _write(data_dir / "d.json", [e])
    with pytest.raises(InputError, match="'n'.*0 <image> tag.*2 image.*auto_image_tag"):
        read_llava_json(f)
    s = read_llava_json(f, auto_image_tag=True)[0]
    assert s.turns[0] == ("user", "<image>\n<image>\ncompare")


BAD = [
    ("missing image", {"image": "imgs/nope.jpg", "conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))},
     "image file .*nope.jpg.* does not exist"),
    ("missing video", {"video": "nope.mp4", "conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))},
     "video file .*does not exist"),
    ("two human", {"conversations": _conv(("human", "q"), ("human", "q2"), ("gpt", "a"))}, "two user turns in a row"),
    ("two gpt", {"conversations": _conv(("human", "q"), ("gpt", "a"), ("gpt", "b"))}, "two assistant turns in a row"),
    ("first gpt", {"conversations": _conv(("gpt", "a"), ("human", "q"))}, "first turn must be a user turn"),
    ("system later", {"conversations": _conv(("human", "q"), ("system", "s"), ("gpt", "a"))}, "system turn may only come first"),
    ("unanswered", {"conversations": _conv(("human", "q"), ("gpt", "a"), ("human", "q2"))}, "ends with a user turn"),
    ("empty value", {"conversations": _conv(("human", "q"), ("gpt", "  "))}, "turn 1 \\(assistant\\) is empty"),
    ("unknown from", {"conversations": _conv(("user", "q"), ("gpt", "a"))}, "unknown 'from' 'user'; valid: human, gpt, system"),
    ("no value", {"conversations": [{"from": "human"}]}, "must be an object with 'from' and 'value'"),
    ("no conversations", {"image": "imgs/a.jpg"}, "'conversations' must be a non-empty list"),
    ("too many tags", {"image": "imgs/a.jpg", "conversations": _conv(("human", "<image> <image>\nq"), ("gpt", "a"))},
     "2 <image> tag\\(s\\) but 1 image"),
    ("tag without image", {"conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))}, "1 <image> tag\\(s\\) but 0 image"),
    ("no tag with image", {"image": "imgs/a.jpg", "conversations": _conv(("human", "q"), ("gpt", "a"))},
     "0 <image> tag\\(s\\) but 1 image"),
    ("tag in answer", {"image": "imgs/a.jpg", "conversations": _conv(("human", "q"), ("gpt", "<image>"))},
     "image tags belong in user turns"),
    ("bad image type", {"image": 3, "conversations": _conv(("human", "q"), ("gpt", "a"))}, "must be a path"),
]


@pytest.mark.parametrize("name,entry,match", BAD, ids=[b[0] for b in BAD])
def test_bad_entries_name_file_and_id(data_dir, name, entry, match):
    good = ENTRIES[2]
    f = _write(data_dir / "bad.json", [good, {"id": "bad-1", **entry}])
    with pytest.raises(InputError, match=match) as e:
        read_llava_json(f)
    assert "bad.json entry 1" in str(e.value) and "'bad-1'" in str(e.value)


def test_missing_image_allowed_without_check(data_dir):
    e = {"id": "m", "image": "imgs/nope.jpg", "conversations": _conv(("human", "<image>\nq"), ("gpt", "a"))}
    assert read_llava_json(_write(data_dir / "d.json", [e]), check_images=False)[0].id == "m"


@pytest.mark.parametrize("content,match", [
    ("[]", "empty dataset"), ("", "empty dataset"), ("{\"id\": 1}", "expected a JSON list"),
    ("[{\"id\": 1,", "not valid JSON"), ("[3]", "expected an object"),
])
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "f.json"
    f.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        read_llava_json(f)
    assert "f.json" in str(e.value)


def test_bad_jsonl_and_missing_file(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text("\n\n")
    with pytest.raises(InputError, match="f.jsonl: empty dataset"):
        read_llava_json(f)
    f.write_text(json.dumps(ENTRIES[2]) + "\n{oops\n")
    with pytest.raises(InputError, match="f.jsonl line 2: not valid JSON"):
        read_llava_json(f)
    with pytest.raises(InputError, match="no such file"):
        read_llava_json(tmp_path / "none.json")


def test_sample_validates_directly():
    with pytest.raises(InputError, match="sample 'd'.*unknown role 'bot'"):
        Sample("d", (), (("user", "q"), ("bot", "a")))
    with pytest.raises(InputError, match="sample 'e'.*empty conversation"):
        Sample("e", (), ())
    with pytest.raises(InputError, match="only a system turn"):
        Sample("s", (), (("system", "be brief"),))
    with pytest.raises(InputError, match="turn 0 \\(system\\) contains <image>"):
        Sample("s", ("a.png",), (("system", "<image>"), ("user", "q"), ("assistant", "a")))
    with pytest.raises(InputError, match="images must be paths"):
        Sample("f", (3,), (("user", "<image>q"), ("assistant", "a")))  # type: ignore[arg-type]
