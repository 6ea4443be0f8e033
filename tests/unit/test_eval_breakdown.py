"""benchmarks/eval_breakdown.py: grid row / column, per-count and easy-vqa kind splits of eval predictions."""

from __future__ import annotations

import json

from tests.benchmarks import load_benchmark


def _module():
    return load_benchmark("eval_breakdown")


def test_breakdown_splits_position_count_and_easyvqa(tmp_path, capsys):
    mod = _module()
    rows = [
        {"task": "world-position", "answer": "top", "prediction": "Top left.", "score": 0.0},  # row right, column wrong
        {"task": "world-position", "answer": "middle", "prediction": "middle", "score": 1.0},
        {"task": "world-position", "answer": "bottom right", "prediction": "left", "score": 0.0},
        {"task": "world-count", "answer": "3", "prediction": "4", "score": 0.0},
        {"task": "world-count", "answer": "3", "prediction": "3", "score": 1.0},
        {"task": "easyvqa", "answer": "red", "prediction": "red", "score": 1.0, "score_shuffled": 0.0},
        {"task": "easyvqa", "answer": "circle", "prediction": "square", "score": 0.0, "score_shuffled": 1.0},
        {"task": "easyvqa", "answer": "yes", "prediction": "yes", "score": 1.0, "score_shuffled": 1.0},
    ]
    p = mod.position(rows)
    assert p["n"] == 3 and round(p["row"], 1) == 66.7 and round(p["column"], 1) == 33.3
    assert p["confusion"][("top", "top left")] == 1
    c = mod.count(rows)
    assert c["per_count"] == {"3": (2, 50.0)} and c["misses"] == {("3", "4"): 1}
    assert mod.easyvqa(rows) == {"colour": (1, 100.0, 0.0), "shape": (1, 0.0, 100.0), "yes/no": (1, 100.0, 100.0)}
    assert mod.easyvqa_misses(rows) == {("circle", "square"): 1}  # open questions only, misses only
    assert mod.easyvqa_misses(rows + [{"task": "easyvqa", "answer": "yes", "prediction": "No.", "score": 0.0}],
                              yes_no=True) == {("yes", "no"): 1}  # yes/no questions only, misses only
    f = tmp_path / "predictions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mod.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "row 66.7 %, column 33.3 %" in out and "3 -> 4: 1" in out and "easyvqa shape (n=1): 0.0 %" in out
    assert "'circle' -> 'square': 1" in out
    assert mod.main([]) == 2


def test_easyvqa_yesno_split_by_the_word_asked_about(tmp_path, capsys):
    mod = _module()
    rows = [
        {"task": "easyvqa", "prompt": "is there a green shape?", "answer": "no", "prediction": "yes", "score": 0.0},
        {"task": "easyvqa", "prompt": "is no green shape present?", "answer": "yes", "prediction": "yes", "score": 1.0},
        {"task": "easyvqa", "prompt": "does the image contain a circle?", "answer": "yes", "prediction": "yes",
         "score": 1.0},
        {"task": "easyvqa", "prompt": "what color is the shape?", "answer": "green", "prediction": "teal", "score": 0.0},
        {"task": "easyvqa", "prompt": "is there a shape?", "answer": "yes", "prediction": "yes", "score": 1.0},
    ]
    # open questions and yes/no questions naming no colour or shape are left out
    assert mod.easyvqa_yesno_by_word(rows) == {"green": (2, 50.0), "circle": (1, 100.0)}
    f = tmp_path / "predictions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mod.main([str(f)]) == 0
    assert "green 50.0 % (n=2), circle 100.0 % (n=1)" in capsys.readouterr().out


