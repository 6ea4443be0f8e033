"""Supervised fine-tuning data: `SupervisedDataset`, `collate` and `MixedDataset`.

`SupervisedDataset` turns a `Sample` into model tensors with the model's own processor (its chat
template, tokenizer and image-token expansion — the processor owns the image-token count):

- `input_ids` (T,) — the whole conversation rendered by `processor.apply_chat_template(turns,
  add_generation_prompt=False)`, `<image>` tags expanded;
- `labels` (T,) — `-100` everywhere except the tokens of every assistant turn: the answer text plus
  whatever the template closes the turn with (`</s>` for vicuna_v1, `<|im_end|>\\n` for ChatML). All
  rounds of a multi-round sample are learned at once, as in LLaVA's `preprocess_v1` /
  LLaVA-NeXT's `preprocess_qwen` (which also keeps the `\\n` after `<|im_end|>`) and the "COCO is ALL
  you need" recipe;
- `pixel_values` (N, 3, H, W), or (N, P, 3, S, S) for anyres models, and `image_sizes` (N, 2) as
  (height, width) — only when the sample has images, which are loaded here (lazily), never before;
- `n_image_tokens` (int) and `id` (str).

How the assistant spans are found (ours, template-agnostic): for assistant turn k the prompt
`render(turns[:k], add_generation_prompt=True)` and the closed turn `render(turns[:k+1], False)` are
tokenised; the labels are the ids between the two lengths. Prefixes are tokenised with one token per
image (no image is preprocessed twice) and their lengths mapped onto the processor's ids for the whole
conversation, so the image-token counts come from the processor alone. This only works if rendering and
tokenisation are *prefix-stable* (each prefix's ids are a prefix of the full ids); that is checked for
every turn, and a template or tokenizer that breaks it raises `InputError` naming the sample, the turn
and the first differing token, instead of silently mislabelling. One instability is repaired: a prefix
ending in whitespace that a BPE tokenizer merges into the next token (llava_hf's "answer " + "USER:"
-> "ĠUSER") is measured without that whitespace, so the boundary falls just before it.

Truncation (our choice): sequences longer than `max_length` are cut at the right; if the cut would
remove any image token, or leave no labelled token, `__getitem__` raises `InputError` naming the sample.
A map-style dataset cannot drop an index without changing its length, and a silently half-trained
sample hides data problems; filter such samples beforehand with `encode` (or raise `max_length`).

`MixedDataset` mixes several datasets by weight with a seeded, exact allocation (see its docstring).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .conversation import Sample
from .templates import IMAGE_TAG

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
LOSS_ON = ("assistant", "last")


class TurnLabeler:
    """Labels a tokenised conversation: the tokens of its assistant turns, -100 elsewhere."""

    def __init__(self, processor: Any, loss_on: str = "assistant") -> None:
        if loss_on not in LOSS_ON:
            raise InputError(f"loss_on={loss_on!r} is not supported; valid: {', '.join(LOSS_ON)}")
        self.processor = processor
        self.loss_on = loss_on

    def label_tokens(self, turns: Sequence[tuple[str, str]], ids: list[int], n_media: int, who: str) -> list[int]:
        """Labels for `ids` (the full conversation's tokens): every assistant turn's tokens, -100 elsewhere."""
        proc = self.processor
        messages = [{"role": r, "content": t} for r, t in turns]
        full_text = proc.apply_chat_template(messages, add_generation_prompt=False)
        # Prefixes are tokenised with one token per image ("compact" ids, no image preprocessing) and
        # their lengths mapped onto the processor's ids, so the processor alone decides image-token counts.
        compact = _tokenize(proc, full_text, [1] * n_media)
        to_full = _position_map(compact, ids, proc.image_token_id if n_media else None, who)
        labels = [IGNORE_INDEX] * len(ids)
        targets = [k for k, (r, _) in enumerate(turns) if r == "assistant"]
        if self.loss_on == "last":
            targets = targets[-1:]
        for k in targets:
            start = to_full[self._prefix_len(messages[:k], True, full_text, compact, who, k)]
            end = to_full[self._prefix_len(messages[: k + 1], False, full_text, compact, who, k)]
            if end <= start:
                raise InputError(f"{who}: assistant turn {k} adds no tokens under this chat template")
            labels[start:end] = ids[start:end]
        return labels

    def _prefix_len(self, messages: list[dict[str, str]], gen_prompt: bool, full_text: str, compact: list[int],
                    who: str, turn: int) -> int:
        """Compact token length of a rendered prefix, checked to be a prefix of the whole conversation."""
        proc = self.processor
        text = proc.apply_chat_template(messages, add_generation_prompt=gen_prompt) if messages else ""
        if not full_text.startswith(text):
            raise InputError(f"{who}: the chat template is not prefix-stable: turn {turn} rendered "
                             f"{'with' if gen_prompt else 'without'} the generation prompt is not a prefix of "
                             f"the whole conversation (...{text[-40:]!r}); assistant tokens cannot be located")
        if not text:
            return 0
        ones = [1] * text.count(IMAGE_TAG)
        prefix = _tokenize(proc, text, ones)
        if compact[: len(prefix)] != prefix and text.rstrip() != text:
            # BPE merges trailing whitespace into the next token (" USER" after "answer "): cut before it
            stripped = _tokenize(proc, text.rstrip(), ones)
            if compact[: len(stripped)] == stripped:
                return len(stripped)
        if compact[: len(prefix)] != prefix:
            j = next((i for i, (a, b) in enumerate(zip(prefix, compact)) if a != b), len(compact))
            got = proc.tokenizer.convert_ids_to_tokens(prefix[j:j + 3])
            want = proc.tokenizer.convert_ids_to_tokens(compact[j:j + 3])
            raise InputError(f"{who}: tokenisation is not prefix-stable at turn {turn}: token {j} is "
                             f"{got} in the prefix but {want} in the whole conversation; assistant tokens "
                             "cannot be located")
        return len(prefix)




class SupervisedDataset(Dataset):
    """Samples -> model tensors with loss on assistant tokens only.

    Args:
        samples: the conversations (see `llavakit.data.conversation`).
        processor: the model's `Processor` (`vlm.processor`); it must have a tokenizer.
        max_length: the longest sequence kept (tokens, image tokens included).
        loss_on: "assistant" (every assistant turn, default) or "last" (only the final assistant turn).
    """

    def __init__(self, samples: Sequence[Sample], processor: Any, *, max_length: int = 2048,
                 loss_on: str = "assistant") -> None:
        if not len(samples):
            raise InputError("SupervisedDataset: empty dataset (no samples)")
        bad = next((s for s in samples if not isinstance(s, Sample)), None)
        if bad is not None:
            raise InputError(f"SupervisedDataset takes Sample objects, got {type(bad).__name__}")
        self.labeler = TurnLabeler(processor, loss_on)
        if not isinstance(max_length, int) or max_length <= 0:
            raise InputError(f"max_length must be a positive int, got {max_length!r}")
        self.samples = samples
        self.processor = processor
        self.max_length = max_length
        self.loss_on = loss_on

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encode(self.samples[i])

    # ------------------------------------------------------------------ encoding
    def encode(self, sample: Sample) -> dict[str, Any]:
        """Tensors for one sample (see the module docstring); raises InputError naming the sample."""
        who = f"sample {sample.id!r}"
        if sample.videos:
            raise InputError(f"{who}: video samples are not supported by SupervisedDataset yet")
        proc = self.processor
        messages = [{"role": r, "content": t} for r, t in sample.turns]
        full_text = proc.apply_chat_template(messages, add_generation_prompt=False)
        try:
            pil = proc.load_images(sample.images)
            enc = proc(text=full_text, images=pil or None)
        except InputError as e:
            raise InputError(f"{who}: {e}") from None
        ids = enc["input_ids"][0].tolist()  # (T,)
        labels = self.labeler.label_tokens(sample.turns, ids, len(pil), who)

        n_image = sum(t == proc.image_token_id for t in ids) if pil else 0
        if len(ids) > self.max_length:
            cut = ids[self.max_length:]
            if pil and proc.image_token_id in cut:
                raise InputError(f"{who}: {len(ids)} tokens > max_length={self.max_length}, and truncation "
                                 f"would cut image tokens; raise max_length or drop the sample")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(x == IGNORE_INDEX for x in labels):
                raise InputError(f"{who}: {len(enc['input_ids'][0])} tokens > max_length={self.max_length}, "
                                 "and truncation leaves no assistant token to learn; raise max_length or "
                                 "drop the sample")
        item: dict[str, Any] = {
            "id": sample.id,
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (T,)
            "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
            "n_image_tokens": n_image,
        }
        if pil:
            item["pixel_values"] = enc["pixel_values"]  # (N, 3, H, W) or anyres (N, P, 3, S, S)
            item["image_sizes"] = torch.tensor([(im.height, im.width) for im in pil], dtype=torch.long)  # (N, 2)
        return item

def _tokenize(processor: Any, text: str, counts: list[int]) -> list[int]:
    """Ids of `text` with its `<image>` tags expanded to `counts` tokens (the processor's own expansion,
    without preprocessing any image)."""
    return processor.tokenize([text], counts)[0]


def _position_map(compact: list[int], full: list[int], image_id: int | None, who: str) -> list[int]:
    """`m[j]` = the position in `full` of compact position j (len(compact) + 1 entries).

    `compact` has one image token per image, `full` the processor's expansion; a run of image tokens in
    one matches a run in the other, every other token must be equal.
    """
    m = [0] * (len(compact) + 1)
    i = j = 0
    while j < len(compact):
        if image_id is not None and compact[j] == image_id:
            j2, i2 = j, i
            while j2 < len(compact) and compact[j2] == image_id:
                j2 += 1
            while i2 < len(full) and full[i2] == image_id:
                i2 += 1
            if i2 == i:
                break
            m[j:j2] = [i] * (j2 - j)
            i, j = i2, j2
        else:
            if i >= len(full) or full[i] != compact[j]:
                break
            m[j] = i
            i, j = i + 1, j + 1
    if j != len(compact) or i != len(full):
        raise InputError(f"{who}: the processor's ids disagree with the conversation's tokens at token {j} "
                         "(outside image tokens); cannot locate assistant turns")
    m[len(compact)] = len(full)
    return m


# ---------------------------------------------------------------------------------------------- collate
def collate(batch: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, Tensor]:
    """Pad a list of `SupervisedDataset` items into one batch.

    Returns input_ids (B, T) padded with `pad_id`, labels (B, T) padded with -100, attention_mask (B, T),
    n_image_tokens (B,), and, if any item has images, pixel_values (sum N, 3, H, W) concatenated in
    batch order — anyres (sum N, Pmax, 3, S, S) with the view axis zero-padded to the batch's largest —
    and image_sizes (sum N, 2). Non-tensor fields (the sample ids) are dropped.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise InputError("collate: empty batch")
    b, t = len(batch), max(int(x["input_ids"].shape[0]) for x in batch)
    input_ids = torch.full((b, t), int(pad_id), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, x in enumerate(batch):
        n = int(x["input_ids"].shape[0])
        sl = slice(0, n) if padding_side == "right" else slice(t - n, t)
        input_ids[i, sl] = x["input_ids"]
        labels[i, sl] = x["labels"]
        mask[i, sl] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
           "n_image_tokens": torch.tensor([int(x["n_image_tokens"]) for x in batch], dtype=torch.long)}
    pvs = [x["pixel_values"] for x in batch if "pixel_values" in x]
    if pvs:
        dims = {p.dim() for p in pvs}
        if len(dims) != 1:
            raise InputError("collate: items mix plain (N, 3, H, W) and anyres (N, P, 3, S, S) pixel_values")
        if dims == {5}:
            p_max = max(p.shape[1] for p in pvs)
            pvs = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, p_max - p.shape[1])) for p in pvs]
        out["pixel_values"] = torch.cat(pvs, dim=0)
        out["image_sizes"] = torch.cat([x["image_sizes"] for x in batch if "pixel_values" in x], dim=0)
    return out


