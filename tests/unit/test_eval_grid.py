"""Budget-matched compression grid: plan, rows (accuracy, retention, agreement, tokens, FLOPs, KV), files,
kept-token masks, the benchmark script and `llavakit eval --keep` end to end, refusals before compute."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import llavakit
from llavakit.compression import BUDGET_PARAMS, Compression
from llavakit.errors import InputError
from llavakit.eval import EvalItem
from llavakit.eval.grid import GridConfig, evaluate_grid, parse_keeps, plan_grid, write_grid
from llavakit.eval.kept_tokens import kept_mask
from llavakit.eval.tasks import TASKS
from tests.tiny_models import build

PNG = b"\x89PNG\r\n\x1a\n"
METHODS = ["fastervlm", "fastv:layer=1"]  # the tiny LM has 2 layers: FastV prunes before layer 1
KEEPS = [1, 0.5, 0.25]
NEW = 4


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


class OracleTask:
    """Items whose gold answer is the uncompressed tiny model's own greedy answer (filled in by `fit`), scored
    by exact string equality: the reference scores 100 %, and a config's accuracy equals its agreement."""

    description = "the uncompressed model's answers as gold"

    def __init__(self, name: str, seeds: tuple[int, ...]) -> None:
        self.name, self.seeds, self.answers = name, seeds, [""] * len(seeds)

    def items(self, limit, seed):
        its = [EvalItem(id=f"{self.name}-{i}", images=(_image(s),), prompt="what colour is the shape ?",
                        answer=self.answers[i], choices=()) for i, s in enumerate(self.seeds)]
        return its[:limit]

    def fit(self, vlm) -> "OracleTask":
        its = self.items(None, 0)
        self.answers = vlm.chat_batch([it.prompt for it in its], [list(it.images) for it in its], compression=None,
                                      max_new_tokens=NEW, temperature=0.0)
        return self

    def score(self, prediction, item):
        return float(prediction == item.answer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("grid-llava"))


@pytest.fixture(scope="module")
def vlm(model_dir, one_torch_thread):
    return llavakit.load(str(model_dir))


@pytest.fixture(scope="module")
def grid(vlm, tmp_path_factory):
    tasks = [OracleTask("oracle-a", (1, 2, 3, 4)).fit(vlm), OracleTask("oracle-b", (5, 6, 7, 8)).fit(vlm)]
    out = tmp_path_factory.mktemp("grid-out")
    g = evaluate_grid(vlm, tasks, METHODS, KEEPS, batch_size=4, max_new_tokens=NEW, progress=False, out=out)
    return g, out


# ----------------------------------------------------------------------------------------- the plan

def test_plan_reference_first_then_every_method_at_every_keep(vlm, monkeypatch):
    plan = plan_grid("fastervlm,fastv:layer=1", "1,0.5,0.1", vlm.model)
    assert plan[0] == GridConfig("none", None, None)
    assert [(c.method, c.keep, c.spec) for c in plan[1:]] == [
        ("fastervlm", 1.0, "fastervlm:keep=1.0"), ("fastervlm", 0.5, "fastervlm:keep=0.5"),
        ("fastervlm", 0.1, "fastervlm:keep=0.1"), ("fastv:layer=1", 1.0, "fastv:layer=1:keep=1.0"),
        ("fastv:layer=1", 0.5, "fastv:layer=1:keep=0.5"), ("fastv:layer=1", 0.1, "fastv:layer=1:keep=0.1")]
    assert plan[2].label == "fastervlm@0.5"
    monkeypatch.setitem(BUDGET_PARAMS, "fastv", None)  # a method without a budget knob runs once, as given
    plan = plan_grid(["fastv:layer=1"], [1, 0.5])
    assert [(c.method, c.keep, c.spec) for c in plan] == [("none", None, None),
                                                           ("fastv:layer=1", None, "fastv:layer=1")]


