"""llavakit.data.world: the synthetic world (scenes, rendering, questions, reports, eval items, clips).

Answers are checked by an oracle written here, independently of the generators: it parses each
question, resolves its referring expression against the scene and recomputes the answer.
"""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from llavakit.data.world import (
    CHOICES,
    COLOUR_RGB,
    COLOURS,
    EVAL_SEED_BASE,
    EVAL_TASKS,
    POSITIONS,
    SHAPES,
    TRAIN_SEED_BASE,
    WORDS,
    caption,
    clip_questions,
    eval_items,
    instructions,
    render,
    report,
    sample_clip,
    sample_scene,
    scene_split,
    train_records,
    train_samples,
    write_dataset,
)
from llavakit.data.world.language import attribute_check, exists_question
from llavakit.data.world.render import BACKGROUND, TEXT_RGB
from llavakit.errors import InputError

PHRASE_TO_POS = {
    "in the top left": "top left", "at the top": "top", "in the top right": "top right",
    "on the left": "left", "in the middle": "middle", "on the right": "right",
    "in the bottom left": "bottom left", "at the bottom": "bottom", "in the bottom right": "bottom right",
}  # fmt: skip
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}

# ------------------------------------------------------------------------------------------ oracle


def cell(obj, canvas):
    """Grid cell name from the centre, computed here without the package's helper."""
    col = min(3 * obj.x // canvas, 2)
    row = min(3 * obj.y // canvas, 2)
    return POSITIONS[3 * row + col]


def words_of(text):
    return re.findall(r"[a-z]+", text.lower())


def resolve(scene, phrase):
    """The one object a phrase like "the large red circle in the top left" / "the red object" names."""
    ws = words_of(phrase)
    pos = next((p for ph, p in PHRASE_TO_POS.items() if ph in phrase), None)
    cands = [
        o
        for o in scene.objects
        if all(
            [
                not any(w in ("small", "large") for w in ws) or o.size in ws,
                not any(w in COLOURS for w in ws) or o.colour in ws,
                not any(w in SHAPES for w in ws) or o.shape in ws,
                pos is None or cell(o, scene.canvas) == pos,
            ]
        )
    ]
    assert len(cands) == 1, f"{phrase!r} names {len(cands)} objects in {scene}"
    return cands[0]


def oracle(scene, q, prev=None):
    """(answer, object the question is about or None) recomputed from the scene."""
    objs = scene.objects
    if q in ("Where is it?", "And where is it?"):
        assert prev is not None, "a follow-up needs an object in the previous round"
        return cell(prev, scene.canvas), prev
    if q.startswith("How many"):
        ws = words_of(q)
        colour = next((w for w in ws if w in COLOURS), None)
        shape = next((PLURAL[w] for w in ws if w in PLURAL), None)
        if colour:
            return str(sum(o.colour == colour for o in objs)), None
        if shape:
            return str(sum(o.shape == shape for o in objs)), None
        return str(len(objs)), None
    m = re.match(r"(Is there a|Can you see a) (\w+) (\w+)", q)
    if m:
        return ("yes" if any((o.colour, o.shape) == (m[2], m[3]) for o in objs) else "no"), None
    m = re.match(r"Is (the .+) (\w+)\?$", q)
    if m:
        obj = resolve(scene, m[1])
        return ("yes" if obj.colour == m[2] else "no"), obj
    m = re.match(r"What is (.+)\?$", q)
    if m and m[1] in PHRASE_TO_POS:
        here = [o for o in objs if cell(o, scene.canvas) == PHRASE_TO_POS[m[1]]]
        return (f"a {here[0].size} {here[0].colour} {here[0].shape}" if here else "nothing"), None
    m = re.search(r"(the [^?]+?)( have| located| say)?\?$", q)
    assert m, q
    obj = resolve(scene, m[1])
    if "colo" in q:
        return obj.colour, obj
    if "shape" in q:
        return obj.shape, obj
    if "word" in q or "label" in q:
        return obj.word, obj
    if q.startswith("Where") or q.startswith("In which part"):
        return cell(obj, scene.canvas), obj
    raise AssertionError(f"oracle cannot parse {q!r}")


def check_caption(scene, text):
    for o in scene.objects:
        phrase = f"a {o.size} {o.colour} {o.shape} " + next(k for k, v in PHRASE_TO_POS.items() if v == cell(o, scene.canvas))
        assert phrase in text, (phrase, text)
        if o.word:
            assert f'"{o.word}"' in text


def check_rounds(scene, rounds):
    prev = None
    for q, a in rounds:
        if q.endswith(("briefly.", "this image?", "in the image.", "the picture.")):
            check_caption(scene, a)
            prev = None
            continue
        want, about = oracle(scene, q, prev)
        assert a == want, (q, a, want, scene)
        prev = about


def parse_report(text):
    """Statements as a sorted list of (size, colour, shape, position)."""
    out = []
    for sentence in [s for s in text.split(".") if s.strip()]:
        ws = words_of(sentence)
        size = next(w for w in ws if w in ("small", "large"))
        colour = next(w for w in ws if w in COLOURS)
        shape = next(w for w in ws if w in SHAPES)
        pos = next(p for ph, p in PHRASE_TO_POS.items() if ph in sentence.lower())
        out.append((size, colour, shape, pos))
    return sorted(out)


def report_label(scene, text):
    said = collections.Counter(parse_report(text))
    true = collections.Counter((o.size, o.colour, o.shape, cell(o, scene.canvas)) for o in scene.objects)
    if said == true:
        return "none"
    extra, missing = said - true, true - said
    if sum(extra.values()) == 1 and not missing:
        return "insert"
    if sum(missing.values()) == 1 and not extra:
        return "remove"
    (e,), (m,) = list(extra), list(missing)
    assert sum(extra.values()) == sum(missing.values()) == 1
    assert e[0] == m[0] and e[3] == m[3] and ((e[1] != m[1]) + (e[2] != m[2])) == 1
    return "substitute"


# ------------------------------------------------------------------------------------------ scenes


def test_scene_is_deterministic_and_validates_arguments():
    assert sample_scene(5) == sample_scene(5) == sample_scene(np.random.default_rng(5))
    assert sample_scene(5) != sample_scene(6)
    for bad in (dict(n_objects=0), dict(n_objects=(2, 10)), dict(canvas=32), dict(split="test")):
        with pytest.raises(InputError):
            sample_scene(0, **bad)
    with pytest.raises(InputError):
        sample_scene(-1)


@pytest.mark.parametrize(
    "kw", [dict(), dict(words=True), dict(n_objects=(4, 5)), dict(canvas=1344, small=True, n_objects=(5, 9))]
)
def test_objects_do_not_overlap_and_sit_clearly_in_their_cell(kw):
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = sample_scene(rng, **kw)
        boxes = [o.box(s.font_px) for o in s.objects]
        for b in boxes:
            assert 0 <= b[0] and 0 <= b[1] and b[2] <= s.canvas and b[3] <= s.canvas
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)
        cells = [cell(o, s.canvas) for o in s.objects]
        assert len(set(cells)) == len(cells)
        cw = s.canvas / 3
        for o in s.objects:  # centre >= 10 % of a cell from the cell borders
            for v in (o.x, o.y):
                assert min(v % cw, cw - v % cw) >= 0.1 * cw
        if kw.get("small"):
            assert all(o.r <= 32 for o in s.objects)  # 224-px object sizes on a 1344-px canvas
        else:
            assert all(2 * o.r >= 28 * s.canvas / 224 for o in s.objects)


def test_object_count_is_uniform():
    rng = np.random.default_rng(1)
    counts = collections.Counter(len(sample_scene(rng, n_objects=(1, 4)).objects) for _ in range(2000))
    assert set(counts) == {1, 2, 3, 4}
    assert all(abs(c / 2000 - 0.25) < 0.04 for c in counts.values())


# ------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("canvas,small,size", [(224, False, None), (224, False, 448), (1344, True, None)])
def test_render_sizes_and_exact_colours(canvas, small, size):
    s = sample_scene(3, canvas=canvas, small=small, n_objects=(4, 4))
    img = render(s, size)
    side = size or canvas
    assert img.size == (side, side) and img.mode == "RGB"
    px = np.asarray(img)
    k = side / canvas
    for o in s.objects:
        assert tuple(px[round(o.y * k), round(o.x * k)]) == COLOUR_RGB[o.colour], o
    assert tuple(px[0, 0]) == BACKGROUND


def test_words_render_inside_their_label_box():
    s = sample_scene(11, words=True, n_objects=(3, 3))
    px = np.asarray(render(s)).astype(int)
    dark = np.argwhere(np.abs(px - np.array(TEXT_RGB)).sum(-1) < 60)  # (row, col) of text pixels
    assert len(dark) > 0
    for o in s.objects:
        left, top, right, bottom = o.label_box(s.font_px)
        inside = (dark[:, 1] >= left) & (dark[:, 1] <= right) & (dark[:, 0] >= top) & (dark[:, 0] <= bottom)
        assert inside.sum() > 20, o  # the word is drawn there ...
    boxes = [o.label_box(s.font_px) for o in s.objects]
    for r, c in dark:  # ... and nowhere else
        assert any(b[0] - 1 <= c <= b[2] + 1 and b[1] - 1 <= r <= b[3] + 1 for b in boxes), (r, c)


def test_every_word_fits_its_label_box():
    from llavakit.data.world.render import _font
    from llavakit.data.world.scene import _LABEL_H, _LABEL_W, FONT_PX

    font = _font(int(FONT_PX))
    for w in WORDS:
        l, t, r, b = font.getbbox(w, anchor="mm")
        assert r - l <= _LABEL_W * FONT_PX and -0.5 * FONT_PX + 0 <= t and b <= (_LABEL_H - 0.5) * FONT_PX, w


# ------------------------------------------------------------------------------------------ language


def test_captions_and_instructions_are_correct_by_construction():
    rng = np.random.default_rng(2)
    for i in range(300):
        s = sample_scene(rng, words=i % 3 == 0)
        check_caption(s, caption(s, rng))
        check_rounds(s, instructions(s, rng, rounds=4))
    with pytest.raises(InputError):
        instructions(s, rng, rounds=0)


def test_multi_round_never_asks_what_earlier_rounds_settled():
    rng = np.random.default_rng(3)
    all_pairs = [(c, sh) for c in COLOURS for sh in SHAPES]
    n_exists = 0
    for i in range(600):
        s = sample_scene(rng, n_objects=(1, 2) if i % 2 else (1, 4))
        rounds = instructions(s, rng, rounds=4)
        qs = [q for q, _ in rounds]
        assert len(set(qs)) == len(qs)
        said: set = set()  # (colour, shape) pairs whose presence the conversation so far settles
        total_said = False
        for q, a in rounds:
            ws = words_of(q + " " + a)
            m = re.match(r"(Is there a|Can you see a) (\w+) (\w+)", q)
            if m:
                n_exists += 1
                assert (m[2], m[3]) not in said, (rounds, s)
                known = {(o.colour, o.shape) for o in s.objects if (o.colour, o.shape) in said}
                assert not (total_said and len(known) == len(s.objects)), (rounds, s)
            elif re.match(r"(What colou?r|What is the colou?r|Which colour|What shape|Which shape|What kind|Is the)", q):
                obj = oracle(s, q)[1]
                assert (obj.colour, obj.shape) not in said, (rounds, s)
            said |= {(c, sh) for c in COLOURS if c in ws for sh in SHAPES if sh in ws}
            ref = re.search(r"the (\w+)( object)?( have| located)?\?$", q)  # "the circle?" / "the red object?"
            if ref and (ref[1] in SHAPES or (ref[1] in COLOURS and ref[2])):
                said |= {p for p in all_pairs if ref[1] in p}
            ref = re.match(r"Is the (\w+) \w+\?$", q)
            if ref:
                said |= {p for p in all_pairs if ref[1] in p}
            if q.startswith("How many") and a == "0":
                said |= {p for p in all_pairs if any(w in p or PLURAL.get(w) in p for w in words_of(q))}
            total_said |= bool(re.match(r"How many (shapes|objects) ", q))
    assert n_exists > 100


def test_yes_no_is_balanced_and_wording_predicts_nothing():
    rng = np.random.default_rng(4)
    answers, by_colour, by_template = [], collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(2000):
        s = sample_scene(rng)
        q, a = exists_question(s, rng)
        answers.append(a == "yes")
        by_colour[words_of(q)[-2 if q.endswith("image?") else -1]].append(a == "yes")
        by_template[q.split(" a ")[0]].append(a == "yes")
    assert abs(np.mean(answers) - 0.5) < 0.03
    for key, vals in list(by_template.items()) + [(k, v) for k, v in by_colour.items()]:
        assert abs(np.mean(vals) - 0.5) < 0.1, key
    checks = [attribute_check(s, s.objects[0], rng) for s in (sample_scene(rng) for _ in range(1000))]
    checks = [a == "yes" for q, a in filter(None, checks)]
    assert abs(np.mean(checks) - 0.5) < 0.05
    # all yes/no rounds of the instruction stage
    rounds = [a for s in (sample_scene(rng) for _ in range(1500)) for _, a in instructions(s, rng, 4)]
    yn = [a == "yes" for a in rounds if a in ("yes", "no")]
    assert len(yn) > 500 and abs(np.mean(yn) - 0.5) < 0.05


# ------------------------------------------------------------------------------------------ reports


def test_reports_are_correct_and_errors_as_labelled():
    rng = np.random.default_rng(5)
    for _ in range(200):
        s = sample_scene(rng, n_objects=(2, 5))
        for corrupt in (None, "insert", "remove", "substitute"):
            text, label = report(s, rng, corrupt)
            assert label == (corrupt or "none") == report_label(s, text)
    with pytest.raises(InputError):
        report(sample_scene(0, n_objects=1), rng, "remove")
    with pytest.raises(InputError):
        report(s, rng, "swap")


def test_report_length_does_not_predict_simple_label():
    items = eval_items("world-report-simple", 1200, seed=0)
    k = {"no": collections.Counter(), "yes": collections.Counter()}
    n = {"no": collections.Counter(), "yes": collections.Counter()}
    for it in items:
        k[it.answer][len(parse_report(it.question.split("Report: ")[1]))] += 1
        n[it.answer][len(it.scene.objects)] += 1
    for hist in (k, n):
        for v in range(1, 6):
            assert abs(hist["no"][v] / 600 - hist["yes"][v] / 600) < 0.06, (hist, v)


# ------------------------------------------------------------------------------------------ eval items


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_eval_items_correct_balanced_and_closed(task):
    n = 240
    items = eval_items(task, n, seed=1)
    assert len({it.id for it in items}) == n
    counts = collections.Counter(it.answer for it in items)
    for it in items:
        assert it.answer == it.answer.lower() and it.answer in it.choices == CHOICES[task]
        assert all(a in it.choices for _, a in it.rounds)
        assert (it.question, it.answer) == it.rounds[-1]
        assert scene_split(it.scene) == "eval"
        if task.startswith("world-report"):
            label = report_label(it.scene, it.question.split("Report: ")[1])
            assert label == it.detail
            assert it.answer == (label if task.endswith("complex") else ("no" if label == "none" else "yes"))
        else:
            check_rounds(it.scene, it.rounds)
    if task == "world-multiround":
        assert all(2 <= len(it.rounds) <= 4 for it in items)
        assert any(q == "Where is it?" or q == "And where is it?" for it in items for q, _ in it.rounds)
    else:  # balanced by construction: full blocks hold every choice once, so counts differ by <= 1
        assert set(counts) == set(CHOICES[task]) and max(counts.values()) - min(counts.values()) <= 1, counts


def test_eval_items_deterministic_including_images():
    a, b = eval_items("world-read", 6, seed=3), eval_items("world-read", 6, seed=3)
    assert a == b
    assert [x.image().tobytes() for x in a] == [x.image().tobytes() for x in b]
    assert eval_items("world-read", 3, seed=3) == a[:3]  # item i does not depend on n
    assert eval_items("world-read", 6, seed=4) != a


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(InputError) as e:
        eval_items("world-colours", 3, 0)
    assert all(t in str(e.value) for t in EVAL_TASKS)


def test_train_and_eval_never_share_a_scene():
    assert TRAIN_SEED_BASE != EVAL_SEED_BASE
    train = {r.scene for kind in ("caption", "instruction", "report") for r in train_records(400, 0, kind)}
    assert all(scene_split(s) == "train" for s in train)
    evals = {it.scene for t in EVAL_TASKS for it in eval_items(t, 100, seed=0)}
    assert not train & evals


# ------------------------------------------------------------------------------------------ training data


def test_train_samples_format_and_determinism():
    a = list(train_samples(30, seed=7, kind="mixed"))
    b = list(train_samples(30, seed=7, kind="mixed"))
    assert [x["conversations"] for x in a] == [x["conversations"] for x in b]
    assert [x["image"].tobytes() for x in a] == [x["image"].tobytes() for x in b]
    for x in a:
        conv = x["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1
    recs = list(train_records(1200, seed=0, kind="report"))
    simple = [r.turns[0][1] for r in recs if r.turns[0][1] in ("yes", "no")]
    assert abs(np.mean([a == "yes" for a in simple]) - 0.5) < 0.05
    for r in recs[:200]:
        label = report_label(r.scene, r.turns[0][0].split("Report: ")[1])
        assert r.turns[0][1] in (label, "no" if label == "none" else "yes")
    with pytest.raises(InputError):
        list(train_samples(2, 0, kind="vqa"))


def test_write_dataset(tmp_path):
    path = write_dataset(tmp_path / "ds", 12, seed=0, kind="instruction")
    data = json.loads(path.read_text())
    assert len(data) == 12
    for entry in data:
        img = path.parent / entry["image"]
        assert img.is_file() and img.stat().st_size > 0
        assert entry["conversations"][0]["value"].startswith("<image>\n")
    assert not [p for p in path.parent.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ video


def test_clips_move_or_appear_and_questions_are_right():
    events = collections.Counter()
    for seed in range(60):
        c = sample_clip(seed, frames=6)
        events[c.event] += 1
        frames = c.frames()
        assert len(frames) == 6 and frames[0].size == (224, 224)
        first, last = c.scene_at(0), c.scene_at(5)
        sub = c.tracks[c.subject].obj
        same = [(t.obj.colour, t.obj.shape) for t in c.tracks].count((sub.colour, sub.shape))
        assert same == 1
        qa = dict(clip_questions(c, seed))
        name = f"{sub.colour} {sub.shape}"
        if c.event == "move":
            (o0,) = [o for o in first.objects if (o.colour, o.shape) == (sub.colour, sub.shape)]
            (o1,) = [o for o in last.objects if (o.colour, o.shape) == (sub.colour, sub.shape)]
            dx, dy = o1.x - o0.x, o1.y - o0.y
            want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert qa[f"Which way did the {name} move?"] == want
            assert len(first.objects) == len(last.objects)
            for t in range(6):  # no overlap in any frame
                s = c.scene_at(t)
                bs = [o.box(s.font_px) for o in s.objects]
                assert all(
                    a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1] for i, a in enumerate(bs) for b in bs[:i]
                )
        else:
            assert len(last.objects) == len(first.objects) + 1
            assert qa[f"Where did the {name} appear?"] == cell(sub, c.canvas)
        assert str(len(last.objects)) == qa["How many shapes are there at the end of the video?"]
        moved = "yes" if c.event == "move" else "no"
        assert moved == next(a for q, a in qa.items() if "mov" in q and q.startswith(("Did", "Is any")))
    assert min(events.values()) > 15
    assert sample_clip(3).frames()[2].tobytes() == sample_clip(3).frames()[2].tobytes()
    with pytest.raises(InputError):
        sample_clip(0, frames=2)
