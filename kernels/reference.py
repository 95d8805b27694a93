"""PyTorch reference of multi-scale deformable attention (grid_sample per level), float64-capable."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling with zero padding, align_corners=False, weighted sum over levels and points.

    Args:
        value: Tensor[N, S, M, D], S = sum of H_l * W_l.
        spatial_shapes: Tensor[L, 2] int64, (H_l, W_l) per level.
        level_start_index: Tensor[L] int64, offset of each level in S (unused here, kept for the signature).
        sampling_locations: Tensor[N, Lq, M, L, P, 2], (x, y) normalised to [0, 1].
        attention_weights: Tensor[N, Lq, M, L, P].

    Returns:
        Tensor[N, Lq, M * D].
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    # split S into per-level blocks: L x [N, H_l*W_l, M, D]
    value_list = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # [N, H*W, M, D] -> [N, H*W, M*D] -> [N, M*D, H*W] -> [N*M, D, H, W]
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N*M, 1, Lq, L*P]
    w = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    # stack levels: [N*M, D, Lq, L, P] -> [N*M, D, Lq, L*P]; weighted sum -> [N*M, D, Lq]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)
    # [N*M, D, Lq] -> [N, M*D, Lq] -> [N, Lq, M*D]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