@pytest.mark.parametrize("methods, keeps, message", [
    ("nope", "1", "unknown compression method 'nope'; valid names: .*fastervlm.*fastv"),
    ("fastervlm,nope", "1", "valid names"),
    ("fastervlm", "0", r"outside \(0, 1\]"),
    ("fastervlm", "1,1.5", r"outside \(0, 1\]"),
    ("fastervlm", "-0.1", r"outside \(0, 1\]"),
    ("fastervlm", "half", "bad keep ratio 'half'"),
    ("fastervlm", "", "bad keep ratio"),
    ("fastervlm:keep=0.3", "1", "sets its own budget"),
    ("fastv:count=3", "1", "sets its own budget"),
    ("fastervlm:bogus=1", "1", "unknown parameter 'bogus'"),
    (["fastervlm, fastv:layer=1"], "1", "ONE method"),
])
def test_plan_refuses_bad_methods_and_keeps(methods, keeps, message):
    with pytest.raises(InputError, match=message):
        plan_grid(methods, keeps)


def test_plan_checks_specs_against_the_model(vlm):
    plan_grid("fastv:layer=5", "1")  # fine without a model...
    with pytest.raises(InputError, match="layer 5 is outside the LM's 2 layers"):
        plan_grid("fastv:layer=5", "1", vlm.model)  # ...refused against the 2-layer tiny LM


def test_parse_keeps_dedupes_and_keeps_order():
    assert parse_keeps("1, 0.5,0.5,0.05") == [1.0, 0.5, 0.05]
    assert parse_keeps([1, 0.25]) == [1.0, 0.25]
    with pytest.raises(InputError):
        parse_keeps([True])


def test_bad_grid_refused_before_any_compute(vlm):
    class Untouchable:
        model = vlm.model

        def chat_batch(self, *a, **k):
            raise AssertionError("compute started")

        cost = chat_batch

    task = OracleTask("oracle-x", (1,))
    for methods, keeps in (("fastervlm", "0.5,2"), ("fastv:layer=9", "0.5"), ("nope", "0.5")):
        with pytest.raises(InputError):
            evaluate_grid(Untouchable(), [task], methods, keeps, progress=False)


# ----------------------------------------------------------------------------------------- the rows

def test_rows_for_every_config_and_task(grid):
    g, _ = grid
    labels = ["none"] + [f"{m}@{k:g}" for m in METHODS for k in KEEPS]
    assert [c.label for c in g.configs] == labels
    assert [(r.label, r.task) for r in g.rows] == [(lab, t) for lab in labels for t in ("oracle-a", "oracle-b")]
    assert all(r.n == 4 and r.n_questions == 4 and not r.notes for r in g.rows)


def test_reference_and_keep_one_fastervlm_retain_everything(grid):
    g, _ = grid
    for task in g.tasks:
        ref = g.row(task, "none")
        assert ref.accuracy == 1.0 and ref.retention == 100.0 and ref.agreement == 100.0
        full = g.row(task, "fastervlm", 1.0)  # keeps all 16 tokens: the same answers
        assert full.retention == 100.0 and full.agreement == 100.0 and full.visual_tokens == 16
        assert full.tflops == ref.tflops and full.kv_cache_bytes == ref.kv_cache_bytes


def test_accuracy_retention_and_agreement_agree_on_the_oracle_task(grid):
    g, _ = grid  # gold = the reference's answer, so accuracy is the agreement and retention is accuracy / 1
    for r in g.rows:
        assert r.agreement == pytest.approx(100 * r.accuracy)
        assert r.retention == pytest.approx(100 * r.accuracy)
    agreements = {g.row(t, "fastervlm", 0.25).agreement for t in g.tasks}
    assert min(agreements) < 100.0  # 4 of 16 tokens changes some answers of a random model


def test_tokens_flops_and_kv_fall_with_keep(grid):
    g, _ = grid
    for task in g.tasks:
        fv = [g.row(task, "fastervlm", k) for k in KEEPS]
        assert [r.visual_tokens for r in fv] == [16, 8, 4] and [r.visual_tokens_lm for r in fv] == [16, 8, 4]
        fastv = [g.row(task, "fastv:layer=1", k) for k in KEEPS]
        assert [r.visual_tokens for r in fastv] == [16, 16, 16]  # all enter the LM...
        assert [r.visual_tokens_lm for r in fastv] == [16, 12, 10]  # ...layer 1 sees 16, 8, 4: mean 16, 12, 10
        for rows in (fv, fastv):
            assert rows[0].tflops > rows[1].tflops > rows[2].tflops
            assert rows[0].lm_prefill_tflops > rows[1].lm_prefill_tflops > rows[2].lm_prefill_tflops
            assert rows[2].kv_cache_bytes < g.row(task, "none").kv_cache_bytes
        assert all(r.prefill_s > 0 and r.questions_per_s > 0 for r in fv + fastv)


