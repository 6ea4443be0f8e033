"""The processor: tokenizer + chat template + image preprocessing + image-token expansion.

It behaves like transformers' LLaVA processors (`processor(text=..., images=..., return_tensors="pt")`
returns `input_ids`, `attention_mask`, `pixel_values` and, for anyres models, `image_sizes`), with one
rule we enforce: each `<image>` is expanded into exactly the number of tokens the model's visual
pipeline will produce (`count_tokens(image_size)`, the pipeline's `num_out`), and any disagreement
between tags and images is an `InputError` naming both counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from . import anyres, templates
from .image_processing import ImageProcessorConfig, preprocess
from .images import load_image

IMAGE_TAG = templates.IMAGE_TAG


class Processor:
    """Text and images in, model tensors out. Built by `llavakit.load`; holds no model weights."""

    def __init__(self, tokenizer: Any | None, image_config: ImageProcessorConfig | None, *,
                 image_token_id: int | None, count_tokens: Callable[[tuple[int, int]], int] | None,
                 anyres_mode: bool = False, template: str = "plain", jinja_template: str | None = None,
                 max_image_pixels: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.image_config = image_config
        self.image_token_id = image_token_id
        self.count_tokens = count_tokens
        self.anyres_mode = anyres_mode
        self.template = template
        self.jinja_template = jinja_template
        self.max_image_pixels = max_image_pixels

    # ------------------------------------------------------------------ pieces
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise InputError("this checkpoint has no tokenizer files (tokenizer.json / tokenizer.model / "
                             "tokenizer_config.json); tensor-level forward and generate still work — pass "
                             "input_ids yourself, or add the tokenizer files to the model directory")
        return self._tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a transformers-style conversation to the prompt string this model was trained on."""
        if self.jinja_template is None:
            return templates.render(self.template, messages, add_generation_prompt)
        normalized = templates.normalize(messages)
        uses_parts = "'type'" in self.jinja_template or '"type"' in self.jinja_template
        conv = [{"role": r, "content": _as_parts(t) if uses_parts else t} for r, t in normalized]
        return self.tokenizer.apply_chat_template(conv, chat_template=self.jinja_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def load_images(self, images: Sequence[Any]) -> list[Any]:
        kw = {} if self.max_image_pixels is None else {"max_pixels": self.max_image_pixels}
        return [load_image(im, **kw) for im in images]

    # ------------------------------------------------------------------ main entry
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None,
                 return_tensors: str = "pt", padding_side: str = "left", compression: Any = None) -> dict[str, Tensor]:
        """`compression`: a spec or a `Compression`; each image then gets the placeholder count after its stages."""
        if compression is not None and not hasattr(compression, "num_image_tokens"):
            from ..compression import Compression

            compression = Compression.parse(compression)
        if return_tensors != "pt":
            raise InputError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        if text is None:
            raise InputError("text is required (use '<image>' tags to place images)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings")
        if any(not t.strip() for t in texts):
            raise InputError("empty prompt")
        flat = _flatten_images(images)
        n_tags = sum(t.count(IMAGE_TAG) for t in texts)
        if n_tags != len(flat):
            raise InputError(f"the text has {n_tags} {IMAGE_TAG} tag(s) but {len(flat)} image(s) were given; "
                             f"each image needs exactly one {IMAGE_TAG} tag")
        out: dict[str, Tensor] = {}
        counts: list[int] = []
        if flat:
            if self.image_config is None or self.count_tokens is None or self.image_token_id is None:
                raise InputError("this model takes no images")
            pil = self.load_images(flat)
            sizes = [(im.height, im.width) for im in pil]
            if self.anyres_mode:
                views = [anyres.anyres_patches(im, self.image_config) for im in pil]  # each (P, 3, S, S)
                p_max = max(v.shape[0] for v in views)
                pv = views[0].new_zeros((len(views), p_max) + tuple(views[0].shape[1:]))
                for i, v in enumerate(views):
                    pv[i, : v.shape[0]] = v
                out["pixel_values"] = pv  # (N, Pmax, 3, S, S)
                out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)  # (N, 2)
                counts = [int(self.count_tokens(s)) for s in sizes]
            else:
                out["pixel_values"] = preprocess(pil, self.image_config)  # (N, 3, H, W)
                view = tuple(int(x) for x in out["pixel_values"].shape[-2:])
                n = self.count_tokens(view, compression) if compression is not None else self.count_tokens(view)
                counts = [int(n)] * len(pil)
        ids = self.tokenize(texts, counts)
        out.update(_pad(ids, self._pad_id(), padding_side))
        return out

    def tokenize(self, texts: list[str], counts: list[int]) -> list[list[int]]:
        """Token ids of `texts`, each <image> tag expanded into the next of `counts` image tokens."""
        tok = self.tokenizer
        image_str = None
        if counts:
            image_str = tok.convert_ids_to_tokens(self.image_token_id)
            if image_str is None or tok.convert_tokens_to_ids(image_str) != self.image_token_id:
                image_str = None
        it = iter(counts)
        result = []
        for t in texts:
            pieces = t.split(IMAGE_TAG)
            if image_str is not None:  # expand in text, as transformers' processors do
                expanded = pieces[0] + "".join(image_str * next(it) + p for p in pieces[1:])
                ids = tok(expanded)["input_ids"]
            else:  # the tokenizer does not know the image token: splice ids between text pieces
                ids = tok(pieces[0])["input_ids"] if pieces[0] else []
                for p in pieces[1:]:
                    ids += [self.image_token_id] * next(it)
                    ids += tok(p, add_special_tokens=False)["input_ids"] if p else []
            result.append(list(ids))
        return result

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(str(path))
        if self.image_config is not None:
            from ..hf_format import write_json
            write_json(path / "preprocessor_config.json", self.image_config.to_hf_dict())
        if self.jinja_template is not None:
            (path / "chat_template.jinja").write_text(self.jinja_template)


def _as_parts(text: str) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = []
    pieces = text.split(IMAGE_TAG)
    for i, p in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        p = p.lstrip("\n") if i else p
        if p.strip():
            parts.append({"type": "text", "text": p})
    return parts


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for x in images:
            flat.extend(_flatten_images(x) if isinstance(x, (list, tuple)) else [x])
        return flat
    return [images]


def _pad(ids: list[list[int]], pad_id: int, side: str) -> dict[str, Tensor]:
    if side not in ("left", "right"):
        raise InputError("padding_side must be 'left' or 'right'")
    n = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(n - len(x), n) if side == "left" else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
