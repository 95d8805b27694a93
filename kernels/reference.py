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


def ms_deform_attn_reference_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit backward of ms_deform_attn_reference (aten grid_sample backward per level, no autograd).

    Written out because it runs inside a torch.library op, where autograd is not recorded.

    Args:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as in the forward.
        grad_output: Tensor[N, Lq, M * D].

    Returns:
        (grad_value Tensor[N, S, M, D], grad_sampling_locations Tensor[N, Lq, M, L, P, 2],
        grad_attention_weights Tensor[N, Lq, M, L, P]).
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    # [N, Lq, M*D] -> [N, M*D, Lq] -> [N*M, D, Lq, 1]: the output gradient per (batch, head) image
    g = grad_output.transpose(1, 2).reshape(n * m, d, lq, 1)
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N*M, Lq, L, P]
    w = attention_weights.transpose(1, 2).reshape(n * m, lq, n_levels, n_points)
    grad_values, grad_grids, grad_w = [], [], []
    for lvl, (h, wd) in enumerate(spatial_shapes.tolist()):
        # same layouts as the forward: [N*M, D, H, W] and [N*M, Lq, P, 2]
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(wd))
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # d out / d attention weight = <grad, sample> over D: [N*M, D, Lq, P] -> [N*M, Lq, P]
        grad_w.append((sampled * g).sum(1))
        # d out / d sample = grad * weight: [N*M, D, Lq, P]
        grad_sampled = g * w[:, None, :, lvl, :]
        # aten.grid_sampler_2d_backward(grad, input, grid, interpolation=0 bilinear, padding=0 zeros,
        # align_corners=False, output_mask) -> (grad_input [N*M, D, H, W], grad_grid [N*M, Lq, P, 2])
        gv, gg = torch.ops.aten.grid_sampler_2d_backward(grad_sampled, v, grid, 0, 0, False, [True, True])
        # [N*M, D, H, W] -> [N, M, D, H*W] -> [N, H*W, M, D]
        grad_values.append(gv.reshape(n, m, d, int(h) * int(wd)).permute(0, 3, 1, 2))
        # grid = 2 * loc - 1, so d loc = 2 * d grid; [N*M, Lq, P, 2] -> [N, M, Lq, P, 2] -> [N, Lq, M, P, 2]
        grad_grids.append(2 * gg.reshape(n, m, lq, n_points, 2).transpose(1, 2))
    # levels back into S: [N, S, M, D]
    grad_value = torch.cat(grad_values, dim=1) if grad_values else value.new_zeros(value.shape)
    # stack levels at dim 3: [N, Lq, M, L, P, 2]
    grad_loc = torch.stack(grad_grids, dim=3)
    # [N*M, Lq, L, P] -> [N, M, Lq, L, P] -> [N, Lq, M, L, P]
    grad_attn = torch.stack(grad_w, dim=2).reshape(n, m, lq, n_levels, n_points).transpose(1, 2)
    return grad_value.contiguous(), grad_loc.contiguous(), grad_attn.contiguous()
