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


@pytest.mark.parametrize("verb", ["generate", "info", "convert"])
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_every_verb_is_tested():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == {"generate", "info", "convert"}


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
