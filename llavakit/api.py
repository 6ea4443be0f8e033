"""`VLM`: the object `llavakit.load` returns — model + processor + generation behind one small API.

- `vlm(input_ids=..., attention_mask=None, pixel_values=None, image_sizes=None)` -> output with `.logits`
- `vlm.generate(...)` transformers style: returns prompt + new token ids (B, T + N)
- `vlm.chat(prompt, images=None, ...) -> str`; `vlm.stream_chat(...)` yields text pieces
- `vlm.processor(text=..., images=..., return_tensors="pt")`
- `vlm.save_pretrained(dir)` writes the HF format transformers loads
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import cost as cost_mod
from .config import VLMConfig
from .data import templates
from .data.processor import Processor
from .errors import InputError
from .generation.engine import GenerationConfig, generate as run_generate, trim_stop
from .models.vlm import LlavaModel, VLMOutput


class VLM:
    """A loaded model with its processor. Thread-safety: one request at a time per instance."""

    def __init__(self, model: LlavaModel, processor: Processor, *, source: str = "", compression: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.compression = self.resolve_compression(compression)  # the default for every call

    def resolve_compression(self, spec: Any = "default"):
        """A spec (string / list / Compression / None) -> a checked `Compression` or None.
        "default" (the argument's default) means this instance's own compression."""
        from .compression import Compression

        if isinstance(spec, str) and spec == "default":
            return getattr(self, "compression", None)
        comp = Compression.parse(spec)
        if comp is not None:
            comp.check(self.model)
        return comp

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> VLMConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ tensor level
    @torch.inference_mode()
    def __call__(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 pixel_values: Tensor | None = None, image_sizes: Tensor | None = None,
                 **kwargs: Any) -> VLMOutput:
        dev = self.device
        return self.model(input_ids=_to(input_ids, dev), attention_mask=_to(attention_mask, dev),
                          pixel_values=_to(pixel_values, dev), image_sizes=image_sizes, **kwargs)

    def generation_config(self, **kw: Any) -> GenerationConfig:
        """A GenerationConfig with this model's eos/pad ids; accepts transformers-style names."""
        lm = self.config.lm
        eos = kw.pop("eos_token_id", None)
        eos_ids = tuple(lm.eos_ids) if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        if self.processor.has_tokenizer:
            extra = self.processor.tokenizer.eos_token_id
            if eos is None and extra is not None and extra not in eos_ids:
                eos_ids += (int(extra),)
        pad = kw.pop("pad_token_id", None)
        if pad is None:
            pad = lm.pad_token_id if lm.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        if kw.pop("do_sample", None) is False:
            kw["temperature"] = 0.0
        stop = kw.pop("stop_strings", None) or kw.pop("stop", None) or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        known = set(GenerationConfig.__dataclass_fields__)
        unknown = set(kw) - known
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(sorted(known | {'eos_token_id', 'pad_token_id', 'do_sample', 'stop_strings'}))}")
        return GenerationConfig(eos_token_ids=eos_ids, pad_token_id=int(pad), stop_strings=stop, **kw)

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 image_sizes: Tensor | None = None, *, on_token: Callable[[int, int], None] | None = None,
                 **gen_kwargs: Any) -> Tensor:
        """transformers-style generate: returns (B, T + N) = prompt ids followed by new ids (padded)."""
        new = self._generate_new(input_ids, attention_mask, pixel_values, image_sizes, on_token, **gen_kwargs)
        return torch.cat([input_ids.to(new.device), new], dim=1)

    def _generate_new(self, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None,
                      image_sizes: Tensor | None, on_token: Callable[[int, int], None] | None,
                      compression: Any = "default", **gen_kwargs: Any) -> Tensor:
        cfg = self.generation_config(**gen_kwargs)
        comp = self.resolve_compression(compression)
        dev = self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        run = comp.lm_run(self.model, input_ids, attention_mask) if comp is not None else None
        embeds, position_ids = self.model.embed_compressed(input_ids, attention_mask, _to(pixel_values, dev),
                                                           image_sizes, comp)
        decode_fn = self.processor.decode if (cfg.stop_strings and self.processor.has_tokenizer) else None
        return run_generate(self.model.language_model, embeds, attention_mask, cfg,
                            decode_fn=decode_fn, on_token=on_token, run=run, position_ids=position_ids,
                            inject=self.model.injection(input_ids, embeds))

    # ------------------------------------------------------------------ text level
    def build_prompt(self, prompt: str | Sequence[dict], images: Sequence[Any]) -> str:
        """A chat prompt; `<image>` tags are prepended for images the prompt does not place itself."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            missing = len(images) - prompt.count(templates.IMAGE_TAG)
            if missing < 0:
                raise InputError(f"the prompt has {prompt.count(templates.IMAGE_TAG)} {templates.IMAGE_TAG} "
                                 f"tag(s) but only {len(images)} image(s) were given")
            messages = [{"role": "user", "content": (templates.IMAGE_TAG + "\n") * missing + prompt}]
        else:
            messages = list(prompt)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def chat(self, prompt: str | Sequence[dict], images: Any = None, max_new_tokens: int = 64,
             temperature: float = 0.0, compression: Any = "default", **kw: Any) -> str:
        """Answer one prompt (a string, or transformers chat messages) about zero or more images."""
        return self.chat_batch([prompt], [images], compression=compression, max_new_tokens=max_new_tokens,
                               temperature=temperature, **kw)[0]

    def chat_batch(self, prompts: Sequence[str | Sequence[dict]], images: Sequence[Any] | None = None,
                   compression: Any = "default", **kw: Any) -> list[str]:
        """Batched chat: prompts of different lengths and image counts, left-padded into one batch.
        `compression`: a spec for this call (e.g. "fastervlm:keep=0.1"; None = off); default: the
        instance's own (`llavakit.load(..., compression=...)`)."""
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
        per = [_as_list(im) for im in images]
        texts = [self.build_prompt(p, im) for p, im in zip(prompts, per)]
        comp = self.resolve_compression(compression)
        inputs = self.processor(text=texts, images=[x for im in per for x in im] or None, compression=comp)
        new = self._generate_new(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                                 inputs.get("image_sizes"), kw.pop("on_token", None), compression=comp, **kw)
        stops = self.generation_config(**{k: v for k, v in kw.items() if k in ("stop", "stop_strings")}).stop_strings
        gen = self.generation_config(**{k: v for k, v in kw.items() if k in ("eos_token_id", "pad_token_id")})
        return [trim_stop(self.processor.decode(_cut(row, gen.eos_token_ids, gen.pad_token_id)), stops).strip()
                for row in new.tolist()]

    def stream_chat(self, prompt: str | Sequence[dict], images: Any = None, **kw: Any) -> Iterator[str]:
        """Yield the answer's text as it is generated (decoded incrementally)."""
        import queue

        q: queue.Queue = queue.Queue()
        done = object()
        stop_flag = threading.Event()

        def on_token(_: int, tok: int) -> None:
            if stop_flag.is_set():
                raise _Cancelled()
            q.put(tok)

        def work() -> None:
            try:
                self.chat(prompt, images, on_token=on_token, **kw)
                q.put(done)
            except _Cancelled:
                q.put(done)
            except BaseException as e:  # surfaced to the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        ids: list[int] = []
        text = ""
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                ids.append(item)
                new_text = self.processor.decode(ids)
                if len(new_text) > len(text) and not new_text.endswith("\ufffd"):
                    yield new_text[len(text):]
                    text = new_text
        finally:
            stop_flag.set()

    # ------------------------------------------------------------------ cost and export
    def cost(self, prompt_tokens: int, new_tokens: int = 0, image_sizes: Sequence[tuple[int, int]] = (),
             compression: Any = "default") -> cost_mod.RequestCost:
        """Analytic cost of a request with `prompt_tokens` text tokens and images of `image_sizes` (h, w).

        `image_sizes` are what `model.num_image_tokens` takes: for anyres models the original image
        sizes, for fixed-resolution models the preprocessed view sizes (`pixel_values.shape[-2:]`;
        default view: `config.input_size`). `compression`: a spec (default: the instance's own); the
        cost then follows its token counts per stage and per LM layer.
        """
        comp = self.resolve_compression(compression)
        if comp is not None and image_sizes:
            model = self.model
            per_stage: dict[str, int] = {}
            for s in image_sizes:
                for k, v in comp.visual_tokens_per_stage(model, s).items():
                    per_stage[k] = per_stage.get(k, 0) + v
            visual = sum(comp.num_image_tokens(model, s) for s in image_sizes)
            vh, vw = comp.view_size(model, tuple(image_sizes[0]))
            patch = self.config.vision.patch_size
            return cost_mod.request_cost(
                self.config, num_views=len(image_sizes), visual_tokens=visual, text_tokens=prompt_tokens,
                new_tokens=new_tokens, visual_tokens_per_stage=per_stage, view_grid=(vh // patch, vw // patch),
                tokens_per_layer=comp.tokens_per_layer(model, visual, prompt_tokens),
                kv_tokens_per_layer=comp.kv_tokens_per_layer(model, visual, prompt_tokens))
        visual = sum(self.model.num_image_tokens(s) for s in image_sizes)
        views = sum(self.model._num_views(s) if self.config.is_anyres else 1 for s in image_sizes)
        return cost_mod.request_cost(self.config, num_views=views, visual_tokens=visual,
                                     text_tokens=prompt_tokens, new_tokens=new_tokens)

    def save_pretrained(self, path: str | Path) -> Path:
        from .loader import save_pretrained
        return save_pretrained(self, path)


class _Cancelled(Exception):
    pass


def _to(x: Tensor | None, dev: torch.device) -> Tensor | None:
    return None if x is None else x.to(dev)


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _cut(row: list[int], eos_ids: Sequence[int], pad_id: int) -> list[int]:
    """Generated ids up to (not including) the first eos; trailing padding removed."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row
