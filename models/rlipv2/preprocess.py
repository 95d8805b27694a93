"""Image preprocessing for RLIPv2-ParSeD: DETR resize (shorter side min_size, longer <= max_size), normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.rlipv2.config import RLIPv2Config


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """DETR's `get_size_with_aspect_ratio` (the reference's `RandomResize([800], max_size=1333)` at inference).

    The shorter side goes to min_size unless the longer side would pass max_size, in which case the target
    for the shorter side becomes round(max_size * short / long). The other side is *truncated*
    (int(size * long / short)), as DETR does: 640x480 -> 1066x800, not the rounded 1067x800.
    Returns (width, height).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"resized_size: image size {width}x{height} must be positive")
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_image(img: Image.Image, cfg: RLIPv2Config) -> torch.Tensor:
    """PIL image -> Tensor[3, H', W'] float32, resized and normalised with ImageNet statistics."""
    img = img.convert("RGB")
    w, h = resized_size(img.width, img.height, cfg.min_size, cfg.max_size)
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
