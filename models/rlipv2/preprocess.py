"""Image preprocessing for RLIPv2-ParSeD: DETR resize (shorter side min_size, longer <= max_size), normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.rlipv2.config import RLIPv2Config


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """DETR's rule: scale the shorter side to min_size unless the longer side would pass max_size."""
    short, long = min(width, height), max(width, height)
    scale = min_size / short
    if long * scale > max_size:
        scale = max_size / long
    return max(1, round(width * scale)), max(1, round(height * scale))


def preprocess_image(img: Image.Image, cfg: RLIPv2Config) -> torch.Tensor:
    """PIL image -> Tensor[3, H', W'] float32, resized and normalised with ImageNet statistics."""
    img = img.convert("RGB")
    w, h = resized_size(img.width, img.height, cfg.min_size, cfg.max_size)
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
