"""Vision towers: one family per file, chosen by `VisionConfig.family` (exact names).

Every tower has the same interface:
    tower(pixel_values (B, C, H, W), layers, attention_rows=None, *, interpolate_pos_encoding=False)
        -> VisionOutput(hidden_states=[(B, T, D) per requested layer], attentions={l: (B, H, R, T)})
    tower.config, tower.has_cls, tower.num_patches(height, width)
Layer indices follow transformers' `output_hidden_states` (0 = embeddings, negatives from the end);
no final layer norm is applied; encoder layers past the deepest one requested are not run.
"""

from __future__ import annotations

from torch import nn

from ...config import VisionConfig
from ...errors import InputError
from ...layers.vit import VisionOutput
from .clip import CLIPVisionTower
from .dinov2 import Dinov2VisionTower
from .siglip import SiglipVisionTower

VISION_TOWERS: dict[str, type[nn.Module]] = {
    "clip": CLIPVisionTower,
    "siglip": SiglipVisionTower,
    "dinov2": Dinov2VisionTower,
}


def build_vision_tower(config: VisionConfig) -> nn.Module:
    """The tower for `config.family`, randomly initialised (load weights separately; no I/O here)."""
    try:
        cls = VISION_TOWERS[config.family]
    except KeyError:
        raise InputError(f"unknown vision family {config.family!r}; valid: {', '.join(VISION_TOWERS)}") from None
    return cls(config)


__all__ = ["VISION_TOWERS", "VisionOutput", "build_vision_tower", "CLIPVisionTower", "SiglipVisionTower",
           "Dinov2VisionTower"]
