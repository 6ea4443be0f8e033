"""DINOv2 ViT vision tower (Oquab et al., 2023, arXiv:2304.07193); llavakit's default tower (ViT-S/14).

Parameter names equal transformers 5.x `Dinov2Model`: `embeddings.cls_token`, `embeddings.mask_token`,
`embeddings.position_embeddings`, `embeddings.patch_embeddings.projection.*`,
`encoder.layer.N.{norm1,attention.{q,k,v,o}_proj,layer_scale1.lambda1,norm2,mlp.fc1,mlp.fc2,layer_scale2.lambda1}`,
`layernorm.*`. (transformers 4.x checkpoints name the attention `attention.attention.query` ... and
`attention.output.dense`: see `hf_config.convert_hf_vision_state_dict`.)

Positions are always resized to the input's patch grid exactly as transformers'
`Dinov2Embeddings.interpolate_pos_encoding` (bicubic in fp32, cast back; skipped only when the grid
matches and the image is square).

Our choices: the MLP width is `hidden_size * mlp_ratio` (as transformers; its config has no
intermediate_size) and `VisionConfig.intermediate_size` must agree — a mismatch is an `InputError`,
not silently ignored. `mask_token` is kept for weight parity but unused (no masked-image modelling);
drop-path and dropout are not implemented (inference / frozen-tower use); the SwiGLU FFN of ViT-g is
not supported. The final `layernorm` is not applied in forward.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import VisionConfig
from ...errors import InputError
from ...layers.vit import MLP, Attention, Rows, VisionOutput, ViTTower, run_encoder


class Dinov2Embeddings(nn.Module):
    """Patch conv + CLS token + learned positions on a fixed grid, interpolated to the input grid."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused; weight parity with transformers
        self.position_embeddings = nn.Parameter(torch.randn(1, config.grid**2 + 1, d) * 0.02)
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)

    def positions(self, num_patches: int, height: int, width: int) -> Tensor:
        """(1, 1 + N, D), as transformers' `Dinov2Embeddings.interpolate_pos_encoding`."""
        pos = self.position_embeddings  # (1, 1 + G*G, D)
        num_positions = pos.shape[1] - 1
        if num_patches == num_positions and height == width:
            return pos
        d = pos.shape[-1]
        g = int(num_positions**0.5)
        grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid = F.interpolate(grid.to(torch.float32), size=(height // self.patch_size, width // self.patch_size),
                             mode="bicubic", align_corners=False).to(pos.dtype)  # (1, D, h, w)
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)), dim=1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        proj = self.patch_embeddings.projection
        x = proj(pixel_values.to(proj.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)  # (B, 1 + N, D)
        return x + self.positions(x.shape[1] - 1, h, w)


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT, Touvron et al., 2021); parameter `lambda1` as transformers."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class Dinov2Layer(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.))). Returns (hidden, (q, k))."""

    def __init__(self, config: VisionConfig, mlp_hidden: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attention = Attention(d, config.num_attention_heads, qkv_bias=config.qkv_bias, out_name="o_proj")
        self.layer_scale1 = LayerScale(d, config.layerscale_value)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, mlp_hidden, config.hidden_act)
        self.layer_scale2 = LayerScale(d, config.layerscale_value)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attn, qk = self.attention(self.norm1(x))
        x = x + self.layer_scale1(attn)  # (B, T, D)
        x = x + self.layer_scale2(self.mlp(self.norm2(x)))  # (B, T, D)
        return x, qk


class Dinov2VisionTower(ViTTower):
    """DINOv2 encoder returning the hidden states of the requested layers, at any input size."""

    has_cls = True

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.family != "dinov2":
            raise InputError(f"Dinov2VisionTower needs family 'dinov2', got {config.family!r}")
        mlp_hidden = config.hidden_size * config.mlp_ratio
        if config.intermediate_size != mlp_hidden:
            raise InputError(f"DINOv2 MLP width is hidden_size * mlp_ratio = {mlp_hidden}; "
                             f"intermediate_size is {config.intermediate_size} — make them agree")
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Dinov2Layer(config, mlp_hidden) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # parity only; not applied

    def forward(self, pixel_values: Tensor, layers: Sequence[int],
                attention_rows: Mapping[int, Rows] | None = None, *,
                interpolate_pos_encoding: bool = True) -> VisionOutput:
        """pixel_values: (B, C, H, W), any size. Positions are always interpolated, as transformers
        does; `interpolate_pos_encoding` is accepted (and ignored) for a uniform tower interface."""
        x = self.embeddings(pixel_values)  # (B, 1 + N, D)
        return run_encoder(self.encoder.layer, x, layers, attention_rows)
