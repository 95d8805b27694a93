"""R-Tagger denoising (RLIPv2 Appendix E, Table 4): box and label noise on the box queries, and the attention
mask that keeps noised copies of one region from seeing each other."""

from __future__ import annotations

import torch


def noise_boxes(boxes: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DN-DETR box noise: centre shifted by up to scale * (w/2, h/2), size scaled by a factor in [1 - scale, 1 + scale].

    Args: boxes Tensor[N, 4] (cx, cy, w, h) in [0, 1]. Returns Tensor[N, 4] clamped to [0, 1] (sizes >= 1e-3).
    """
    if scale == 0:
        return boxes.clone()
    u = torch.rand(boxes.shape, generator=generator, dtype=boxes.dtype, device=boxes.device) * 2 - 1
    wh = boxes[:, 2:]
    diff = torch.cat([wh / 2, wh], -1)
    out = boxes + u * diff * scale
    out = torch.cat([out[:, :2].clamp(0.0, 1.0), out[:, 2:].clamp(1e-3, 1.0)], -1)
    return out


def flip_labels(
    labels: torch.Tensor, n_classes: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label with probability p by a class drawn uniformly from [0, n_classes) ("no objects" excluded
    by the caller passing the number of real classes). labels Tensor[N] long -> Tensor[N] long."""
    if p == 0 or n_classes <= 0:
        return labels.clone()
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    new = torch.randint(0, n_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, new, labels)


def region_block_mask(region_ids: torch.Tensor) -> torch.Tensor:
    """Block attention between different slots that carry (independently noised copies of) the same region.

    Args: region_ids Tensor[G, K] long, the annotated region of each query slot; -1 for empty slots
        (those are masked separately by the padding mask).
    Returns: Tensor[G, K, K] bool, True where slot i may not attend to slot j: same region, i != j.
    """
    same = region_ids[:, :, None] == region_ids[:, None, :]
    real = (region_ids >= 0)[:, :, None] & (region_ids >= 0)[:, None, :]
    eye = torch.eye(region_ids.shape[1], dtype=torch.bool, device=region_ids.device)
    return same & real & ~eye


def pair_block_mask(sub_ids: torch.Tensor, obj_ids: torch.Tensor) -> torch.Tensor:
    """The same rule for relation queries: a pair's noised copies (same subject and object region) are blocked.

    Args: sub_ids, obj_ids Tensor[G, Q] long (-1 = empty). Returns Tensor[G, Q, Q] bool.
    """
    key = sub_ids * (int(max(sub_ids.max(), obj_ids.max())) + 2) + obj_ids
    key = torch.where(sub_ids >= 0, key, torch.full_like(key, -1))
    return region_block_mask(key)
