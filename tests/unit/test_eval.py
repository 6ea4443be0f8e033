"""The evaluation harness: scoring rule, aggregation, baselines, shuffled control, costs, reports."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import llavakit
from llavakit.errors import InputError
from llavakit.eval import EvalItem
from llavakit.eval.harness import build_requests, derangement, evaluate
from llavakit.eval.report import write_report
from llavakit.eval.scoring import exact_match, extract_answer, normalize
from llavakit.eval.tasks import TASKS, EasyVQATask, WorldTask
from tests.tiny_models import build

COLOURS = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 255, 0): "green", (255, 255, 0): "yellow"}
RGB = {v: k for k, v in COLOURS.items()}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return llavakit.load(str(build("llava", tmp_path_factory.mktemp("eval-llava"))))


# ----------------------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("prediction, answer, choices, expected", [
    ("red", "red", (), 1.0),
    ("Red.", "red", (), 1.0),
    ("  RED!\nsecond line", "red", (), 1.0),
    ("\n\nred", "red", (), 1.0),
    ("The colour is red.", "red", ("red", "blue"), 1.0),
    ("It's red", "red", ("red", "blue"), 1.0),
    ("The shape is a circle", "circle", ("circle", "square"), 1.0),
    ("Answer: yes", "yes", ("yes", "no"), 1.0),
    ("Yes, there is a red circle.", "yes", ("yes", "no"), 1.0),
    ("No.", "no", ("yes", "no"), 1.0),
    ("not sure", "no", ("yes", "no"), 0.0),  # whole words: "not" is not "no"
    ("There is a red circle.", "yes", ("yes", "no"), 0.0),  # no yes/no given
    ("two", "2", ("1", "2", "3"), 1.0),
    ("There are two shapes.", "2", ("1", "2", "3"), 1.0),
    ("3", "three", (), 1.0),
    ("top left", "top", ("top", "top left", "left"), 0.0),  # longest choice wins
    ("top-left", "top left", ("top", "top left", "left"), 1.0),
    ("It is located in the top left.", "top left", ("top", "top left"), 1.0),
    ("The circle is red and the square is blue", "red", ("red", "blue"), 1.0),  # first copula
    ("The circle is red and the square is blue", "blue", ("red", "blue"), 0.0),
    ("red or blue", "blue", ("red", "blue"), 0.0),  # a hedge scores its first option only
    ("The shape is not a circle", "circle", ("circle", "square"), 0.0),
    ("grey", "gray", (), 1.0),
    ("", "red", ("red",), 0.0),
    ("reddish", "red", (), 0.0),
])
def test_exact_match_rule(prediction, answer, choices, expected):
    assert exact_match(prediction, answer, choices) == expected


def test_normalize_and_extract():
    assert normalize("The Top-Left, an apple!") == "top left apple"
    assert normalize("Twenty one") == "20 1"
    assert extract_answer("It is in the bottom right corner.", ["bottom", "bottom right", "right"]) == "bottom right"
    assert extract_answer("Nothing useful", ["red"]) == ""


# ----------------------------------------------------------------------------------------- fake tasks

def _solid(colour: str) -> Image.Image:
    return Image.new("RGB", (24, 24), RGB[colour])


class FakeColourTask:
    """4 items; two share one (identical) red image, so the derangement must repair a collision."""

    name = "test-fake-colour"
    description = "fake colour questions"
    golds = ("red", "red", "blue", "green")

    def items(self, limit, seed):
        items = [EvalItem(id=f"fake{i}", images=(_solid(c),), prompt=f"q{i} what colour is the shape ?",
                          answer=c, choices=tuple(RGB)) for i, c in enumerate(self.golds)]
        return items[:limit]

    def score(self, prediction, item):
        return exact_match(prediction, item.answer, item.choices)


class FakeMultiRoundTask:
    name = "test-fake-multiround"
    description = "fake conversations"

    def items(self, limit, seed):
        choices = ("yes", "no", "red", "blue", "circle")
        rounds0 = (("q0r0 is it red ?", "yes"), ("q0r1 what colour ?", "red"))
        rounds1 = (("q1r0 is it red ?", "no"), ("q1r1 what colour ?", "blue"), ("q1r2 what shape ?", "circle"))
        return [EvalItem(id=f"conv{i}", images=(_solid(c),), prompt=r[-1][0], answer=r[-1][1], choices=choices,
                         rounds=r) for i, (c, r) in enumerate([("red", rounds0), ("blue", rounds1)])]

    def score(self, prediction, item):
        return exact_match(prediction, item.answer, item.choices)


class StubVLM:
    """A real tiny VLM (processor, cost, prompts) whose chat_batch returns known strings.

    Colour questions: it names the colour of the image it is given, phrased per question; q3 gets
    "not sure". Conversations: a fixed answer per question. Each answer "costs" 3 tokens (on_token).
    """

    FORMATS = ("{}.", "The colour is {}", "It's {}!", "not sure")
    CONVERSATION = {"q0r0": "Yes.", "q0r1": "red", "q1r0": "yes", "q1r1": "Blue", "q1r2": "circle"}

    def __init__(self, real):
        self._real = real
        self.calls: list[tuple[list, list, dict]] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def chat_batch(self, prompts, images, **kw):
        on_token = kw.pop("on_token", None)
        self.calls.append((list(prompts), [list(im) for im in images], kw))
        out = []
        for row, (p, ims) in enumerate(zip(prompts, images)):
            text = p if isinstance(p, str) else p[-1]["content"]
            key = text.replace("<image>", "").split()[0]
            if key in self.CONVERSATION:
                out.append(self.CONVERSATION[key])
            else:
                colour = COLOURS[ims[0].getpixel((0, 0))]
                out.append(self.FORMATS[int(key[1:])].format(colour))
            for t in range(3):
                if on_token is not None:
                    on_token(row, 5 + t)
        return out


@pytest.fixture
def fake_tasks(monkeypatch):
    monkeypatch.setitem(TASKS._items, FakeColourTask.name, FakeColourTask)
    monkeypatch.setitem(TASKS._items, FakeMultiRoundTask.name, FakeMultiRoundTask)


# ----------------------------------------------------------------------------------------- harness

def test_exact_aggregation_baselines_and_shuffled_control(tiny_vlm, fake_tasks, tmp_path):
    stub = StubVLM(tiny_vlm)
    res = evaluate(stub, ["test-fake-colour"], batch_size=3, shuffled_control=True, progress=False, warmup=False)
    (row,) = res.rows
    assert (row.n, row.n_questions) == (4, 4)
    assert row.accuracy == 0.75  # "Red." / "The colour is red" / "It's blue!" right, "not sure" wrong
    assert row.accuracy_shuffled == 0.0  # every item saw a differently coloured image
    assert row.consistency is None
    assert row.baselines == {"majority": {"answer": "red", "accuracy": 0.5}, "chance": 0.25}
    assert row.per_answer == {"blue": {"n": 1, "accuracy": 1.0, "accuracy_shuffled": 0.0},
                              "green": {"n": 1, "accuracy": 0.0, "accuracy_shuffled": 0.0},
                              "red": {"n": 2, "accuracy": 1.0, "accuracy_shuffled": 0.0}}
    # Batching, greedy generation, and the shuffled pairing as the stub saw them.
    assert [len(p) for p, _, _ in stub.calls] == [3, 1, 3, 1]
    assert all(kw == {"max_new_tokens": 10, "temperature": 0.0} for _, _, kw in stub.calls)
    real_imgs = [im[0] for _, ims, _ in stub.calls[:2] for im in ims]
    shuf_imgs = [im[0] for _, ims, _ in stub.calls[2:] for im in ims]
    for gold, real, shuf in zip(FakeColourTask.golds, real_imgs, shuf_imgs):
        assert COLOURS[real.getpixel((0, 0))] == gold
        assert COLOURS[shuf.getpixel((0, 0))] != gold  # a different (not just another identical) image
    # Costs and timings from the real processor/cost, the stub's 3 tokens per answer.
    assert row.visual_tokens == tiny_vlm.model.num_image_tokens() == 16
    assert row.new_tokens == 3.0
    rec = res.predictions[0]
    expected = tiny_vlm.cost(prompt_tokens=rec["text_tokens"], new_tokens=3, image_sizes=[(32, 32)]).total_flops
    assert rec["flops"] == expected and rec["visual_tokens"] == 16
    assert row.flops_total == sum(p["flops"] for p in res.predictions)
    assert row.prefill_s is not None and row.prefill_s >= 0 and row.decode_s_per_token is not None
    assert row.questions_per_s > 0
    assert {p["shuffled_image_of"] for p in res.predictions} <= {f"fake{i}" for i in range(4)}
    assert all(p["shuffled_image_of"] != p["id"] for p in res.predictions)

    paths = write_report(res, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    keys = {"task", "accuracy", "n", "visual_tokens", "flops", "prefill_s", "decode_s_per_token",
            "questions_per_s", "baselines", "accuracy_shuffled", "per_answer"}
    assert keys <= set(data["rows"][0]) and data["rows"][0]["accuracy"] == 0.75
    md = paths["markdown"].read_text()
    assert "| test-fake-colour | 4 | 75.0 | 0.0 |" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths["predictions"].read_text().splitlines()) == 4


def test_multiround_context_score_and_consistency(tiny_vlm, fake_tasks):
    stub = StubVLM(tiny_vlm)
    res = evaluate(stub, ["test-fake-multiround"], batch_size=8, progress=False, warmup=False)
    (row,) = res.rows
    assert (row.n, row.n_questions) == (2, 5)
    assert row.accuracy == pytest.approx((1.0 + 2 / 3) / 2)  # item 0: 2/2, item 1: 2/3 ("yes" is wrong)
    assert row.consistency == 0.5
    assert row.baselines["majority"] == {"answer": "blue", "accuracy": pytest.approx((0 + 1 / 3) / 2)}
    assert row.baselines["chance"] == pytest.approx(0.2)
    (prompts, _, _), = stub.calls
    last = prompts[-1]  # item 1, round 2: earlier rounds with their gold answers, image tag once
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in last[1::2]] == ["no", "blue"]
    assert last[0]["content"].startswith("<image>\n") and "<image>" not in last[2]["content"]
    assert row.visual_tokens == 16


def test_real_tiny_model_is_deterministic_and_costed(tiny_vlm):
    a = evaluate(tiny_vlm, ["world-colour"], limit=2, batch_size=2, progress=False)
    b = evaluate(tiny_vlm, ["world-colour"], limit=2, batch_size=2, progress=False)
    assert [p["prediction"] for p in a.predictions] == [p["prediction"] for p in b.predictions]
    row = a.rows[0]
    assert row.visual_tokens == 16 and row.flops > 0 and row.prefill_s > 0
    for p in a.predictions:
        cost = tiny_vlm.cost(prompt_tokens=p["text_tokens"], new_tokens=p["new_tokens"], image_sizes=[(32, 32)])
        assert p["flops"] == cost.total_flops and cost.visual_tokens["llm"] == p["visual_tokens"]


def test_unknown_task_lists_valid_names(tiny_vlm):
    with pytest.raises(InputError, match="valid names: .*easyvqa.*world-colour"):
        evaluate(tiny_vlm, ["easyvqa", "no-such-task"], progress=False)


def test_malformed_compression_is_refused(tiny_vlm):
    with pytest.raises(InputError, match="bad compression parameter"):
        evaluate(tiny_vlm, ["world-colour"], limit=1, compression="fastv:0.5", progress=False)


def test_bad_settings(tiny_vlm):
    for kw in ({"batch_size": 0}, {"limit": 0}, {"max_new_tokens": 0}):
        with pytest.raises(InputError):
            evaluate(tiny_vlm, ["world-colour"], progress=False, **kw)


# ----------------------------------------------------------------------------------------- pieces

def test_derangement():
    items = [EvalItem(id=str(i), images=(_solid(c),), prompt="q", answer=c, choices=())
             for i, c in enumerate(["red", "red", "red", "blue", "green", "yellow"])]
    src = derangement(items, seed=0)
    assert sorted(src) == list(range(6))
    assert all(items[s].answer != items[i].answer for i, s in enumerate(src))
    assert derangement(items, seed=0) == src  # deterministic
    assert derangement(items[:1], seed=0) is None
    assert derangement(items[:3], seed=0) is None  # one image for all: impossible
    paths = [EvalItem(id=str(i), images=(f"/x/{i // 2}.png",), prompt="q", answer="a", choices=()) for i in range(4)]
    src = derangement(paths, seed=3)
    assert all(paths[s].images != paths[i].images for i, s in enumerate(src))


def test_build_requests_single_and_multiround():
    single = EvalItem(id="s", images=("a.png",), prompt="q? Answer.", answer="x", choices=("x",))
    multi = FakeMultiRoundTask().items(None, 0)[0]
    reqs = build_requests([single, multi])
    assert [(r.item, r.round) for r in reqs] == [(0, 0), (1, 0), (1, 1)]
    assert reqs[0].prompt == "q? Answer." and reqs[0].unit is single
    assert reqs[2].unit.answer == "red" and reqs[2].unit.id == "conv0#r1"


def test_world_task_items():
    items = WorldTask("world-position").items(3, seed=0)
    assert len(items) == 3 and all(isinstance(it.images[0], Image.Image) for it in items)
    assert all(it.prompt.endswith("Answer with one or two words.") and it.answer in it.choices for it in items)
    multi = WorldTask("world-multiround").items(2, seed=0)
    assert all(len(it.rounds) >= 2 and it.rounds[-1] == (it.prompt, it.answer) for it in multi)
    report = WorldTask("world-report-simple").items(2, seed=0)
    assert all("\nAnswer yes or no." in it.prompt and it.kind for it in report)
    colour = WorldTask("world-colour")
    assert [it.id for it in colour.items(2, 5)] == [it.id for it in colour.items(2, 5)]
    with pytest.raises(InputError):
        WorldTask("world-nope")


def test_easyvqa_task_items():
    items = EasyVQATask().items(5, seed=0)
    assert len(items) == 5
    for it in items:
        assert it.prompt.endswith("? Answer with one word.") and it.answer in it.choices
        assert len(it.choices) == {"yes/no": 2, "shape": 3, "color": 8}[it.kind]


def test_registry_has_every_task_and_cli_help_names_them():
    from llavakit.cli import build_parser
    from llavakit.data.world import EVAL_TASKS

    assert TASKS.names() == sorted(["easyvqa", *EVAL_TASKS])
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    help_text = next(a.help for a in sub.choices["eval"]._actions if a.dest == "tasks")
    assert set(re.findall(r"[a-z]+(?:-[a-z]+)*", help_text.split(":", 1)[1])) == set(TASKS.names())
