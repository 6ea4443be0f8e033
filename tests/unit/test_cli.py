"""The `llavakit` command line on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llavakit.cli import build_parser, main
from tests.tiny_models import build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("cli-llava"))


@pytest.mark.parametrize("verb", ["generate", "info", "convert", "eval", "train", "chat", "serve", "web"])
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: llavakit " + verb in out and ("--resume" in out if verb == "train" else "--model" in out)


def test_every_verb_is_tested():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    # "train" is exercised end to end in tests/unit/test_training.py, "serve" in tests/unit/test_serve*.py,
    # "web" in tests/unit/test_web.py (and tests/browser/).
    assert set(sub.choices) == {"generate", "info", "convert", "eval", "train", "chat", "serve", "web"}


def test_info_json(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llava"
    assert info["visual_tokens_per_image"] == 16
    assert info["request"]["total_flops"] > 0


def test_info_text(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "16 per 32x32 px image" in out and "FLOPs" in out


def test_generate_and_convert(model_dir, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(img)
    assert main(["generate", "--model", str(model_dir), "--image", str(img), "--max-new-tokens", "4",
                 "what is in the image ?"]) == 0
    assert main(["convert", "--model", str(model_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_bad_input_exits_2_with_message(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    assert main(["generate", "--model", str(model_dir), "--image", str(bad), "what"]) == 2
    assert "error:" in capsys.readouterr().err


def test_eval_tiny_run(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_dir), "--tasks", "easyvqa,world-colour", "--limit", "2",
                 "--batch-size", "2", "--shuffled-control", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "| task | n | acc % |" in stdout and "| easyvqa | 2 |" in stdout and "| world-colour | 2 |" in stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["easyvqa", "world-colour"]
    assert all(r["n"] == 2 and r["visual_tokens"] == 16 and r["accuracy_shuffled"] is not None for r in rows)
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()


def test_eval_bad_task_and_compression(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(model_dir), "--tasks", "easyvqa,nope", "--out", str(tmp_path)]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "world-colour", "--limit", "1",
                 "--compression", "fastv:0.5", "--out", str(tmp_path)]) == 2
    assert "bad compression parameter" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "world-colour", "--limit", "1",
                 "--weights", str(tmp_path / "no-run"), "--out", str(tmp_path / "o")]) == 2
    assert "do not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_chat_session_multi_turn_and_bad_input(model_dir, tmp_path):
    import llavakit
    from llavakit.chat import run

    img = tmp_path / "c.png"
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(img)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    lines = iter(["what is in the image ?", "and the colour ?", f"/image {bad}", "/frobnicate",
                  f"/image {img}", "describe the square", "/reset", "/quit"])
    out: list[str] = []
    vlm = llavakit.load(str(model_dir))
    assert run(vlm, str(img), read=lambda _: next(lines), write=out.append, max_new_tokens=3) == 0
    text = "\n".join(out)
    assert text.count("assistant>") == 3
    assert "error:" in text and "unknown command /frobnicate" in text
    assert "conversation cleared" in text


def test_compression_flag_on_info_generate_and_chat(model_dir, tmp_path, capsys):
    import llavakit

    img = tmp_path / "k.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    assert main(["info", "--model", str(model_dir), "--json", "--compression", "pool:count=4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["visual_tokens_per_image"] == 4 and info["compression"] == "pool:count=4"
    full = json.loads((main(["info", "--model", str(model_dir), "--json"]), capsys.readouterr().out)[1])
    assert info["request"]["total_flops"] < full["request"]["total_flops"]
    # generate --compression answers what the Python API answers with the same spec
    assert main(["generate", "--model", str(model_dir), "--image", str(img), "--max-new-tokens", "5",
                 "--compression", "pool:count=4", "what is it ?"]) == 0
    printed = capsys.readouterr().out.strip()
    vlm = llavakit.load(str(model_dir))
    assert printed == vlm.chat("what is it ?", [str(img)], max_new_tokens=5, compression="pool:count=4").strip()
    # a bad spec is refused with exit code 2 and the valid names, before the model loads
    for verb in (["generate", "--image", str(img), "what ?"], ["chat"], ["info"]):
        assert main([verb[0], "--model", str(model_dir), "--compression", "nosuch:keep=2", *verb[1:]]) == 2
        err = capsys.readouterr().err
        assert "nosuch" in err and "fastervlm" in err


def test_train_overrides_reach_the_recipe(monkeypatch, tmp_path):
    """--steps / --out-dir / --seed override the recipe's fields (a seed study of one recipe needs no copy)."""
    import llavakit.training.trainer as trainer

    seen = {}

    def fake_train(config, resume=False, overrides=None):
        seen.update(config=config, resume=resume, overrides=overrides)
        return tmp_path

    monkeypatch.setattr(trainer, "train", fake_train)
    assert main(["train", "recipes/default-yopo6.yaml", "--seed", "21", "--out-dir", "/tmp/s21"]) == 0
    assert seen == {"config": "recipes/default-yopo6.yaml", "resume": False,
                    "overrides": {"out_dir": "/tmp/s21", "seed": 21}}
    main(["train", "recipes/default-yopo6.yaml"])
    assert seen["overrides"] == {}
