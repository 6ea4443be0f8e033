"""benchmarks/binding_errors.py: wrong answers are split into another object's value vs a value not in the scene."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llavakit.data.world.scene import Obj, Scene


def _module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "binding_errors.py"
    spec = importlib.util.spec_from_file_location("bench_binding_errors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_classify_and_summarise():
    mod = _module()
    scene = Scene(224, (Obj("circle", "red", "large", 30, 30, 20), Obj("triangle", "blue", "small", 190, 190, 15)))
    assert mod.classify("Red.", "red", scene, "colour") == "ok"
    assert mod.classify("blue", "red", scene, "colour") == "other"
    assert mod.classify("green", "red", scene, "colour") == "absent"
    assert mod.classify("triangle", "circle", scene, "shape") == "other"
    assert mod.classify("bottom right", "top left", scene, "position") == "other"
    assert mod.classify("middle", "top left", scene, "position") == "absent"
    s = mod.summarise([("ok", 1), ("ok", 2), ("other", 2), ("absent", 3)])
    assert s["n"] == 4 and s["accuracy"] == 50.0 and s["classes"] == {"ok": 2, "other": 1, "absent": 1}
    assert s["by_objects"]["2"] == {"n": 2, "accuracy": 50.0, "chance_among_scene_values": 50.0, "ok": 1, "other": 1}


def test_unknown_task_is_refused_before_loading_a_model(capsys):
    mod = _module()
    with pytest.raises(SystemExit) as e:
        mod.main(["--tasks", "world-colour,world-count"])
    assert e.value.code == 2 and "world-count" in capsys.readouterr().err
