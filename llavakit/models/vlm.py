"""The LLaVA composition: vision tower -> feature selection -> projector -> language model.

Covers LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"), LLaVA-NeXT
anyres (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") and
LLaVA-OneVision (Li et al. 2024). Semantics follow transformers' modeling_llava*.py so HF checkpoints
give the same logits; module names are those of transformers' legacy checkpoint layout
(`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`,
`image_newline`) so import/export is a key-for-key copy.

Our choices: image features are produced per image (a list), which is where pre-LLM token stages (H2)
plug in later; the number of tokens per image is owned here (`num_image_tokens`), and the processor
asks for it, so placeholder count and feature count cannot disagree silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..config import VLMConfig
from ..data import anyres
from ..errors import InputError
from .lm import build_lm
from .projector import Projector
from .visual_inject import VisualInjection
from .vision import build_vision_tower


@dataclass
class VLMOutput:
    logits: Tensor  # (B, T, V)
    hidden_states: Tensor | None = None  # (B, T, D) final-normed


class LlavaModel(nn.Module):
    """A LLaVA-family model (or a text-only LM when `config.architecture == "lm"`)."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        if config.has_vision:
            self.vision_tower = build_vision_tower(config.vision)
            self.multi_modal_projector = Projector(config.projector)
            if config.is_anyres:
                self.image_newline = nn.Parameter(torch.zeros(config.lm.hidden_size))
        self.language_model = build_lm(config.lm)
        self.visual_inject = None
        if config.visual_inject_layers:
            self.visual_inject = VisualInjection(config.lm.hidden_size, config.visual_inject_layers,
                                                 config.visual_inject_rank)

    def add_visual_inject(self, layers: Sequence[int], rank: int) -> None:
        """Add the zero-initialised visual re-injection branch (models/visual_inject.py); the model's outputs
        are unchanged until it is trained or loaded."""
        import dataclasses

        if not self.config.has_vision:
            raise InputError("this is a text-only model; it has no visual tokens to re-inject")
        if self.visual_inject is not None:
            raise InputError("this model already has a visual re-injection branch")
        cfg = dataclasses.replace(self.config, visual_inject_layers=tuple(int(l) for l in layers),
                                  visual_inject_rank=int(rank))
        w = self.language_model.model.embed_tokens.weight
        self.visual_inject = VisualInjection(cfg.lm.hidden_size, cfg.visual_inject_layers, cfg.visual_inject_rank
                                             ).to(device=w.device, dtype=w.dtype)
        self.config = cfg

    def injection(self, input_ids: Tensor, inputs_embeds: Tensor):
        """The prompt's `BoundInjection` for `LlamaLM.forward(inject=...)`, or None without the branch."""
        if self.visual_inject is None:
            return None
        return self.visual_inject.bind(inputs_embeds, input_ids == self.config.image_token_id)

    def set_feature_layers(self, layers: int | Sequence[int]) -> None:
        """Feed the projector other tower layers (a list is concatenated along channels, HF LLaVA's
        `vision_feature_layer` list form). `linear_1` keeps its input columns for every layer it already
        read; the columns of a newly added layer start at zero, so the model computes exactly what it did
        before until they are trained (ours: how a trained projector gains a layer). Layers are hidden-state
        indices as in transformers (0 = embeddings, -1 = the last layer)."""
        import dataclasses

        from ..cost import vision_layers_run

        if not self.config.has_vision:
            raise InputError("this is a text-only model; it has no vision features")
        layers = (int(layers),) if isinstance(layers, int) else tuple(int(l) for l in layers)
        value = layers[0] if len(layers) == 1 else layers
        new_cfg = dataclasses.replace(self.config, vision_feature_layer=value)
        vision_layers_run(new_cfg)  # range check with a clear error
        n = self.config.vision.num_hidden_layers
        blocks = feature_block_map(self.config.feature_layers, layers, n)
        if blocks is None:
            return
        proj = self.multi_modal_projector
        if proj.has_context:
            raise InputError("the projector has a local-context branch, which reads the old feature width; "
                             "changing the feature layers of such a projector is not supported")
        dv = self.config.vision.hidden_size
        old = proj.linear_1
        new = nn.Linear(dv * len(layers), old.out_features, bias=old.bias is not None).to(old.weight.device,
                                                                                           old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            copy_feature_blocks(new.weight, old.weight, blocks, dv)  # (D, L' * Dv) <- (D, L * Dv)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)
        proj.linear_1 = new
        proj.config = dataclasses.replace(proj.config, in_features=dv * len(layers))
        self.config = dataclasses.replace(new_cfg, projector=proj.config)

    def add_projector_context(self, kernel: int, channels: int) -> None:
        """Give the projector a zero-initialised local-context branch (models/projector.py); the model's
        outputs are unchanged until the branch is trained or loaded."""
        import dataclasses

        if not self.config.has_vision:
            raise InputError("this is a text-only model; it has no projector")
        self.multi_modal_projector.add_context(kernel, channels)
        self.config = dataclasses.replace(self.config, projector=self.multi_modal_projector.config)

    # ------------------------------------------------------------------ visual side
    def num_image_tokens(self, image_size: tuple[int, int] | None = None, compression=None) -> int:
        """Visual tokens one image becomes in the LM input.

        `image_size` (h, w): for anyres models the original image size; for fixed-resolution models the
        preprocessed view size (default: the configured input size).
        """
        cfg = self.config
        if not cfg.has_vision:
            raise InputError("this is a text-only model; it takes no images")
        if compression is not None:  # a `Compression`: tokens after its resize and token stages
            return compression.num_image_tokens(self, image_size if image_size is not None
                                                else (cfg.input_size, cfg.input_size))
        vc = cfg.vision
        extra = 1 if cfg.vision_feature_select_strategy == "full" and vc.has_cls else 0
        if not cfg.is_anyres:  # image_size here is the preprocessed view (h, w) the tower sees
            h, w = image_size if image_size is not None else (cfg.input_size, cfg.input_size)
            return (int(h) // vc.patch_size) * (int(w) // vc.patch_size) + extra
        if image_size is None:
            raise InputError("anyres models need the image size to count its tokens")
        return anyres.num_anyres_tokens(
            tuple(int(x) for x in image_size), pinpoints=cfg.image_grid_pinpoints, tile_size=vc.image_size,
            grid=vc.grid, mode=cfg.architecture, vision_aspect_ratio=cfg.vision_aspect_ratio,
            strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1 if vc.has_cls else 0)

    def _select(self, pixel_values: Tensor) -> Tensor:
        """Run the tower on (N, C, H, W) views and select feature layers -> (N, T, Dv)."""
        return self._select_with_attention(pixel_values)[0]

    def _select_with_attention(self, pixel_values: Tensor, attention_rows: dict | None = None,
                               interpolate_pos_encoding: bool = False) -> tuple[Tensor, dict[int, Tensor]]:
        """`_select` plus the attention rows asked for ({layer: rows} -> {layer: (N, H, R, 1 + T)}, H1)."""
        cfg = self.config
        out = self.vision_tower(pixel_values, layers=cfg.feature_layers, attention_rows=attention_rows or None,
                                interpolate_pos_encoding=interpolate_pos_encoding)
        feats = out.hidden_states[0] if len(out.hidden_states) == 1 else torch.cat(out.hidden_states, dim=-1)
        if cfg.vision_feature_select_strategy == "default" and self.vision_tower.has_cls:
            feats = feats[:, 1:]
        return feats, dict(out.attentions or {})

    def get_image_features(self, pixel_values: Tensor, image_sizes: Tensor | None = None,
                           compression=None) -> list[Tensor]:
        """Projected features, one (N_i, D) tensor per image, in input order. `compression`: a
        `Compression` whose resize and token stages (H2) run here."""
        cfg = self.config
        if not cfg.has_vision:
            raise InputError("this is a text-only model; it takes no images")
        if compression is not None:
            return self._compressed_features(pixel_values, compression).features
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        if not cfg.is_anyres:
            if pixel_values.dim() != 4:
                raise InputError(f"pixel_values must be (N, C, H, W), got shape {tuple(pixel_values.shape)}")
            grid = tuple(int(x) // cfg.vision.patch_size for x in pixel_values.shape[-2:])
            feats = self.multi_modal_projector(self._select(pixel_values.to(dtype)), grid)  # (N, T, D)
            return list(feats.unbind(0))
        if image_sizes is None:
            raise InputError(f"{cfg.architecture} needs image_sizes (one (h, w) per image) with pixel_values")
        sizes = [tuple(int(x) for x in s) for s in image_sizes.tolist()]
        n_views = [self._num_views(s) for s in sizes]
        if pixel_values.dim() == 5:  # (B, P, C, S, S) padded per image, as HF processors give it
            if pixel_values.shape[0] != len(sizes):
                raise InputError(f"{pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_views)], dim=0)
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(n_views):
            raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the "
                             f"{sum(n_views)} views that image_sizes {sizes} imply")
        feats = self.multi_modal_projector(self._select(pixel_values.to(dtype)))  # (sum P, N, D)
        newline = self.image_newline
        return [
            anyres.pack_anyres_features(
                f, size, pinpoints=cfg.image_grid_pinpoints, tile_size=cfg.vision.image_size,
                grid=cfg.vision.grid, image_newline=newline, mode=cfg.architecture,
                vision_aspect_ratio=cfg.vision_aspect_ratio)
            for f, size in zip(feats.split(n_views, dim=0), sizes)
        ]

    def _compressed_features(self, pixel_values: Tensor, compression):
        """(N, C, H, W) views -> `compression.image_features` (an `ImageFeatures`: features + positions)."""
        if pixel_values.dim() != 4:
            raise InputError(f"pixel_values must be (N, C, H, W), got shape {tuple(pixel_values.shape)}")
        return compression.image_features(self, pixel_values.to(self.multi_modal_projector.linear_1.weight.dtype))

    def _num_views(self, size: tuple[int, int]) -> int:
        rows, cols = anyres.anyres_grid_shape(size, self.config.image_grid_pinpoints, self.config.vision.image_size)
        return rows * cols + 1

    # ------------------------------------------------------------------ sequence assembly (H4)
    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                     image_sizes: Tensor | None = None, image_features: Sequence[Tensor] | None = None,
                     compression=None) -> Tensor:
        """Token embeddings with every image placeholder replaced by its visual features -> (B, T, D)."""
        lm = self.language_model
        image_mask = input_ids == self.config.image_token_id if self.config.has_vision else None
        n_slots = int(image_mask.sum()) if image_mask is not None else 0
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_sizes, compression=compression)
        if not n_slots and not image_features:
            return lm.embed(input_ids)
        ids = input_ids.masked_fill(image_mask, 0) if n_slots else input_ids
        embeds = lm.embed(ids)  # (B, T, D)
        n_feats = sum(int(f.shape[0]) for f in image_features or ())
        if n_slots != n_feats:
            raise InputError(
                f"the prompt has {n_slots} image-token placeholders but the images produce {n_feats} visual "
                f"tokens; the processor must expand each <image> into exactly the model's count")
        feats = torch.cat(list(image_features), dim=0).to(embeds.dtype)  # (n_slots, D)
        return embeds.masked_scatter(image_mask[..., None], feats)

    def embed_compressed(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                         image_sizes: Tensor | None, compression) -> tuple[Tensor, Tensor | None]:
        """`embed_inputs` plus the prompt's LM position ids (B, T) when `compression` asks to keep the
        kept tokens' original ones (`pos=original`); None = the default consecutive ids."""
        if compression is None or not compression.original_positions or pixel_values is None:
            return self.embed_inputs(input_ids, pixel_values, image_sizes, compression=compression), None
        feats = self._compressed_features(pixel_values, compression)
        embeds = self.embed_inputs(input_ids, image_features=feats.features)
        return embeds, compression.prompt_position_ids(input_ids, attention_mask, self.config.image_token_id, feats)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_sizes: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                output_hidden_states: bool = False) -> VLMOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        if self.visual_inject is not None and input_ids is None:
            raise InputError("this model re-injects its visual tokens, which needs input_ids to find them; "
                             "pass input_ids (with or without inputs_embeds)")
        inject = self.injection(input_ids, inputs_embeds) if input_ids is not None else None
        hidden = self.language_model(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     inject=inject)
        logits = self.language_model.logits(hidden)
        return VLMOutput(logits=logits, hidden_states=hidden if output_hidden_states else None)


def feature_block_map(old: Sequence[int], new: Sequence[int], num_layers: int) -> list[int | None] | None:
    """For each layer of `new` (hidden-state indices), the position of the same layer in `old`, or None
    when `old` lacks it; None overall when the two select the same layers in the same order. -1 and
    `num_layers` name the same layer. Duplicates in `new` are refused."""
    def norm(k: int) -> int:
        return k if k >= 0 else num_layers + 1 + k

    o, n = [norm(k) for k in old], [norm(k) for k in new]
    if len(set(n)) != len(n):
        raise InputError(f"vision_feature_layer {list(new)} names a layer twice")
    if o == n:
        return None
    return [o.index(k) if k in o else None for k in n]


def copy_feature_blocks(dst: Tensor, src: Tensor, blocks: Sequence[int | None], dv: int) -> Tensor:
    """Copy, along the last dim, each Dv-wide block of `src` to where `blocks` (from `feature_block_map`)
    puts it in `dst`; blocks mapped to None are left as they are. In place; returns `dst`."""
    for i, j in enumerate(blocks):
        if j is not None:
            dst[..., i * dv:(i + 1) * dv] = src[..., j * dv:(j + 1) * dv]
    return dst
