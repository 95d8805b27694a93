"""Image side of RLIPv2-ParSeD: ResNet-50 (reference layout), 4 projected levels, DETR's sine position encoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.rlipv2.config import RLIPv2Config
from models.rlipv2.resnet import ResNetBody, hf_resnet_to_torchvision


class Backbone(nn.Module):
    """Holds the ResNet as `body`, so the weights are named `backbone.0.body.*` as in the reference's Joiner."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        self.body = ResNetBody(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_stem)


def load_imagenet_resnet(backbone: Backbone, name_or_dir: str) -> None:
    """Start the ResNet from ImageNet weights of a transformers ResNet (hub id or local dir), for training."""
    from transformers import ResNetModel

    hf = ResNetModel.from_pretrained(name_or_dir, use_safetensors=True)  # never a pickled .bin
    depths = tuple(len(getattr(backbone.body, f"layer{i}")) for i in range(1, 5))
    mapped = hf_resnet_to_torchvision(hf.state_dict(), depths)
    missing, unexpected = backbone.body.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"ResNet weights from {name_or_dir!r} do not fit the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def input_projections(cfg: RLIPv2Config, channels: list[int]) -> nn.ModuleList:
    """1x1 conv + GroupNorm per ResNet level, and a 3x3 stride-2 conv on the last ResNet map for level 4."""
    d = cfg.d_model
    proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(cfg.gn_groups, d)) for c in channels]
    proj.append(
        nn.Sequential(nn.Conv2d(channels[-1], d, 3, stride=2, padding=1), nn.GroupNorm(cfg.gn_groups, d))
    )
    for p in proj:
        nn.init.xavier_uniform_(p[0].weight, gain=1)
        nn.init.constant_(p[0].bias, 0)
    return nn.ModuleList(proj)


def downsample_mask(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Padding mask at a feature map's size by nearest interpolation (DETR's NestedTensor rule).

    Args: pixel_mask Tensor[B, H, W] bool (True = padding). Returns Tensor[B, h, w] bool.
    """
    return F.interpolate(pixel_mask[None].float(), size=size).to(torch.bool)[0]


def sine_position_encoding(mask: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine encoding (`PositionEmbeddingSine(normalize=True)`, scale 2*pi, no -0.5 offset).

    The reference's tagger builds its backbone from DETR's position_encoding.py, which divides the cumulative
    count by the last count (eps 1e-6) without Deformable DETR's -0.5 shift. Channels: the first d/2 encode y,
    the last d/2 encode x, each interleaving sin (even) and cos (odd) frequencies.

    Args: mask Tensor[B, H, W] bool, True on padding. Returns Tensor[B, d_model, H, W] float32.
    """
    num_feats = d_model // 2
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(3)
    return torch.cat([py, px], -1).permute(0, 3, 1, 2)
