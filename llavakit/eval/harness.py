"""`evaluate(vlm, tasks, ...)`: batched greedy evaluation with baselines, controls, costs and timings.

What one task's run does, and how each reported number is defined:

- Requests. A single-question item is one request (its prompt as a string; `VLM.chat_batch` puts the
  `<image>` tags before it). A multi-round item (`EvalItem.rounds`) is one request per round: round k is
  the chat messages [user: <image> + q0, assistant: a0, ..., user: qk] with the *gold* answers of earlier
  rounds in context (teacher forcing: a wrong early answer does not contaminate later rounds, and all
  rounds can be batched). Requests go to `vlm.chat_batch` in item order, `batch_size` at a time, greedy
  (temperature 0), `max_new_tokens` tokens at most: the run is deterministic.
- Scores. `task.score(prediction, item.round(k))` per request (normalised exact match, see scoring.py).
  An item scores the mean over its rounds; `accuracy` is the mean over items. `consistency` (multi-round
  tasks only) is the fraction of items with every round correct.
- Baselines, over the evaluated items: `majority` always answers the most frequent gold answer (ties:
  alphabetically first) and is scored like a prediction; `chance` is the mean of 1 / len(choices).
- Shuffled-image control (`shuffled_control=True`): the same requests run again, each item paired with
  another item's image(s) by a deterministic derangement (a seeded n-cycle, repaired so no item gets an
  image identical to its own, e.g. two easy-vqa questions about one picture). `accuracy_shuffled` near the
  majority baseline means the model reads the answer off the image; near `accuracy` means it guesses
  from the wording.
- Tokens and FLOPs. After generating a batch, the harness runs the model's processor on the same prompts
  and images (untimed): visual tokens = image-token placeholders in `input_ids`, text tokens = the rest
  of the attention mask. New tokens = tokens generated per row (EOS included), counted by the `on_token`
  callback. `flops` = `vlm.cost(prompt_tokens=text, new_tokens=new, image_sizes=...)`.total_flops summed
  over an item's requests (multiply-add = 2 FLOPs; llavakit.cost states the convention). image_sizes are
  what the processor produced: the preprocessed view (h, w) for fixed-resolution models, the original
  (h, w) for anyres ones — the meaning `VLM.cost` / `num_image_tokens` expect.
- Timings (wall clock, `time.perf_counter`, no extra forward passes): each batch's `chat_batch` call is
  timed, and the `on_token` callback stamps every generated token. `prefill_s` = time from the call to
  the first token of the batch (processor + vision tower + projector + LM prefill + first sampling: the
  time to first token of a batch of `batch_size`), averaged over batches. `decode_s_per_token` =
  (last token stamp - first token stamp) / (decode steps), summed over batches before dividing; a decode
  step produces one token for every unfinished row. `questions_per_s` = requests / total `chat_batch`
  time. Before the first task, one untimed batch of its requests (2 new tokens) warms the model up
  (`warmup=False` skips it). A VLM whose chat_batch never calls `on_token` gets
  None for both timings and new tokens counted by re-tokenising its answers.
- `compression`: passed to `chat_batch(compression=...)` (and to `cost`) when they take such a keyword;
  a model whose chat_batch takes no such keyword (not a llavakit VLM) is refused with an InputError.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from . import EvalItem, Task

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 10
IMAGE_TAG = "<image>"


# ----------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class TaskResult:
    """One task's row (every field lands in results.json; see the module docstring for definitions)."""

    task: str
    description: str
    n: int  # items
    n_questions: int  # requests (rounds)
    accuracy: float
    accuracy_shuffled: float | None
    consistency: float | None  # multi-round tasks only
    consistency_shuffled: float | None
    baselines: Mapping[str, Any]  # {"majority": {"answer", "accuracy"}, "chance": float | None}
    per_answer: Mapping[str, Mapping[str, Any]]  # gold answer -> {"n", "accuracy", "accuracy_shuffled"}
    per_kind: Mapping[str, Mapping[str, Any]]  # item kind -> same (empty when the task has no kinds)
    visual_tokens: float  # mean per item (per request of the item, averaged)
    text_tokens: float  # mean per request
    new_tokens: float  # mean per request
    flops: float  # mean analytic FLOPs per item (all its requests)
    flops_total: int
    prefill_s: float | None  # mean time to first token per batch
    decode_s_per_token: float | None  # mean time per decode step of a batch
    questions_per_s: float | None
    wall_s: float  # total chat_batch time, real images
    batch_size: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class EvalResults:
    """All rows of one `evaluate` call plus per-request predictions (written to predictions.jsonl)."""

    model: str
    created: str
    settings: Mapping[str, Any]
    rows: tuple[TaskResult, ...]
    predictions: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """results.json content (predictions excluded)."""
        return {
            "model": self.model,
            "created": self.created,
            "settings": dict(self.settings),
            "conventions": {
                "accuracy": "mean over items of the fraction of rounds scored correct (normalised exact match)",
                "flops": "analytic, multiply-add = 2 FLOPs (llavakit.cost), mean per item",
                "prefill_s": "time to first token of a batch (preprocess + vision + prefill), mean over batches",
                "decode_s_per_token": "(last - first token time) / decode steps, per batch step",
                "questions_per_s": "requests / total chat_batch wall time",
            },
            "rows": [r.to_dict() for r in self.rows],
        }