# ---------------------------------------------------------------------------------------------- mixing
class MixedDataset(Dataset):
    """A fixed-length mixture of datasets drawn by weight, deterministic in `seed`.

    Allocation (ours): source s gets exactly `round(length * w_s / sum(w))` positions (largest-remainder
    rounding, so the counts sum to `length` and each is within 1 of its exact share); the positions are
    a seeded permutation. Within a source, items are taken in a seeded random order *without
    replacement*, reshuffled each time the source is exhausted (so a small source repeats only after
    every item was used once). Use `seed=base + epoch` for a new mixture every epoch.
    """

    def __init__(self, sources: Sequence[tuple[Dataset, float]], length: int, seed: int = 0) -> None:
        if not sources:
            raise InputError("MixedDataset needs at least one (dataset, weight) source")
        if not isinstance(length, int) or length <= 0:
            raise InputError(f"length must be a positive int, got {length!r}")
        weights = [float(w) for _, w in sources]
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise InputError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        sizes = [len(d) for d, _ in sources]  # type: ignore[arg-type]
        empty = [i for i, (n, w) in enumerate(zip(sizes, weights)) if n == 0 and w > 0]
        if empty:
            raise InputError(f"MixedDataset: source(s) {empty} are empty but have a positive weight")
        self.sources = [d for d, _ in sources]
        self.weights = tuple(weights)
        self.length = length
        self.seed = seed
        self.counts = _largest_remainder(weights, length)  # positions per source, sums to length

        rng = np.random.default_rng(seed)
        which = rng.permutation(np.repeat(np.arange(len(sources)), self.counts))  # (length,)
        item = np.empty(length, dtype=np.int64)
        for s, c in enumerate(self.counts):
            if c:
                reps = -(-c // sizes[s])
                order = np.concatenate([rng.permutation(sizes[s]) for _ in range(reps)])[:c]
                item[which == s] = order
        self._which, self._item = which, item

    def __len__(self) -> int:
        return self.length

    def locate(self, i: int) -> tuple[int, int]:
        """(source index, item index in that source) of mixture position i."""
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for MixedDataset of length {self.length}")
        return int(self._which[i]), int(self._item[i])

    def __getitem__(self, i: int) -> Any:
        s, k = self.locate(i)
        return self.sources[s][k]


def _largest_remainder(weights: Sequence[float], total: int) -> tuple[int, ...]:
    z = sum(weights)
    exact = [w / z * total for w in weights]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)
