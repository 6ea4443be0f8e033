"""Visual-token dropout for training: hide part of an image's tokens from every text token.

Why (ours, measured in docs/default-model-training.md): the stage-D default model answers colour and
shape questions from a few tokens that summarise the whole image, not from the asked object's own
patches. Keep only the object's patches (FasterVLM at keep 10 %) and easy-vqa colour answers fall from
97 to 73 %; with several objects it names the wrong object's colour half of the time. Hiding tokens
during training takes those summary tokens away in part of the steps, so the model must read what it
is asked about from the tokens that remain, and it also learns the inputs the pruning methods of
`llavakit.compression` give it at inference.

Which tokens stay: `random` (a uniform subset) or `cls` — the top tokens by the vision tower's [CLS]
attention, FasterVLM's score (llavakit/visual/fastervlm.py), which keeps the objects and hides the
background. Measured on stage D (benchmarks/token_ablation.py): hiding the 10 % of tokens with the
highest [CLS] attention (the object) leaves easy-vqa colour/shape answers at 97.1 %, as with every
token, so the background tokens of DINOv2 carry the object's colour and shape; a random subset still
contains many of them, while `cls` removes them and leaves the object's own patches to read.
Result so far (stage F, recipes/default-dropout.yaml, 200 steps): the model did not learn to read the
object's patches and lost yes/no and count accuracy; not shipped (docs/default-model-training.md).
From stage I3 with a 30 % drop share (recipes/default-fasterdrop.yaml, 2026-12-04) it answers better under
FasterVLM at every budget and stays within 1 point uncompressed on the world tasks (count on 1,000 items),
but loses 1.5 on easy-vqa; not shipped either (docs/compression/README.md). A 40 % share with more position
questions (recipes/default-fasterdrop2.yaml, 2026-12-05) lifts world-position under FasterVLM at keep 10 % from
46 to 72 % (the column is what the model had lost) and loses 2.8 on easy-vqa (yes/no); not shipped.
A data source may set its own chance (`DataSource.visual_token_drop`), so the chance is per sequence:
`prob` takes one value per row. With easy-vqa's sequences never hidden (recipes/default-fasterdrop3.yaml)
the easy-vqa loss is gone (97.8 % uncompressed, I3 97.5) and easy-vqa under FasterVLM gains 2-3 points on
I3; world count and position under FasterVLM keep less of the second run's gain; not shipped (one seed).

How: tokens are not removed, they are masked as keys (the attention mask of `packing.block_mask`), so
every kept token keeps its original position id — the `pos=original` convention of
`llavakit.compression` — and packing, batching and the feature cache are unchanged. A hidden token
still sees itself (no empty attention row); no label sits on an image token, so its own output is
never scored. Which images, how many tokens and which ones are drawn from a generator seeded by
(run seed, step, micro-step, rank), so a resumed run hides exactly what the uninterrupted run would.

Related work: Dynamic-LLaVA and ATP-LLaVA train *learned* token selectors with the model; here the
selection is fixed (random or [CLS] attention) and only the model adapts to it. The whole scheme — the
probability, the uniform keep-share draw, masking instead of removing — is ours.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and where in the run this micro-batch is."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank)
    return g


def cls_scores(model, processor, images) -> Tensor:
    """(B, T) head-mean [CLS] attention over the patches, in the vision layer whose output is the
    model's feature layer — the score FasterVLM prunes by. One extra vision-tower pass per image."""
    from ..compression.pipeline import _feature_layer_number

    cfg = model.config
    if not model.vision_tower.has_cls:
        raise ValueError(f"visual_token_select: cls needs a [CLS] token; {cfg.vision.family} has none")
    layer = _feature_layer_number(cfg.feature_layers[-1], cfg.vision.num_hidden_layers)
    pv = processor(text=["<image>"] * len(images), images=list(images))["pixel_values"]
    with torch.inference_mode():
        _, attn = model._select_with_attention(pv.to(model.multi_modal_projector.linear_1.weight.dtype),
                                               {layer: slice(0, 1)})
    a = attn[layer][:, :, 0].float().mean(1)  # (B, H, 1 + T) -> (B, 1 + T)
    return a[:, 1:].clone()  # (B, T): drop the [CLS] column


def drop_visual_tokens(mask: Tensor, image_mask: Tensor, prob: float | Sequence[float], keep: tuple[float, float],
                       generator: torch.Generator,
                       scores: Tensor | Callable[[list[int]], Tensor] | None = None) -> Tensor:
    """Hide visual tokens as attention keys.

    mask: bool (B, 1, T, T), True = query may attend to key (`block_mask`'s output; not modified).
    image_mask: bool (B, T), True at the image tokens of each packed sequence.
    prob: chance that a sequence's image is dropped from at all, one for all sequences or one per sequence
    (B values: a recipe can hide tokens in some data sources only); keep: (low, high) range of the share
    of its visual tokens that stay visible, drawn uniformly per sequence (at least one token stays).
    scores: optional (B, N) per-image-token score; the top-k tokens by it stay visible (ties toward
    the lower index), instead of a uniform random subset. It may also be a function of the dropped
    sequences' indices returning their (len(rows), N) scores, called once and only for those rows
    (the [CLS] scores cost a vision pass per image, needed only for the images that are dropped from);
    the draws, and so the result, are the same either way.
    Returns a new mask in which, for each chosen sequence, the hidden image tokens are keys for no
    query but themselves.
    """
    b = image_mask.shape[0]
    probs = [float(prob)] * b if isinstance(prob, (int, float)) else [float(p) for p in prob]
    if len(probs) != b:
        raise ValueError(f"{len(probs)} visual token drop probabilities for {b} sequences")
    for p in probs:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"visual token drop probability must be in [0, 1], got {p}")
    lo, hi = keep
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"visual token keep range must satisfy 0 < low <= high <= 1, got {keep}")
    out = mask.clone()
    plan: list[tuple[int, Tensor, int, Tensor | None]] = []  # (row, image positions, k, random order)
    for i in range(b):
        if float(torch.rand((), generator=generator)) >= probs[i]:  # drawn for every row, whatever its chance
            continue
        idx = image_mask[i].nonzero().flatten()  # (N,) positions of the image tokens
        n = idx.numel()
        if n == 0:
            continue
        share = lo + (hi - lo) * float(torch.rand((), generator=generator))
        k = max(1, round(share * n))
        plan.append((i, idx, k, torch.randperm(n, generator=generator) if scores is None else None))
    if scores is not None and plan:
        rows = [i for i, *_ in plan]
        picked = scores(rows) if callable(scores) else scores[rows]  # (len(rows), N)
    for j, (i, idx, k, order) in enumerate(plan):
        if order is None:
            if picked.shape[1] != idx.numel():
                raise ValueError(f"sequence {i} has {idx.numel()} image tokens but {picked.shape[1]} scores")
            order = torch.sort(picked[j], descending=True, stable=True).indices  # (N,)
        hidden = idx[order[k:]]  # (N - k,)
        out[i, 0, :, hidden] = False
        out[i, 0, hidden, hidden] = True  # paired indices: each hidden token still sees itself
    return out
