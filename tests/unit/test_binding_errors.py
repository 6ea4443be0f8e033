"""benchmarks/binding_errors.py: wrong answers are split into another object's value vs a value not in the scene."""

from __future__ import annotations

import pytest

from llavakit.data.world.scene import COLOURS, POSITIONS, SHAPES, Obj, Scene
from tests.benchmarks import load_benchmark


def _module():
    return load_benchmark("binding_errors")


def test_classify_and_summarise():
    mod = _module()
    scene = Scene(224, (Obj("circle", "red", "large", 30, 30, 20), Obj("triangle", "blue", "small", 190, 190, 15)))
    assert mod.classify("Red.", "red", scene, "colour", COLOURS) == "ok"
    assert mod.classify("It is red.", "red", scene, "colour", COLOURS) == "ok"  # eval's rule reads the option
    assert mod.classify("blue", "red", scene, "colour", COLOURS) == "other"
    assert mod.classify("green", "red", scene, "colour", COLOURS) == "absent"
    assert mod.classify("I don't know", "red", scene, "colour", COLOURS) == "absent"
    assert mod.classify("triangle", "circle", scene, "shape", SHAPES) == "other"
    assert mod.classify("bottom right", "top left", scene, "position", POSITIONS) == "other"
    assert mod.classify("middle", "top left", scene, "position", POSITIONS) == "absent"
    s = mod.summarise([("ok", 1), ("ok", 2), ("other", 2), ("absent", 3)])
    assert s["n"] == 4 and s["accuracy"] == 50.0 and s["classes"] == {"ok": 2, "other": 1, "absent": 1}
    assert s["by_objects"]["2"] == {"n": 2, "accuracy": 50.0, "chance_among_scene_values": 50.0, "ok": 1, "other": 1}


def test_unknown_task_is_refused_before_loading_a_model(capsys):
    mod = _module()
    with pytest.raises(SystemExit) as e:
        mod.main(["--tasks", "world-colour,world-count"])
    assert e.value.code == 2 and "world-count" in capsys.readouterr().err
