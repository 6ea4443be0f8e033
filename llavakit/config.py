"""Frozen configuration dataclasses for every part of a llavakit model. No I/O here.

Field names follow the transformers configs of the same family where one exists, so HF import/export
(`llavakit.load`) is a plain mapping. `to_dict`/`from_dict` round-trip; unknown keys are an
`InputError` naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import InputError

VISION_FAMILIES = ("clip", "siglip", "dinov2")
LM_FAMILIES = ("llama", "qwen2")
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")
ARCHITECTURES = ("llava", "llava_next", "llava_onevision", "lm")


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    valid = {f.name for f in fields(cls)}
    for key in data:
        if key not in valid:
            raise InputError(f"unknown key {key!r} for {cls.__name__}; valid keys: {', '.join(sorted(valid))}")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower. `family` picks the implementation (clip | siglip | dinov2)."""

    family: str = "clip"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # quick_gelu (CLIP) | gelu_pytorch_tanh (SigLIP) | gelu (DINOv2)
    qkv_bias: bool = True
    layerscale_value: float = 1.0  # DINOv2 only
    mlp_ratio: int = 4  # DINOv2 only (intermediate = hidden * mlp_ratio)
    # DINOv2's learned position grid may be larger than image_size // patch_size (37x37 for 518 px):
    # positions are interpolated to the actual grid, as transformers' Dinov2Embeddings does.

    def __post_init__(self) -> None:
        if self.family not in VISION_FAMILIES:
            raise InputError(f"unknown vision family {self.family!r}; valid: {', '.join(VISION_FAMILIES)}")
        if self.hidden_size % self.num_attention_heads:
            raise InputError("vision hidden_size must be divisible by num_attention_heads")

    @property
    def has_cls(self) -> bool:
        return self.family in ("clip", "dinov2")

    @property
    def grid(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class LMConfig:
    """A decoder-only language model (llama | qwen2). Qwen2 = Llama + q/k/v biases."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases (llama); qwen2 has q/k/v bias regardless
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in LM_FAMILIES:
            raise InputError(f"unknown language-model family {self.family!r}; valid: {', '.join(LM_FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


@dataclass(frozen=True)
class ProjectorConfig:
    """Vision -> LM projector: `linear` or `mlp2x_gelu` (Linear, GELU, Linear; HF `linear_1/linear_2`)."""

    kind: str = "mlp2x_gelu"
    in_features: int = 1024  # vision hidden size * number of feature layers
    out_features: int = 4096
    bias: bool = True
    hidden_act: str = "gelu"
    context_kernel: int = 0  # ours: k x k local-context residual before the MLP (0 = none; models/projector.py)
    context_channels: int = 64

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise InputError(f"unknown projector {self.kind!r}; valid: {', '.join(PROJECTOR_KINDS)}")
        if self.context_kernel < 0 or (self.context_kernel and self.context_kernel % 2 == 0):
            raise InputError(f"projector context_kernel must be 0 (none) or an odd size, got {self.context_kernel}")
        if self.context_kernel and self.context_channels < 1:
            raise InputError(f"projector context_channels must be >= 1, got {self.context_channels}")


@dataclass(frozen=True)
class VLMConfig:
    """A LLaVA-style model: vision tower -> feature selection -> projector -> LM.

    `architecture`:
      - llava: one fixed-size view per image.
      - llava_next: anyres (best grid pinpoint, base view + tiles, unpadding, image_newline per row).
      - llava_onevision: anyres with `vision_aspect_ratio` "anyres_max_N" downsampling and a final
        image_newline.
      - lm: a text-only language model (vision/projector unused); lets plain Llama/Qwen2
        checkpoints run through the same API.
    """

    architecture: str = "llava"
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # default: drop CLS | full: keep all tokens
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    vision_aspect_ratio: str = "anyres_max_9"  # llava_onevision only
    # Name of the chat template the processor uses (see llavakit.data.templates).
    chat_template: str = "vicuna_v1"
    # The side (px) of one view fed to the tower when it differs from vision.image_size (e.g. DINOv2,
    # whose 518 px position grid is interpolated to 224 px inputs). None = vision.image_size.
    # HF LLaVA configs carry it as image_seq_length (= (image_size / patch)^2).
    image_size: int | None = None
    # Ours: LM layers at whose input the visual tokens are re-added through a low-rank map, and its rank
    # (models/visual_inject.py; () = none). HF LLaVA formats cannot hold it.
    visual_inject_layers: tuple[int, ...] = ()
    visual_inject_rank: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise InputError("vision_feature_select_strategy must be 'default' or 'full'")
        if bool(self.visual_inject_layers) != bool(self.visual_inject_rank):
            raise InputError("visual_inject_layers and visual_inject_rank go together (both set or neither), got "
                             f"{self.visual_inject_layers} and {self.visual_inject_rank}")
        if self.visual_inject_layers and max(self.visual_inject_layers) >= self.lm.num_hidden_layers:
            raise InputError(f"visual_inject_layers {list(self.visual_inject_layers)}: the LM has only "
                             f"{self.lm.num_hidden_layers} layers")

    @property
    def has_vision(self) -> bool:
        return self.architecture != "lm"

    @property
    def is_anyres(self) -> bool:
        return self.architecture in ("llava_next", "llava_onevision")

    @property
    def input_size(self) -> int:
        """Side (px) of one view as the processor feeds it to the tower."""
        return self.image_size or self.vision.image_size

    @property
    def view_grid(self) -> int:
        """Patches per side of one view at `input_size`."""
        return self.input_size // self.vision.patch_size

    @property
    def feature_layers(self) -> tuple[int, ...]:
        v = self.vision_feature_layer
        return (v,) if isinstance(v, int) else tuple(v)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VLMConfig":
        _check_keys(cls, data)
        kw = dict(data)
        for name, sub in (("vision", VisionConfig), ("lm", LMConfig), ("projector", ProjectorConfig)):
            if name in kw and isinstance(kw[name], Mapping):
                _check_keys(sub, kw[name])
                sub_kw = dict(kw[name])
                if sub is LMConfig and isinstance(sub_kw.get("eos_token_id"), list):
                    sub_kw["eos_token_id"] = tuple(sub_kw["eos_token_id"])
                kw[name] = sub(**sub_kw)
        if isinstance(kw.get("vision_feature_layer"), list):
            kw["vision_feature_layer"] = tuple(kw["vision_feature_layer"])
        if "image_grid_pinpoints" in kw:
            kw["image_grid_pinpoints"] = tuple(tuple(p) for p in kw["image_grid_pinpoints"])
        if "visual_inject_layers" in kw:
            kw["visual_inject_layers"] = tuple(int(l) for l in kw["visual_inject_layers"])
        return cls(**kw)
