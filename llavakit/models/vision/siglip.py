"""SigLIP ViT vision tower (Zhai et al., 2023, arXiv:2303.15343), as used by LLaVA-OneVision.

Parameter names equal transformers 5.x `SiglipVisionModel` with `vision_use_head=False`
(LLaVA-OneVision's setting): `embeddings.patch_embedding.*` (with bias), `embeddings.position_embedding.*`,
`encoder.layers.N.*`, `post_layernorm.*`. No CLS token and no pre-encoder norm.

Our choices: the attention-pooling head is not built (LLaVA never uses it; drop `head.*` weights, see
`hf_config.convert_hf_vision_state_dict`); `post_layernorm` is kept for weight parity but not applied.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...config import VisionConfig
from ...errors import InputError
from ...layers.vit import Rows, VisionOutput, ViTTower, prenorm_encoder, run_encoder


class SiglipVisionEmbeddings(nn.Module):
    """Patch conv (with bias) + learned absolute positions (grid**2, no CLS)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(config.grid**2, d)

    def positions(self, num_patches: int, height: int, width: int) -> Tensor:
        """(1, N, D); bicubic resize as transformers' `SiglipVisionEmbeddings.interpolate_pos_encoding`."""
        pos = self.position_embedding.weight.unsqueeze(0)  # (1, G*G, D)
        if num_patches == pos.shape[1] and height == width:
            return pos
        d = pos.shape[-1]
        g = int(pos.shape[1] ** 0.5)
        grid = pos.reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid = F.interpolate(grid, size=(height // self.patch_size, width // self.patch_size),
                             mode="bicubic", align_corners=False)  # (1, D, h, w)
        return grid.permute(0, 2, 3, 1).reshape(1, -1, d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        h, w = pixel_values.shape[-2:]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.positions(x.shape[1], h, w)


class SiglipVisionTower(ViTTower):
    """SigLIP vision encoder returning the hidden states of the requested layers."""

    has_cls = False

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.family != "siglip":
            raise InputError(f"SiglipVisionTower needs family 'siglip', got {config.family!r}")
        if not config.qkv_bias:
            raise InputError("SigLIP vision towers always have q/k/v biases; set qkv_bias=True")
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = prenorm_encoder(config)
        self.post_layernorm = nn.LayerNorm(d, eps=eps)  # weight parity only; not applied in forward

    def forward(self, pixel_values: Tensor, layers: Sequence[int],
                attention_rows: Mapping[int, Rows] | None = None, *,
                interpolate_pos_encoding: bool = False) -> VisionOutput:
        """pixel_values: (B, C, H, W). H = W = image_size unless `interpolate_pos_encoding`."""
        self.check_native_size(pixel_values, interpolate_pos_encoding, "SigLIP")
        x = self.embeddings(pixel_values)  # (B, N, D)
        return run_encoder(self.encoder.layers, x, layers, attention_rows)
