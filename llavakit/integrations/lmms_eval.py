"""lmms-eval model adapter: `python -m lmms_eval --model llavakit --model_args source=default --tasks TASK`.

`LlavakitLMMS` is an lmms-eval "simple" model (`is_simple = True`): each request arrives as
(context, generation kwargs, doc_to_visual, doc_id, task, split), the images come from
`doc_to_visual(doc)`, and the answer is `VLM.chat_batch` on the context (its `<image>` tags placed
before it when the context has none, as llavakit's own chat does) with the model's chat template.

Model arguments (``--model_args key=value,...``):

- ``source``: what `llavakit.load` takes: "default", a local HF-format directory, or a hub id
  (``pretrained`` is accepted as an alias, the name most lmms-eval models use).
- ``compression``: a visual-token compression spec (`llavakit.compression`), e.g.
  ``compression=fastervlm:keep=0.1`` or, several methods (brackets keep lmms-eval from splitting at the
  comma), ``compression=[fastervlm:keep=0.25, fastv:layer=2:keep=0.5]``; "none" (default) keeps every
  token. It is parsed and checked against the model when the adapter is built (`Compression.parse(spec)
  .check(model)`: a bad spec is an `InputError` before any request runs) and every `chat_batch` call and
  every loglikelihood forward runs with it (explicitly: "none" also overrides a default the model was
  loaded with).
- ``dtype`` (float32 default, bfloat16, float16, auto), ``device`` (also ``--device``),
  ``batch_size`` (``--batch_size``; requests with equal generation kwargs are batched, left-padded),
  ``max_new_tokens`` (default when a task gives none: 64).

Generation kwargs from the task: ``until`` -> stop strings (the answer is cut before the first),
``max_new_tokens``, ``temperature`` (0 = greedy), ``do_sample`` (False = greedy), ``top_p``, ``top_k``,
``seed``; ``num_beams`` > 1 is refused (no beam search); other keys are ignored with a warning, once.

`loglikelihood` scores a continuation after the chat-templated context (with the images): the sum of
its tokens' log-probabilities and whether greedy decoding would produce exactly those tokens. The
continuation is tokenized on its own and appended to the context's ids (no merge across the boundary).
With compression, pre-LLM methods shorten the image tokens as in generation; in-LLM methods (FastV-style)
prune once over the whole sequence, so text-guided ones rank tokens by the attention of the
continuation's last token, not of the prompt's (our choice: one forward per request, as lmms-eval's
loglikelihood does for other models).
`generate_until_multi_round` is not supported (NotImplementedError). One process only (no accelerate
data parallelism); videos and audio are refused with a clear error.

Registration: the ``lmms_eval.models`` entry point (see `llavakit.integrations`). Without it (e.g. a
checkout where the entry point is not installed), run lmms-eval through this module, which registers
the model in-process first: ``python -m llavakit.integrations.lmms_eval --model llavakit ...``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from ..errors import InputError
from . import LMMS_EVAL_MODEL_ID, lmms_eval_manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IGNORED_QUIETLY = {"image_aspect_ratio", "use_cache"}  # task hints that change nothing here
DEFAULT_MAX_NEW_TOKENS = 64


@register_model(LMMS_EVAL_MODEL_ID)
class LlavakitLMMS(lmms):
    """A llavakit model behind lmms-eval's `lmms` interface (see the module docstring)."""

    is_simple = True

    def __init__(self, source: str = "default", compression: Any = "none", dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 1, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 pretrained: str | None = None, max_batch_size: Any = None, vlm: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise InputError(f"unknown llavakit model_args {', '.join(sorted(unknown))}; valid: source (or "
                             f"pretrained), compression, dtype, device, batch_size, max_new_tokens")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise InputError(f"batch_size must be a positive int, got {batch_size!r} "
                             "('auto' is not supported)") from None
        if self.batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        comp = _parse_compression(compression)  # a bad spec fails before any weight is read
        if vlm is None:
            import llavakit

            vlm = llavakit.load(str(pretrained if pretrained is not None else source), dtype=dtype, device=device)
        self.vlm = vlm
        if comp is not None:
            comp.check(vlm.model)  # what this model cannot do with the spec fails here, before any request
        self.compression = comp  # a checked `Compression`, or None (off)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Answer every request; requests with equal generation kwargs are batched (`batch_size`)."""
        from tqdm import tqdm

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[_key(req.args[1])].append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="llavakit")
        for indices in groups.values():
            gen = self._generation_kwargs(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                images = [self._visuals(requests[i].args) for i in chunk]
                answers = self.vlm.chat_batch(contexts, images, **gen)
                for i, ans in zip(chunk, answers):
                    out[i] = ans
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), ans)
                bar.update(len(chunk))
        bar.close()
        return [o if o is not None else "" for o in out]

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError("llavakit's lmms-eval adapter does not support generate_until_multi_round "
                                  "(multi-round tasks); use generate_until tasks")

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context, images), greedy?) per request, one request at a time."""
        results = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            if callable(continuation):  # output_type loglikelihood passes doc_to_target
                continuation = continuation(self._doc(req.args))
            results.append(self._score(context, str(continuation), self._visuals(req.args)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    # ------------------------------------------------------------------ pieces
    def _generation_kwargs(self, task_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """lmms-eval generation kwargs -> `VLM.chat_batch` options."""
        kw = dict(task_kwargs or {})
        gen: dict[str, Any] = {"max_new_tokens": int(kw.pop("max_new_tokens", self.max_new_tokens)),
                               "temperature": float(kw.pop("temperature", 0.0) or 0.0)}
        until = kw.pop("until", None)
        if until:
            gen["stop"] = [until] if isinstance(until, str) else [str(u) for u in until]
        if kw.pop("do_sample", None) is False:
            gen["temperature"] = 0.0
        for name, cast in (("top_p", float), ("top_k", int), ("seed", int)):
            value = kw.pop(name, None)
            if value is not None:
                gen[name] = cast(value)
        beams = kw.pop("num_beams", 1)
        if beams is not None and int(beams) > 1:
            raise InputError(f"num_beams={beams}: llavakit has no beam search; use num_beams=1")
        if gen["temperature"] == 0.0:  # greedy: nucleus/top-k settings mean nothing
            gen.pop("top_p", None)
            gen.pop("top_k", None)
        for name in sorted(set(kw) - IGNORED_QUIETLY - self._warned):
            log.warning("llavakit lmms-eval adapter: ignoring generation kwarg %r=%r", name, kw[name])
            self._warned.add(name)
        gen["compression"] = self.compression  # None: off, even if the model was loaded with a default
        return gen

    def _doc(self, args: tuple) -> Any:
        doc_id, task, split = args[-3], args[-2], args[-1]
        return self.task_dict[task][split][doc_id]

    def _visuals(self, args: tuple) -> list[Any]:
        """The request's images (PIL images or image file paths); videos / audio are refused."""
        doc_to_visual: Callable[[Any], Any] | None = args[2]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(args))
        flat: list[Any] = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if isinstance(v, (list, tuple)):
                flat.extend(v)
            elif v is not None:
                flat.append(v)
        for v in flat:
            if isinstance(v, (str, Path)) and Path(v).suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"llavakit's lmms-eval adapter takes images only; got {str(v)!r} (video?)")
            if isinstance(v, dict):
                raise InputError("llavakit's lmms-eval adapter takes images only; got a dict visual (audio?)")
        return flat

    @torch.inference_mode()
    def _score(self, context: str, continuation: str, images: list[Any]) -> tuple[float, bool]:
        vlm = self.vlm
        if not continuation:
            raise InputError("loglikelihood needs a non-empty continuation")
        comp = self.compression
        prompt = vlm.build_prompt(context, images)
        inputs = vlm.processor(text=[prompt], images=images or None, compression=comp)
        ctx = inputs["input_ids"][0]
        cont = torch.tensor(vlm.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"],
                            dtype=ctx.dtype)
        if cont.numel() == 0:
            raise InputError(f"the continuation {continuation!r} tokenizes to nothing")
        ids = torch.cat([ctx, cont])[None]
        if comp is None:
            logits = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs.get("pixel_values"),
                         image_sizes=inputs.get("image_sizes")).logits[0].float()
        else:
            logits = _compressed_logits(vlm, comp, ids, inputs.get("pixel_values"), inputs.get("image_sizes"))
        n = cont.numel()
        logprobs = torch.log_softmax(logits[-n - 1:-1], dim=-1).cpu()  # positions predicting the continuation
        picked = logprobs.gather(1, cont[:, None]).sum()
        greedy = bool((logprobs.argmax(-1) == cont).all())
        return float(picked), greedy