def test_breakdown_of_count_by_object_size_and_report_by_corruption(capsys, tmp_path):
    from llavakit.data.world import eval_item

    mod = _module()
    rows = []
    for i in range(24):
        item = eval_item("world-count", 0, i)
        rows.append({"task": item.task, "id": item.id, "answer": item.answer, "score": 0.0,
                     "prediction": str(int(item.answer) + 1)})  # every answer one too many
    c = mod.count_by_size(rows)
    multi = [r for r in rows if int(r["answer"]) >= 2]
    assert sum(n for n, *_ in c.values()) == len(multi) > 0
    assert all(acc == 0.0 and over == 100.0 and under == 0.0 for _, acc, over, under in c.values())
    reports = []
    for i in range(12):
        item = eval_item("world-report-simple", 0, i)
        reports.append({"task": item.task, "id": item.id, "answer": item.answer, "prediction": "yes",
                        "score": float(item.answer == "yes")})
    r = mod.report(reports)["world-report-simple"]
    # "yes" is wrong on every correct report
    assert r["corruption"]["none"][1] == 0.0 and r["corruption"]["none"][0] == 6
    assert all(acc == 100.0 for label, (_, acc) in r["corruption"].items() if label != "none")
    assert sum(n for n, _ in r["statements"].values()) == 12
    f = tmp_path / "predictions.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in rows + reports))
    assert mod.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "over-count 100.0 %" in out and "world-report-simple: insert: 100.0 %" in out


def test_easyvqa_answer_prior_is_the_most_common_train_answer_per_question():
    mod = _module()
    train = [("is there a teal shape?", "no"), ("is there a teal shape?", "no"), ("is there a teal shape?", "yes"),
             ("what shape is this?", "circle")]
    rows = [
        {"task": "easyvqa", "prompt": "is there a teal shape? Answer with one word.", "answer": "no", "score": 1.0},
        {"task": "easyvqa", "prompt": "Is there a teal shape? Answer with one word.", "answer": "yes", "score": 1.0},
        {"task": "easyvqa", "prompt": "what shape is this? Answer with one word.", "answer": "circle", "score": 0.0},
        {"task": "easyvqa", "prompt": "an unseen question?", "answer": "red", "score": 1.0},  # no prior: a miss
        {"task": "world-count", "prompt": "How many shapes are there?", "answer": "3", "score": 1.0},
    ]
    assert mod.easyvqa_prior(rows, train) == (4, 50.0)
    assert mod.easyvqa_prior([r for r in rows if r["task"] != "easyvqa"], train) is None
    # the default prior is the real train split: the common "is there a ... shape?" questions are mostly "no"
    n, acc = mod.easyvqa_prior(rows[:1])
    assert (n, acc) == (1, 100.0)


def test_agreement_counts_same_answers_matched_by_id_and_round(tmp_path, capsys):
    mod = _module()
    a = [{"task": "world-count", "id": "c-0-0", "prediction": "3"},
         {"task": "world-count", "id": "c-0-1", "prediction": "2"},
         {"task": "mr", "id": "m-0-0", "round": 1, "prediction": "red"},
         {"task": "mr", "id": "only-a", "prediction": "x"}]  # in one run only: not counted
    b = [{"task": "world-count", "id": "c-0-1", "prediction": "2"},
         {"task": "world-count", "id": "c-0-0", "prediction": "4"},
         {"task": "mr", "id": "m-0-0", "round": 0, "prediction": "red"},  # another round: not matched
         {"task": "mr", "id": "m-0-0", "round": 1, "prediction": "red"}]
    assert mod.agreement(a, b) == {"mr": (1, 1), "world-count": (2, 1)}
    fa, fb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    fa.write_text("".join(json.dumps(r) + "\n" for r in a))
    fb.write_text("".join(json.dumps(r) + "\n" for r in b))
    assert mod.main([str(fa), "--against", str(fb)]) == 0
    assert "all: the same answer on 2 of 3 items" in capsys.readouterr().out


