"""Multi-scale deformable attention: one op, backends behind it (PyTorch reference, C++ CPU, CUDA)."""

from kernels.reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Deformable DETR); see kernels.reference for shapes."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