def test_flops_match_the_harness_and_visual_tokens_are_recounted(grid, vlm):
    g, _ = grid
    for c in g.configs:
        preds = g.predictions[c.label]
        for task in g.tasks:
            mine = [p for p in preds if p["task"] == task]
            harness_mean = sum(p["flops"] for p in mine) / len(mine)
            assert g.row(task, c.method, c.keep).tflops == pytest.approx(harness_mean / 1e12)
    assert {p["visual_tokens"] for p in g.predictions["fastervlm@0.25"]} == {4}
    p = g.predictions["fastervlm@0.25"][0]
    cost = vlm.cost(prompt_tokens=p["text_tokens"], new_tokens=p["new_tokens"], image_sizes=[(32, 32)],
                    compression="fastervlm:keep=0.25")
    assert cost.visual_tokens["llm"] == 4 and cost.total_flops == p["flops"]


def test_summary_averages_over_tasks(grid):
    g, _ = grid
    summary = {r.label: r for r in g.summary()}
    assert list(summary) == [c.label for c in g.configs] and all(r.task == "mean" for r in summary.values())
    for c in g.configs:
        rows = [g.row(t, c.method, c.keep) for t in g.tasks]
        s = summary[c.label]
        assert s.accuracy == pytest.approx(sum(r.accuracy for r in rows) / 2)
        assert s.tflops == pytest.approx(sum(r.tflops for r in rows) / 2) and s.n == 8


