"""CLIP ViT vision tower (Radford et al., 2021, arXiv:2103.00020), as used by LLaVA-1.5 / LLaVA-NeXT.

Parameter names equal transformers 5.x `CLIPVisionModel` (`embeddings.class_embedding`,
`pre_layrnorm.*`, `encoder.layers.N.self_attn.q_proj.*`, `post_layernorm.*`), so
`tower.load_state_dict(hf_model.state_dict())` is strict. (transformers 4.x checkpoints carry an extra
`vision_model.` prefix: see `hf_config.convert_hf_vision_state_dict`.)

Our choices: `forward` returns raw hidden states (index 0 = after `pre_layrnorm`, exactly transformers'
`hidden_states[0]`); `post_layernorm` is kept for weight parity but not applied (LLaVA reads raw
hidden states). Attention rows come from `attention_rows`, never from eager attention.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import VisionConfig
from ...errors import InputError
from ...layers.vit import Rows, VisionOutput, ViTTower, prenorm_encoder, run_encoder


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + learned CLS + learned absolute positions (1 + grid**2)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.grid**2 + 1, d)

    def positions(self, num_patches: int, height: int, width: int) -> Tensor:
        """(1, 1 + N, D); bicubic resize as transformers' `CLIPVisionEmbeddings.interpolate_pos_encoding`
        (in the weights' dtype, unlike DINOv2)."""
        pos = self.position_embedding.weight.unsqueeze(0)  # (1, 1 + G*G, D)
        num_positions = pos.shape[1] - 1
        if num_patches == num_positions and height == width:
            return pos
        d = pos.shape[-1]
        g = int(num_positions**0.5)
        grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid = F.interpolate(grid, size=(height // self.patch_size, width // self.patch_size),
                             mode="bicubic", align_corners=False)  # (1, D, h, w)
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)), dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + self.positions(x.shape[1] - 1, h, w)


class CLIPVisionTower(ViTTower):
    """CLIP vision encoder returning the hidden states of the requested layers."""

    has_cls = True

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.family != "clip":
            raise InputError(f"CLIPVisionTower needs family 'clip', got {config.family!r}")
        if not config.qkv_bias:
            raise InputError("CLIP vision towers always have q/k/v biases; set qkv_bias=True")
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(d, eps=eps)  # sic: transformers' spelling
        self.encoder = prenorm_encoder(config)
        self.post_layernorm = nn.LayerNorm(d, eps=eps)  # weight parity only; not applied in forward

    def forward(self, pixel_values: Tensor, layers: Sequence[int],
                attention_rows: Mapping[int, Rows] | None = None, *,
                interpolate_pos_encoding: bool = False) -> VisionOutput:
        """pixel_values: (B, C, H, W). H = W = image_size unless `interpolate_pos_encoding`."""
        self.check_native_size(pixel_values, interpolate_pos_encoding, "CLIP")
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + N, D)
        return run_encoder(self.encoder.layers, x, layers, attention_rows)