# ----------------------------------------------------------------------------------------- entry

def evaluate(vlm: Any, tasks: Sequence[str | Task], *, limit: int | None = None, seed: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             shuffled_control: bool = False, compression: str | None = None,
             progress: bool = True, warmup: bool = True) -> EvalResults:
    """Evaluate `vlm` on `tasks` (registered names or Task objects); see the module docstring."""
    _check_int("batch_size", batch_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("seed", seed, 0)
    if limit is not None:
        _check_int("limit", limit, 1)
    resolved = resolve_tasks(tasks)
    gen, cost_kw = _generation_kwargs(vlm, max_new_tokens, compression)
    rows: list[TaskResult] = []
    predictions: list[Mapping[str, Any]] = []
    for i, task in enumerate(resolved):
        row, preds = _evaluate_task(vlm, task, limit=limit, seed=seed, batch_size=batch_size, gen=gen,
                                    cost_kw=cost_kw, shuffled_control=shuffled_control, progress=progress,
                                    warmup=warmup and i == 0)
        rows.append(row)
        predictions.extend(preds)
    settings = {"tasks": [t.name for t in resolved], "limit": limit, "seed": seed, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "greedy": True, "shuffled_control": shuffled_control,
                "compression": compression, "warmup": warmup, **_runtime(vlm)}
    return EvalResults(model=str(getattr(vlm, "source", "") or "model"),
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       settings=settings, rows=tuple(rows), predictions=tuple(predictions))


def resolve_tasks(tasks: Sequence[str | Task]) -> list[Task]:
    """Task objects for registered names (InputError listing the valid names) or Task instances."""
    from .tasks import TASKS

    if isinstance(tasks, str) or not tasks:
        raise InputError(f"give a list of task names; valid names: {', '.join(TASKS.names())}")
    out = []
    for t in tasks:
        if isinstance(t, str):
            out.append(TASKS.get(t)())
        elif isinstance(t, Task):
            out.append(t)
        else:
            raise InputError(f"a task must be a registered name or a Task, got {type(t).__name__}")
    return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """True when `fn` declares a parameter `name` explicitly (a bare **kwargs does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _generation_kwargs(vlm: Any, max_new_tokens: int, compression: str | None) -> tuple[dict, dict]:
    gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    cost_kw: dict[str, Any] = {}
    if compression is not None:
        if not _accepts(vlm.chat_batch, "compression"):
            raise InputError(f"compression {compression!r} cannot be applied: this model's chat_batch takes no "
                             f"`compression` option (it is not a llavakit VLM)")
        gen["compression"] = compression
        if _accepts(vlm.cost, "compression"):
            cost_kw["compression"] = compression
    return gen, cost_kw


def _runtime(vlm: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for name in ("device", "dtype"):
        try:
            info[name] = str(getattr(vlm, name))
        except Exception:  # a stub or a model without parameters
            info[name] = None
    return info


# ----------------------------------------------------------------------------------------- one task

@dataclass(frozen=True)
class _Request:
    item: int  # index into the task's items
    round: int
    prompt: Any  # str, or chat messages for a multi-round item
    unit: EvalItem  # what the answer is scored against


def build_requests(items: Sequence[EvalItem]) -> list[_Request]:
    """One request per question; round k of a multi-round item carries rounds 0..k-1 with gold answers."""
    out = []
    for i, it in enumerate(items):
        if not it.rounds:
            out.append(_Request(i, 0, it.prompt, it))
            continue
        tags = (IMAGE_TAG + "\n") * len(it.images)
        history: list[dict[str, str]] = []
        for k, (q, a) in enumerate(it.rounds):
            msgs = history + [{"role": "user", "content": (tags if k == 0 else "") + q}]
            out.append(_Request(i, k, tuple(msgs), it.round(k)))
            history = msgs + [{"role": "assistant", "content": a}]
    return out


def derangement(items: Sequence[EvalItem], seed: int) -> list[int] | None:
    """src[i] = the item whose images item i gets: never i, never an identical image; None if impossible."""
    n = len(items)
    if n < 2:
        return None
    keys = [image_key(it.images) for it in items]
    order = np.random.default_rng([seed, 0x5EED]).permutation(n).tolist()
    src = [0] * n
    for k in range(n):  # one n-cycle over a seeded order: no fixed point
        src[order[k]] = order[(k + 1) % n]
    for i in range(n):
        if keys[src[i]] != keys[i]:
            continue
        for j in range(n):
            if keys[src[j]] != keys[i] and keys[src[i]] != keys[j]:
                src[i], src[j] = src[j], src[i]
                break
        else:
            return None
    return src


def image_key(images: Sequence[Any]) -> str:
    """Identity of an item's images: resolved paths, or a digest of the pixels."""
    parts = []
    for im in images:
        if isinstance(im, (str, Path)):
            parts.append("path:" + str(Path(im).resolve()))
        elif hasattr(im, "tobytes"):
            h = hashlib.sha1(f"{getattr(im, 'mode', '')}{getattr(im, 'size', '')}".encode())
            h.update(im.tobytes())
            parts.append("pixels:" + h.hexdigest())
        else:
            parts.append("object:" + repr(im))
    return "|".join(parts)


@dataclass
class _Pass:
    predictions: list[str]
    new_tokens: list[int]
    ttft: list[float]  # per batch, when on_token was called
    decode_time: float
    decode_steps: int
    wall: float


def _run_pass(vlm: Any, requests: Sequence[_Request], images: Sequence[Sequence[Any]], batch_size: int,
              gen: Mapping[str, Any], bar: Any, stats: list | None) -> _Pass:
    """Generate for every request (images[r] for request r) in batches; optionally count tokens/sizes."""
    out = _Pass([], [], [], 0.0, 0, 0.0)
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        prompts = [r.prompt for r in batch]
        imgs = [list(images[start + j]) for j in range(len(batch))]
        counts = [0] * len(batch)
        stamps: list[float] = []

        def on_token(row: int, _tok: int) -> None:
            counts[row] += 1
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        preds = vlm.chat_batch(prompts, imgs, on_token=on_token, **gen)
        t1 = time.perf_counter()
        if len(preds) != len(batch):
            raise RuntimeError(f"chat_batch returned {len(preds)} answers for {len(batch)} prompts")
        out.wall += t1 - t0
        if stamps:
            out.ttft.append(stamps[0] - t0)
            steps = max(counts) - 1
            if steps > 0:
                out.decode_time += stamps[-1] - stamps[0]
                out.decode_steps += steps
        else:
            counts = [_count_text_tokens(vlm, p) for p in preds]
        out.predictions.extend(str(p) for p in preds)
        out.new_tokens.extend(counts)
        if stats is not None:
            stats.extend(_count_prompt(vlm, prompts, imgs, gen.get("compression")))
        bar.update(len(batch))
    return out


def _count_text_tokens(vlm: Any, text: str) -> int:
    if not text:
        return 1  # at least the EOS token was generated
    return len(vlm.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def _count_prompt(vlm: Any, prompts: Sequence[Any], imgs: Sequence[list[Any]],
                  compression: Any = None) -> list[tuple[int, int, list]]:
    """(text tokens, visual tokens, image sizes for cost) per prompt, from the model's own processor
    (with the run's compression, so visual tokens are those the LM receives)."""
    proc = vlm.processor
    texts = [vlm.build_prompt(p, im) for p, im in zip(prompts, imgs)]
    flat = [x for im in imgs for x in im]
    kw = {"compression": compression} if compression is not None else {}
    inputs = proc(text=texts, images=flat or None, **kw)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    tok = proc.image_token_id
    visual = ((ids == tok) & mask).sum(1).tolist() if tok is not None else [0] * len(texts)
    total = mask.sum(1).tolist()
    if "image_sizes" in inputs:  # anyres: original sizes
        sizes = [tuple(int(v) for v in s) for s in inputs["image_sizes"].tolist()]
    elif "pixel_values" in inputs:  # fixed resolution: the preprocessed view
        sizes = [tuple(int(v) for v in inputs["pixel_values"].shape[-2:])] * len(flat)
    else:
        sizes = []
    out, k = [], 0
    for r, im in enumerate(imgs):
        out.append((int(total[r] - visual[r]), int(visual[r]), sizes[k:k + len(im)]))
        k += len(im)
    return out


def _evaluate_task(vlm: Any, task: Task, *, limit: int | None, seed: int, batch_size: int, gen: Mapping[str, Any],
                   cost_kw: Mapping[str, Any], shuffled_control: bool, progress: bool,
                   warmup: bool) -> tuple[TaskResult, list[dict[str, Any]]]:
    from tqdm.auto import tqdm

    items = task.items(limit, seed)
    if not items:
        raise InputError(f"task {task.name!r} gave no items (limit={limit})")
    requests = build_requests(items)
    notes: list[str] = []
    src = derangement(items, seed) if shuffled_control else None
    if shuffled_control and src is None:
        notes.append("shuffled control skipped: fewer than 2 items or no way to give every item another image")
    total = len(requests) * (2 if src is not None else 1)
    stats: list[tuple[int, int, list]] = []
    if warmup:  # one untimed batch, so first-call costs (allocator, kernels, decoders) miss the timings
        first = requests[:batch_size]
        vlm.chat_batch([r.prompt for r in first], [list(items[r.item].images) for r in first],
                       **{**gen, "max_new_tokens": min(2, int(gen["max_new_tokens"]))})
    with tqdm(total=total, desc=task.name, unit="q", disable=not progress, file=sys.stderr) as bar:
        real = _run_pass(vlm, requests, [items[r.item].images for r in requests], batch_size, gen, bar, stats)
        shuf = None
        if src is not None:
            shuf = _run_pass(vlm, requests, [items[src[r.item]].images for r in requests], batch_size, gen, bar,
                             None)

    scores = [float(task.score(p, r.unit)) for p, r in zip(real.predictions, requests)]
    scores_shuf = [float(task.score(p, r.unit)) for p, r in zip(shuf.predictions, requests)] if shuf else None
    flops = [int(vlm.cost(prompt_tokens=t, new_tokens=n, image_sizes=s, **cost_kw).total_flops)
             for (t, _, s), n in zip(stats, real.new_tokens)]

    by_item = _group(requests, lambda r: r.item)
    item_scores = _item_means(by_item, scores)
    row = TaskResult(
        task=task.name, description=str(getattr(task, "description", "")), n=len(items), n_questions=len(requests),
        accuracy=_mean(item_scores),
        accuracy_shuffled=_mean(_item_means(by_item, scores_shuf)) if scores_shuf else None,
        consistency=_consistency(items, by_item, scores),
        consistency_shuffled=_consistency(items, by_item, scores_shuf) if scores_shuf else None,
        baselines=_baselines(task, requests, by_item),
        per_answer=_breakdown(requests, scores, scores_shuf, lambda r: r.unit.answer),
        per_kind=(_breakdown(requests, scores, scores_shuf, lambda r: r.unit.kind)
                  if any(r.unit.kind for r in requests) else {}),
        visual_tokens=_mean(_item_means(by_item, [v for _, v, _ in stats])),
        text_tokens=_mean([t for t, _, _ in stats]),
        new_tokens=_mean(real.new_tokens),
        flops=_mean([sum(flops[j] for j in idx) for idx in by_item.values()]),
        flops_total=int(sum(flops)),
        prefill_s=_mean(real.ttft) if real.ttft else None,
        decode_s_per_token=real.decode_time / real.decode_steps if real.decode_steps else None,
        questions_per_s=len(requests) / real.wall if real.wall > 0 else None,
        wall_s=real.wall, batch_size=batch_size, notes=tuple(notes),
    )
    preds = []
    for j, r in enumerate(requests):
        rec: dict[str, Any] = {"task": task.name, "id": items[r.item].id, "round": r.round, "prompt": r.unit.prompt,
                               "answer": r.unit.answer, "prediction": real.predictions[j], "score": scores[j],
                               "new_tokens": real.new_tokens[j], "visual_tokens": stats[j][1],
                               "text_tokens": stats[j][0], "flops": flops[j]}
        if shuf is not None and src is not None:
            rec.update(shuffled_image_of=items[src[r.item]].id, prediction_shuffled=shuf.predictions[j],
                       score_shuffled=scores_shuf[j] if scores_shuf else None)
        preds.append(rec)
    return row, preds


# ----------------------------------------------------------------------------------------- aggregation

def _group(requests: Sequence[_Request], key: Callable[[_Request], Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for j, r in enumerate(requests):
        groups[key(r)].append(j)
    return dict(groups)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else 0.0


def _item_means(by_item: Mapping[int, list[int]], values: Sequence[float] | None) -> list[float]:
    if values is None:
        return []
    return [_mean([values[j] for j in idx]) for idx in by_item.values()]


def _consistency(items: Sequence[EvalItem], by_item: Mapping[int, list[int]],
                 scores: Sequence[float] | None) -> float | None:
    if scores is None or not any(it.rounds for it in items):
        return None
    return _mean([float(all(scores[j] == 1.0 for j in idx)) for idx in by_item.values()])


def _baselines(task: Task, requests: Sequence[_Request], by_item: Mapping[int, list[int]]) -> dict[str, Any]:
    counts = Counter(r.unit.answer for r in requests)
    majority = min(counts, key=lambda a: (-counts[a], a))
    maj_scores = [float(task.score(majority, r.unit)) for r in requests]
    chance = None
    if all(r.unit.choices for r in requests):
        chance = _mean(_item_means(by_item, [1.0 / len(r.unit.choices) for r in requests]))
    return {"majority": {"answer": majority, "accuracy": _mean(_item_means(by_item, maj_scores))},
            "chance": chance}


def _breakdown(requests: Sequence[_Request], scores: Sequence[float], scores_shuf: Sequence[float] | None,
               key: Callable[[_Request], str]) -> dict[str, dict[str, Any]]:
    out = {}
    for k, idx in sorted(_group(requests, key).items()):
        out[k] = {"n": len(idx), "accuracy": _mean([scores[j] for j in idx]),
                  "accuracy_shuffled": _mean([scores_shuf[j] for j in idx]) if scores_shuf else None}
    return out