def register() -> None:
    """Register ``llavakit`` in this process's lmms-eval model registry (no entry point needed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


def _parse_compression(spec: Any) -> Any:
    """The `compression` model arg -> a `Compression` (not yet checked against a model) or None (off)."""
    from ..compression import Compression

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, (bool, int, float)):  # lmms-eval turns "true" / "1" into values: never a spec
        raise InputError(f"compression={spec!r} is not a compression spec; e.g. compression=fastervlm:keep=0.1")
    return Compression.parse(spec)


def _compressed_logits(vlm: Any, comp: Any, ids: torch.Tensor, pixel_values: Any, image_sizes: Any) -> torch.Tensor:
    """(T', V) fp32 logits of one sequence run with `comp` (pre-LLM stages and in-LLM hooks). In-LLM pruning
    drops visual positions only, so the text positions at the end (the continuation) keep their places."""
    model, dev = vlm.model, vlm.device
    ids = ids.to(dev)
    mask = torch.ones_like(ids)
    pv = pixel_values.to(dev) if pixel_values is not None else None
    embeds, position_ids = model.embed_compressed(ids, mask, pv, image_sizes, comp)  # (1, T, D)
    run = comp.lm_run(model, ids, mask)
    hidden = model.language_model(embeds, attention_mask=mask, position_ids=position_ids, run=run,
                                  inject=model.injection(ids, embeds))  # (1, T', D)
    return model.language_model.logits(hidden)[0].float()


def _key(gen_kwargs: Any) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def main() -> None:
    """`python -m llavakit.integrations.lmms_eval ARGS`: lmms-eval's CLI with ``llavakit`` registered."""
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    register()
    lmms_eval_main()


if __name__ == "__main__":
    main()
