"""MSDeformAttn module (Deformable DETR, Zhu et al. 2021): projections around the kernels.ms_deform_attn op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: value/offset/weight projections, softmax over L*P per head.

    Constants default to the paper's model (RLIPv2 Sec. 4 / Deformable DETR): d_model 256, 4 levels,
    8 heads, 4 sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR init: offsets start on a ring of directions, one per head, growing with the point index.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
        value_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from each query to n_points locations per head and level around its reference.

        Args:
            query: Tensor[N, Lq, C].
            reference_points: Tensor[N, Lq, L, 2] as (x, y) in [0, 1], or Tensor[N, Lq, L, 4] as
                (cx, cy, w, h) in [0, 1]; with boxes the offsets are scaled by half the box size.
            input_flatten: Tensor[N, S, C], S = sum over levels of H_l * W_l.
            spatial_shapes: Tensor[L, 2] int64 (H_l, W_l).
            level_start_index: Tensor[L] int64.
            input_padding_mask: Tensor[N, S] bool, True on padded pixels (their values are zeroed).
            value_index: optional Tensor[N] long: input_flatten / input_padding_mask are then Tensor[B, S, C] /
                Tensor[B, S] and query row n reads input row value_index[n]. Several query rows that read one
                image (the R-Tagger's groups) share one value projection instead of one each.

        Returns:
            Tensor[N, Lq, C].
        """
        n, lq, c = query.shape
        s = input_flatten.shape[1]
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        if c != self.d_model or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn: query channels {c} / input channels {input_flatten.shape[-1]} != d_model {self.d_model}"
            )
        expected_s = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if expected_s != s or spatial_shapes.shape[0] != lv:
            raise ValueError(
                f"MSDeformAttn: input has S={s} tokens and {spatial_shapes.shape[0]} levels, but spatial_shapes "
                f"{spatial_shapes.tolist()} give S={expected_s} and the module expects {lv} levels"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        if value_index is not None:
            value = value[value_index]  # [B, S, C] -> [N, S, C]
        elif value.shape[0] != n:
            raise ValueError(
                f"MSDeformAttn: {n} query rows but {value.shape[0]} input rows and no value_index"
            )
        # [N, S, C] -> [N, S, M, C/M]
        value = value.view(n, s, m, c // m)
        # [N, Lq, M*L*P*2] -> [N, Lq, M, L, P, 2]
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        # softmax over the L*P samples of each head: [N, Lq, M, L*P] -> [N, Lq, M, L, P]
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, lv * p), -1).view(n, lq, m, lv, p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l); [L, 2] -> [1, 1, 1, L, 1, 2]
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            # box references: offsets scaled by half the box size (Deformable DETR two-stage / box refinement)
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / p * size * 0.5
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points last dim is {reference_points.shape[-1]}, expected 2 (x, y) "
                "or 4 (cx, cy, w, h)"
            )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