def test_files_written(grid):
    g, out = grid
    data = json.loads((out / "grid.json").read_text())
    assert len(data["rows"]) == len(g.rows) and len(data["summary"]) == len(g.configs)
    assert data["settings"]["keeps"] == [1.0, 0.5, 0.25] and data["settings"]["methods"] == METHODS
    assert {"retention", "agreement", "tflops", "lm_prefill_tflops", "kv_cache_bytes", "prefill_s",
            "decode_s_per_token", "visual_tokens", "questions_per_s"} <= set(data["rows"][0])
    md = (out / "grid.md").read_text()
    assert "## Mean over tasks" in md and "## oracle-a" in md and "## oracle-b" in md
    assert "| fastervlm | 1 | 4 | 100.0 | 100.0 | 100.0 | 16.0 |" in md
    for name in ("pareto_tflops.png", "pareto_prefill.png", "kept_tokens.png"):
        assert (out / name).read_bytes()[:8] == PNG
    lines = (out / "grid_predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(g.configs) * 8 and json.loads(lines[0])["config"] == "none"
    again = write_grid(g, out / "again")  # without a model: no kept-token figure
    assert set(again) == {"json", "markdown", "predictions", "pareto_tflops", "pareto_prefill"}


# ----------------------------------------------------------------------------------------- kept tokens

def test_kept_mask_pre_llm_matches_the_stage(vlm):
    img = _image(3)
    mask = kept_mask(vlm, img, "fastervlm:keep=0.25")
    assert mask.shape == (4, 4) and mask.dtype == torch.bool and int(mask.sum()) == 4
    pv = vlm.processor(text=["<image> q"], images=[img])["pixel_values"]
    pos = Compression.parse("fastervlm:keep=0.25").image_features(vlm.model, pv).positions[0]
    assert {tuple(p) for p in pos.tolist()} == {tuple(p) for p in mask.nonzero().tolist()}
    assert bool(kept_mask(vlm, img, None).all()) and bool(kept_mask(vlm, img, "fastervlm:keep=1.0").all())
    assert torch.equal(kept_mask(vlm, None, "fastervlm:keep=0.5"), kept_mask(vlm, None, "fastervlm:keep=0.5"))


def test_kept_mask_in_llm_reads_the_prefill_decisions(vlm):
    img = _image(3)
    mask = kept_mask(vlm, img, "fastv:layer=1:keep=0.25", prompt="what colour is the shape ?")
    assert mask.shape == (4, 4) and int(mask.sum()) == 4
    assert int(kept_mask(vlm, img, "fastv:layer=1:keep=0.5").sum()) == 8
    with pytest.raises(InputError):
        kept_mask(vlm, img, "fastv:layer=7")


# ----------------------------------------------------------------------------------------- CLI and benchmark

def test_cli_grid_end_to_end(model_dir, tmp_path, capsys):
    from llavakit.cli import main

    out = tmp_path / "cli"
    assert main(["eval", "--model", str(model_dir), "--tasks", "world-colour",
                 "--compression", "fastervlm,fastv:layer=1", "--keep", "1,0.25", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out),
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "| method | keep |" in stdout and "| fastervlm | 0.25 | 2 |" in stdout
    data = json.loads((out / "grid.json").read_text())
    assert [(r["method"], r["keep"]) for r in data["rows"]] == [
        ("none", None), ("fastervlm", 1.0), ("fastervlm", 0.25), ("fastv:layer=1", 1.0), ("fastv:layer=1", 0.25)]
    assert data["rows"][2]["visual_tokens"] == 4
    assert all((out / n).is_file() for n in ("grid.md", "pareto_tflops.png", "pareto_prefill.png", "kept_tokens.png"))


@pytest.mark.parametrize("extra, message", [
    (["--compression", "fastervlm", "--keep", "0,0.5"], r"outside \(0, 1\]"),
    (["--compression", "fastervlm", "--keep", "1.5"], r"outside \(0, 1\]"),
    (["--compression", "fastervlm,nope", "--keep", "0.5"], "valid names: .*fastervlm"),
    (["--keep", "0.5"], "--keep needs --compression"),
    (["--compression", "nope:keep=0.5"], "valid names"),
])
def test_cli_refuses_before_loading_the_model(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    from llavakit.cli import main

    monkeypatch.setattr(llavakit, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", str(model_dir), "--tasks", "world-colour", "--out", str(tmp_path), *extra]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_cli_refuses_model_incompatible_spec_before_compute(model_dir, tmp_path, capsys, monkeypatch):
    import llavakit.eval.grid as grid_mod
    import llavakit.eval.harness as harness
    from llavakit.cli import main

    monkeypatch.setattr(grid_mod, "evaluate", lambda *a, **k: pytest.fail("compute started"))
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("compute started"))
    for extra in (["--compression", "fastervlm,fastv:layer=3", "--keep", "0.5"], ["--compression", "fastv:layer=3"]):
        assert main(["eval", "--model", str(model_dir), "--tasks", "world-colour", "--out", str(tmp_path), *extra]) == 2
        assert "layer 3 is outside the LM's 2 layers" in capsys.readouterr().err


def test_benchmark_script_on_the_tiny_model(model_dir, tmp_path, monkeypatch):
    from tests.benchmarks import load_benchmark

    bench = load_benchmark("compression")
    monkeypatch.setitem(TASKS._items, "oracle-bench", lambda: OracleTask("oracle-bench", (1, 2)))
    out = tmp_path / "bench"
    assert bench.main(["--model", str(model_dir), "--tasks", "oracle-bench", "--methods", "fastervlm",
                       "--keeps", "1,0.1", "--limit", "2", "--max-new-tokens", "2", "--speed-runs", "2", "--threads", "1",
                       "--out", str(out)]) == 0
    speed = json.loads((out / "speed.json").read_text())["results"]
    assert list(speed) == ["none", "fastervlm@1", "fastervlm@0.1"]
    assert [speed[k]["visual_tokens"] for k in speed] == [16, 16, 2]
    assert speed["fastervlm@0.1"]["kv_cache_bytes"] < speed["fastervlm@1"]["kv_cache_bytes"]
    assert all(speed[k][f] > 0 for k in speed for f in ("vision_s", "lm_prefill_s", "ttft_s"))
    assert all((out / n).is_file() for n in ("grid.json", "grid.md", "pareto_tflops.png", "kept_tokens.png"))
    assert bench.main(["--model", str(model_dir), "--methods", "fastervlm", "--skip-grid", "--speed-batch", "3",
                       "--speed-runs", "1", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "speed.json").read_text())
    assert doc["batch"] == 3 and doc["results"]["fastervlm@0.1"]["visual_tokens"] == 2  # per request
    assert bench.main(["--model", str(model_dir), "--methods", "nope", "--out", str(out)]) == 2
