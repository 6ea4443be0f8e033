"""The lmms-eval adapter: real `lmms_eval` Instances in-process, and `python -m lmms_eval --model llavakit`
end to end on a local task (a YAML + JSON data + PNG images written to tmp_path; no hub, HF_HUB_OFFLINE=1),
run with `compression=fastervlm:keep=0.5` so the model arg travels through lmms-eval's parsing to chat_batch.

Skipped when lmms-eval is not installed (`pip install --no-deps lmms-eval` plus the few packages listed
in docs/lmms_eval.md).
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (see docs/lmms_eval.md)")

import llavakit  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from llavakit.errors import InputError  # noqa: E402
from llavakit.integrations import LMMS_EVAL_CLASS_PATH, lmms_eval_manifest  # noqa: E402
from llavakit.integrations.lmms_eval import LlavakitLMMS, register  # noqa: E402
from tests.tiny_models import build  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build("llava", tmp_path_factory.mktemp("lmms-llava"))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return llavakit.load(str(model_dir))


def _docs() -> list[dict]:
    return [{"question": f"what colour is the {shape} ?", "answer": c,
             "image": Image.new("RGB", (24 + 8 * i, 32), COLOURS[c])}
            for i, (c, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")])]


def _request(i: int, gen: dict, kind: str = "generate_until") -> Instance:
    args = (_docs()[i]["question"], gen, lambda doc: [doc["image"]], i, "toy", "test")
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})


def _adapter(vlm, **kw) -> LlavakitLMMS:
    lm = LlavakitLMMS(vlm=vlm, **kw)
    lm.task_dict = {"toy": {"test": _docs()}}
    return lm


# ----------------------------------------------------------------------------------------- in process

def test_generate_until_matches_chat_and_keeps_order(vlm):
    lm = _adapter(vlm, batch_size=2)
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"], "num_beams": 1}
    short = {"max_new_tokens": 2, "until": "w49"}
    reqs = [_request(0, greedy), _request(1, short), _request(2, greedy)]
    out = lm.generate_until(reqs)
    docs = _docs()
    expected = [vlm.chat(docs[0]["question"], [docs[0]["image"]], max_new_tokens=4, stop=["\n\n"]),
                vlm.chat(docs[1]["question"], [docs[1]["image"]], max_new_tokens=2, stop=["w49"]),
                vlm.chat(docs[2]["question"], [docs[2]["image"]], max_new_tokens=4, stop=["\n\n"])]
    assert out == expected
    assert "w49" not in out[1]


def test_loglikelihood_matches_logits(vlm):
    lm = _adapter(vlm)
    doc = _docs()[0]
    first = vlm.chat(doc["question"], [doc["image"]], max_new_tokens=1)  # the greedy next word
    req_greedy = _request(0, {}, "loglikelihood")
    req_greedy.arguments = (doc["question"], " " + first) + req_greedy.arguments[2:]
    req_other = _request(0, {}, "loglikelihood")
    req_other.arguments = (doc["question"], " red circle") + req_other.arguments[2:]
    (lp_greedy, is_greedy), (lp_other, other_greedy) = lm.loglikelihood([req_greedy, req_other])
    assert is_greedy and not other_greedy and lp_other < lp_greedy <= 0.0
    # the same number by hand: context ids (chat template, image tokens) + continuation ids
    inputs = vlm.processor(text=[vlm.build_prompt(doc["question"], [doc["image"]])], images=[doc["image"]])
    cont = vlm.processor.tokenizer(" red circle", add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"][0], torch.tensor(cont)])[None]
    logits = vlm(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    logp = torch.log_softmax(logits[-len(cont) - 1:-1].float(), -1)
    assert lp_other == pytest.approx(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()), abs=1e-4)


def test_loglikelihood_with_doc_to_target(vlm):
    lm = _adapter(vlm)
    req = _request(1, {}, "loglikelihood")
    req.arguments = (req.arguments[0], lambda doc: " " + doc["answer"]) + req.arguments[2:]
    (lp, greedy), = lm.loglikelihood([req])
    assert lp < 0.0 and isinstance(greedy, bool)


def test_generate_until_with_compression_matches_chat(vlm, monkeypatch):
    spec = "fastervlm:keep=0.5"
    lm = _adapter(vlm, compression=spec, batch_size=2)
    assert lm.compression.spec == spec
    gen = {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}
    out = lm.generate_until([_request(i, gen) for i in range(3)])
    docs = _docs()
    expected = [vlm.chat(d["question"], [d["image"]], max_new_tokens=4, stop=["\n\n"], compression=spec) for d in docs]
    assert out == expected
    # the spec really reaches chat_batch: what it runs with is the checked Compression
    seen = []
    real = vlm.chat_batch

    def spy(*a, **kw):
        seen.append(kw.get("compression"))
        return real(*a, **kw)

    monkeypatch.setattr(vlm, "chat_batch", spy)  # instance attribute only; undone after the test
    lm.generate_until([_request(0, gen)])
    assert [c.spec for c in seen] == [spec]


def test_loglikelihood_with_compression(vlm):
    spec = "fastervlm:keep=0.5"
    lm = _adapter(vlm, compression=spec)
    plain = _adapter(vlm)
    doc = _docs()[0]
    first = vlm.chat(doc["question"], [doc["image"]], max_new_tokens=1, compression=spec)  # greedy, compressed
    req = _request(0, {}, "loglikelihood")
    req.arguments = (doc["question"], " " + first) + req.arguments[2:]
    (lp, greedy), = lm.loglikelihood([req])
    assert greedy and lp <= 0.0  # the compressed model's own greedy word is greedy under compression
    (lp_plain, _), = plain.loglikelihood([req])
    assert lp != pytest.approx(lp_plain, abs=1e-6)  # 8 of 16 image tokens: a different model input
    # in-LLM pruning (FastV) runs in the same forward
    (lp_fastv, _), = _adapter(vlm, compression="fastv:layer=1:keep=0.5").loglikelihood([req])
    assert lp_fastv <= 0.0 and lp_fastv != pytest.approx(lp_plain, abs=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("magic:keep=0.5", "unknown compression method 'magic'; valid names:"),
    ("fastervlm:keep=2", "keep must be a ratio in (0, 1], got 2"),
    ("fastv:0.5", "expected key=value"),
    ("fastv:layer=9", "outside the LM's 2 layers"),
    (True, "is not a compression spec"),
])
def test_bad_compression_fails_at_construction(vlm, spec, message):
    with pytest.raises(InputError, match=re.escape(message)):
        LlavakitLMMS(vlm=vlm, compression=spec)


def test_bad_compression_fails_before_loading(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the spec was parsed")

    monkeypatch.setattr(llavakit, "load", no_load)
    with pytest.raises(InputError, match="unknown compression method"):
        LlavakitLMMS(source="default", compression="magic:keep=0.5")


def test_bad_arguments_are_clear(vlm):
    with pytest.raises(InputError, match="unknown llavakit model_args colour"):
        LlavakitLMMS(vlm=vlm, colour="red")
    with pytest.raises(InputError, match="'auto' is not supported"):
        LlavakitLMMS(vlm=vlm, batch_size="auto")
    lm = _adapter(vlm)
    with pytest.raises(InputError, match="no beam search"):
        lm.generate_until([_request(0, {"num_beams": 3})])
    with pytest.raises(NotImplementedError, match="multi_round"):
        lm.generate_until_multi_round([])
    video = _request(0, {})
    video.arguments = (video.arguments[0], {}, lambda doc: ["/data/clip.mp4"]) + video.arguments[3:]
    with pytest.raises(InputError, match="images only"):
        lm.generate_until([video])


def test_compression_none_and_extra_kwargs(vlm, caplog):
    lm = _adapter(vlm, compression="none", batch_size="2", max_new_tokens=3)
    assert lm.compression is None and lm.batch_size == 2
    gen = lm._generation_kwargs({"until": "\n", "image_aspect_ratio": "pad", "frobnicate": 1, "top_p": 0.5})
    # compression=None is passed explicitly: "none" also turns off a default the model was loaded with
    assert gen == {"max_new_tokens": 3, "temperature": 0.0, "stop": ["\n"], "compression": None}
    assert "frobnicate" in caplog.text and "image_aspect_ratio" not in caplog.text


def test_registration():
    manifest = lmms_eval_manifest()
    assert manifest.model_id == "llavakit" and manifest.simple_class_path == LMMS_EVAL_CLASS_PATH
    register()
    from lmms_eval.models import get_model

    assert get_model("llavakit") is LlavakitLMMS


# ----------------------------------------------------------------------------------------- end to end

TASK_YAML = """\
task: llavakit_toy_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
"""


E2E_COMPRESSION = "fastervlm:keep=0.5"  # the end-to-end run goes through the compression path


def _expected(vlm, row: dict) -> str:
    """What llavakit's own chat answers for a task row (the task's generation kwargs, the run's compression)."""
    return vlm.chat(row["question"], [Image.open(row["image"]).convert("RGB")], max_new_tokens=3, stop=["\n\n"],
                    compression=E2E_COMPRESSION)


