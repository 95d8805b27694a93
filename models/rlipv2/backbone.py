"""ResNet backbone from transformers (4 levels, Deformable DETR style) and the sine position encoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.rlipv2.config import RLIPv2Config

# stride-8, -16, -32 stages of ResNet-50 (Deformable DETR's 3 backbone levels); the 4th level (stride 64)
# is a 3x3 stride-2 conv on the last stage (Deformable DETR Sec. 4.1, "multi-scale feature maps").
OUT_FEATURES = ["stage2", "stage3", "stage4"]


def build_resnet(cfg: RLIPv2Config, pretrained: bool) -> nn.Module:
    """transformers ResNetBackbone: inline config (tests), or a hub id / local dir (weights if pretrained)."""
    from transformers import ResNetBackbone, ResNetConfig

    if cfg.backbone_config is not None:
        conf = ResNetConfig(**{**cfg.backbone_config, "out_features": OUT_FEATURES, "out_indices": None})
        return ResNetBackbone(conf)
    if pretrained:
        return ResNetBackbone.from_pretrained(cfg.backbone, out_features=OUT_FEATURES)
    conf = ResNetConfig.from_pretrained(cfg.backbone, out_features=OUT_FEATURES)
    return ResNetBackbone(conf)


def resnet_config_dict(resnet: nn.Module) -> dict:
    """The ResNetConfig fields needed to rebuild the backbone offline (stored in checkpoints)."""
    c = resnet.config
    return {
        "num_channels": c.num_channels,
        "embedding_size": c.embedding_size,
        "hidden_sizes": list(c.hidden_sizes),
        "depths": list(c.depths),
        "layer_type": c.layer_type,
        "hidden_act": c.hidden_act,
        "downsample_in_first_stage": c.downsample_in_first_stage,
        "downsample_in_bottleneck": getattr(c, "downsample_in_bottleneck", False),
    }


class MultiLevelBackbone(nn.Module):
    """ResNet -> 4 feature levels projected to d_model (1x1 conv + GroupNorm; extra 3x3/2 conv level)."""

    def __init__(self, cfg: RLIPv2Config, pretrained: bool = False):
        super().__init__()
        self.body = build_resnet(cfg, pretrained)
        channels = list(self.body.channels)
        d = cfg.d_model
        groups = min(32, d)  # Deformable DETR uses GroupNorm(32, 256)
        proj = [nn.Sequential(nn.Conv2d(ch, d, 1), nn.GroupNorm(groups, d)) for ch in channels]
        for _ in range(cfg.n_levels - len(channels)):
            proj.append(
                nn.Sequential(nn.Conv2d(channels[-1], d, 3, stride=2, padding=1), nn.GroupNorm(groups, d))
            )
            channels.append(d)
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.constant_(p[0].bias, 0)
        self.n_backbone_levels = len(self.body.channels)

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Args: pixel_values Tensor[B, 3, H, W]; pixel_mask Tensor[B, H, W] bool, True on padding.

        Returns: per level (features Tensor[B, d, H_l, W_l], mask Tensor[B, H_l, W_l] bool).
        """
        feats = list(self.body(pixel_values).feature_maps)
        out = []
        last = feats[-1]
        for i, proj in enumerate(self.input_proj):
            src = (
                proj(feats[i])
                if i < self.n_backbone_levels
                else proj(last if i == self.n_backbone_levels else out[-1][0])
            )
            # padding mask follows each level by nearest downsampling (DETR's NestedTensor rule)
            mask = F.interpolate(pixel_mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            out.append((src, mask))
        return out


def sine_position_encoding(mask: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine encoding (scale 2*pi, offset -0.5 as in Deformable DETR).

    Args: mask Tensor[B, H, W] bool, True on padding. Returns Tensor[B, d_model, H, W].
    """
    num_feats = d_model // 2
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(3)
    return torch.cat([py, px], -1).permute(0, 3, 1, 2)