def test_paired_difference_matches_items_by_id_and_scores_items_over_rounds(tmp_path, capsys):
    mod = _module()
    a = [{"task": "t", "id": "i0", "score": 1.0, "prediction": "x"},
         {"task": "t", "id": "i1", "score": 1.0, "prediction": "x"},
         {"task": "t", "id": "i2", "round": 0, "score": 1.0, "prediction": "x"},
         {"task": "t", "id": "i2", "round": 1, "score": 0.0, "prediction": "y"},  # item i2 scores 0.5
         {"task": "t", "id": "i3", "score": 0.0, "prediction": "y"},
         {"task": "t", "id": "a-only", "score": 1.0, "prediction": "x"}]  # in one run only: not counted
    b = [{"task": "t", "id": "i0", "score": 1.0, "prediction": "x"},
         {"task": "t", "id": "i1", "score": 0.0, "prediction": "y"},
         {"task": "t", "id": "i2", "score": 1.0, "prediction": "x"},
         {"task": "t", "id": "i3", "score": 1.0, "prediction": "x"}]
    p = mod.paired(a, b)["t"]
    assert p["n"] == 4 and p["acc"] == 62.5 and p["acc_other"] == 75.0 and p["diff"] == -12.5
    assert (p["only"], p["only_other"]) == (1, 2)
    # differences (0, 1, -0.5, -1): sd = sqrt(0.72917), half-width 1.96 * sd / sqrt(4)
    assert round(p["ci95"], 2) == round(100 * 1.96 * (0.729166667 ** 0.5) / 2, 2)
    same = mod.paired(b, b)["t"]
    assert same["diff"] == 0.0 and same["ci95"] == 0.0
    fa, fb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    fa.write_text("".join(json.dumps(r) + "\n" for r in a))
    fb.write_text("".join(json.dumps(r) + "\n" for r in b))
    assert mod.main([str(fa), "--against", str(fb)]) == 0
    out = capsys.readouterr().out
    assert "t (n=4): 62.5 % vs 75.0 %, difference -12.5 +- " in out
    assert "right only in the first 1, only in the second 2" in out


def test_config_keeps_one_grid_configuration(tmp_path, capsys):
    import pytest

    mod = _module()
    rows = [
        {"config": "none", "task": "world-position", "id": "a", "answer": "top right", "prediction": "top right",
         "score": 1.0},
        {"config": "fastervlm@0.1", "task": "world-position", "id": "a", "answer": "top right",
         "prediction": "top left", "score": 0.0},  # right row, wrong column
    ]
    f = tmp_path / "grid_predictions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mod.main([str(f), "--config", "fastervlm@0.1"]) == 0
    assert "row 100.0 %, column 0.0 %" in capsys.readouterr().out
    assert mod.main([str(f), "--config", "none"]) == 0
    assert "row 100.0 %, column 100.0 %" in capsys.readouterr().out
    assert mod.main(["--config", "fastervlm@0.1", str(f), "--against", str(f)]) == 0
    assert "difference +0.0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="present: fastervlm@0.1, none"):
        mod.main([str(f), "--config", "fastv@0.1"])
    with pytest.raises(SystemExit, match="holds 2 grid configurations \\(fastervlm@0.1, none\\); pick one with --config"):
        mod.main([str(f)])  # without --config the two configurations' answers would be scored as one run
    with pytest.raises(SystemExit, match="pick one with --config"):
        mod.main([str(f), "--against", str(f)])
    assert mod.main([str(f), "--config"]) == 2


def test_help_and_a_missing_file_are_clear(tmp_path, capsys):
    mod = load_benchmark("eval_breakdown")
    assert mod.main(["--help"]) == 0
    assert "--against" in capsys.readouterr().out
    assert mod.main([str(tmp_path / "nowhere.jsonl")]) == 2
    assert "no predictions file" in capsys.readouterr().err
    real = tmp_path / "p.jsonl"
    real.write_text("")
    assert mod.main([str(real), "--against", str(tmp_path / "other.jsonl")]) == 2
    assert "other.jsonl" in capsys.readouterr().err