def _write_task(root: Path, vlm) -> tuple[Path, list[dict]]:
    """Three items; item 0's gold answer is the random tiny model's own answer, so accuracy is 1/3."""
    task_dir = root / "tasks"
    task_dir.mkdir()
    rows = []
    for i, d in enumerate(_docs()):
        path = root / f"img{i}.png"
        d["image"].save(path)
        rows.append({"id": i, "image": str(path), "question": d["question"], "answer": d["answer"]})
    rows[0]["answer"] = _expected(vlm, rows[0])
    (root / "data.json").write_text(json.dumps(rows))
    (task_dir / "toy.yaml").write_text(TASK_YAML.format(data=root / "data.json"))
    (task_dir / "toy_utils.py").write_text(TASK_UTILS)
    return task_dir, rows


def _entry_point_path(root: Path) -> str | None:
    """A dist-info declaring the entry point, when the installed llavakit does not declare it yet."""
    if any(ep.name == "llavakit" for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
        return None
    info = root / "ep" / "llavakit_lmms_eval_plugin-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llavakit-lmms-eval-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nllavakit = llavakit.integrations:lmms_eval_manifest\n")
    return str(root / "ep")


def test_python_m_lmms_eval_end_to_end(model_dir, vlm, tmp_path):
    task_dir, rows = _write_task(tmp_path, vlm)
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    paths = [p for p in (_entry_point_path(tmp_path), str(REPO), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llavakit",
           "--model_args", f"source={model_dir},compression={E2E_COMPRESSION}", "--tasks", "llavakit_toy_vqa",
           "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "llavakit_toy_vqa" in proc.stdout and "exact_match" in proc.stdout

    results = json.loads(Path(glob.glob(str(out_dir / "**" / "*_results.json"), recursive=True)[0]).read_text())
    assert "exact_match,none" in results["results"]["llavakit_toy_vqa"]
    samples = [json.loads(line) for f in glob.glob(str(out_dir / "**" / "*samples*.jsonl"), recursive=True)
               for line in Path(f).read_text().splitlines() if line.strip()]
    assert len(samples) == len(rows)
    for s in samples:  # lmms-eval's answers are exactly what llavakit's chat says for the same request
        resp = s["filtered_resps"]
        assert (resp[0] if isinstance(resp, list) else resp) == _expected(vlm, rows[s["doc_id"]])
    # ... and the check can tell: without compression at least one answer would differ
    plain = [vlm.chat(r["question"], [Image.open(r["image"]).convert("RGB")], max_new_tokens=3, stop=["\n\n"])
             for r in rows]
    assert plain != [_expected(vlm, r) for r in rows]
    assert sorted(float(s["exact_match"]) for s in samples) == [0.0, 0.0, 1.0]
    assert results["results"]["llavakit_toy_vqa"]["exact_match,none"] == pytest.approx(1 / 3)
