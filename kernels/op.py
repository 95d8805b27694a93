"""The torch.library op reltag::ms_deform_attn (schema, kernels, fake kernel, autograd) and its entry point."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import _build, dispatch
from kernels.reference import ms_deform_attn_reference, ms_deform_attn_reference_backward

# On CPU the C++ kernel computes in fp32 / fp64; fp16 and bf16 inputs are upcast to fp32 and the results
# cast back (CPUs have no fast 16-bit path worth a separate kernel); the reference backend does the same.
# The CUDA kernel takes all four and accumulates 16-bit inputs in fp32.
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check_levels(spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> None:
    """Data checks the fake kernel cannot do: positive level sizes, start offsets, sum(H*W) == S."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(f"ms_deform_attn: level {lvl} has spatial shape ({h}, {w}); both must be > 0")
        if start != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{lvl}] = {start} but levels 0..{lvl - 1} hold {total} positions"
            )
        total += h * w
    if total != s:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} hold {total} positions but value has S = {s}"
        )


def _reference_dtype(value: Tensor) -> torch.dtype:
    """The reference backend computes fp16 / bf16 in fp32 like the C++ kernel: grid_sample's pixel
    coordinates in 16 bits move samples across pixel edges (measured: bf16 outputs 10% off)."""
    return torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype


def _cpu_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    compute = value.dtype if value.dtype in _CPU_KERNEL_DTYPES else torch.float32
    return (
        value.to(compute).contiguous(),
        spatial_shapes.to("cpu", torch.int64).contiguous(),
        level_start_index.to("cpu", torch.int64).contiguous(),
        sampling_locations.to(compute).contiguous(),
        attention_weights.to(compute).contiguous(),
    )


def _cuda_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    dev = value.device
    return (
        value.contiguous(),
        spatial_shapes.to(dev, torch.int64).contiguous(),
        level_start_index.to(dev, torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# --- the backends: one forward and one backward each. The compiled ones take their extension module first;
# _bind passes it with functools.partial when it registers them for a device type.


def _reference_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_levels(spatial_shapes, level_start_index, value.shape[1])
    c = _reference_dtype(value)
    out = ms_deform_attn_reference(
        value.to(c), spatial_shapes, level_start_index, sampling_locations.to(c), attention_weights.to(c)
    )
    return out.to(value.dtype)


def _reference_backward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad
):
    c = _reference_dtype(value)
    gv, gl, ga = ms_deform_attn_reference_backward(
        value.to(c),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(c),
        attention_weights.to(c),
        grad.to(c),
    )
    return gv.to(value.dtype), gl.to(sampling_locations.dtype), ga.to(attention_weights.dtype)


def _cpu_forward(ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_levels(spatial_shapes, level_start_index, value.shape[1])
    args = _cpu_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ext.forward(*args).to(value.dtype)


def _cpu_backward(ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad):
    args = _cpu_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    gv, gl, ga = ext.backward(*args, grad.to(args[0].dtype).contiguous())
    return gv.to(value.dtype), gl.to(sampling_locations.dtype), ga.to(attention_weights.dtype)


def _cuda_forward(ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_levels(spatial_shapes, level_start_index, value.shape[1])
    args = _cuda_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ext.forward(*args, _stream(value.device))


def _cuda_backward(
    ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad
):
    args = _cuda_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return tuple(ext.backward(*args, grad.contiguous(), _stream(value.device)))


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "cpu": (_cpu_forward, _cpu_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}


# --- registration. The op's default kernel (every device type) is _first_call_*: it makes the one backend
# decision for the device type (dispatch.select_backend), registers that backend's forward and backward as
# the op's kernels for the device type, and runs them. Later calls on that device type reach the registered
# backend directly through torch.library's per-device dispatch, with no selection on the way.


@dataclass(frozen=True, slots=True)
class _Binding:
    backend: str
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


_bind_lock = threading.Lock()
_bound: dict[str, _Binding] = {}  # device type -> backend registered for it


def _bind(device_type: str) -> _Binding:
    """Choose the backend of `device_type` once and register its kernels for that device type."""
    with _bind_lock:
        binding = _bound.get(device_type)
        if binding is None:
            backend = dispatch.select_backend(device_type)  # raises when a forced backend cannot run
            forward, backward = _BACKENDS[backend]
            if backend != "reference":
                ext = _build.availability(backend).module  # built: select_backend chose it
                forward, backward = functools.partial(forward, ext), functools.partial(backward, ext)
            _ms_deform_attn_op.register_kernel(device_type, forward)
            _ms_deform_attn_backward_op.register_kernel(device_type, backward)
            binding = _bound[device_type] = _Binding(backend, forward, backward)
        return binding


def _first_call_forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    binding = _bind(value.device.type)
    return binding.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _first_call_backward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    binding = _bind(value.device.type)
    return binding.backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )


_ms_deform_attn_op = torch.library.custom_op("reltag::ms_deform_attn", _first_call_forward, mutates_args=())
_ms_deform_attn_backward_op = torch.library.custom_op(
    "reltag::ms_deform_attn_backward", _first_call_backward, mutates_args=()
)


def backend_in_use(device: torch.device | str) -> str | None:
    """The backend the op runs for inputs on `device` ("reference", "cpu", "cuda"), or None before the op's
    first call on that device type (the choice is made then)."""
    binding = _bound.get(torch.device(device).type)
    return binding.backend if binding else None


def reset_backends() -> None:
    """Forget the backend chosen for every device type: the op's next call on each chooses again, reading
    $RELTAG_MSDA_BACKEND again (call this after changing it in a running process). Builds are not retried."""
    with _bind_lock:
        for device_type in _bound:
            _ms_deform_attn_op.register_kernel(device_type, _first_call_forward)
            _ms_deform_attn_backward_op.register_kernel(device_type, _first_call_backward)
        _bound.clear()


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@_ms_deform_attn_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    gv, gl, ga = _ms_deform_attn_backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    need = ctx.needs_input_grad
    return (gv if need[0] else None, None, None, gl if need[3] else None, ga if need[4] else None)


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3), backend chosen per device.

    Bilinear sampling with zero padding and align_corners=False (exactly F.grid_sample's), weighted by the
    attention weights and summed over levels and points. Differentiable in value, sampling_locations and
    attention_weights; traceable by torch.compile(fullgraph=True).

    Args:
        value: Tensor[N, S, M, D] float (fp32 / fp64; fp16 / bf16 on CUDA, upcast to fp32 on CPU).
        spatial_shapes: Tensor[L, 2] int64, (H_l, W_l) per level; S = sum of H_l * W_l.
        level_start_index: Tensor[L] int64, offset of each level in S.
        sampling_locations: Tensor[N, Lq, M, L, P, 2], (x, y) normalised to [0, 1] (outside: zero padding).
        attention_weights: Tensor[N, Lq, M, L, P].

    Returns:
        Tensor[N, Lq, M * D], dtype of value.

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices (naming them).
        RuntimeError: when $RELTAG_MSDA_BACKEND forces a backend that cannot run (listing every reason);
            the backend of a device type is chosen on the op's first call there (see reset_backends).
    """
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    expected = (n, lq, m, n_levels, n_points)
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in N or M"
        )
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"ms_deform_attn: attention_weights has shape {tuple(attention_weights.shape)}, expected "
            f"[N, Lq, M, L, P] = {list(expected)} from sampling_locations {tuple(sampling_locations.shape)}"
        )
    if tuple(spatial_shapes.shape) != (n_levels, 2) or tuple(level_start_index.shape) != (n_levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
            f"{tuple(level_start_index.shape)} must be [L, 2] / [L] with L = {n_levels}"
        )
    if not value.is_floating_point():
        raise ValueError(f"ms_deform_attn: value must be floating point, got {value.dtype}")
    if sampling_locations.dtype != value.dtype or attention_weights.dtype != value.dtype:
        raise ValueError(
            f"ms_deform_attn: value, sampling_locations, attention_weights have dtypes {value.dtype}, "
            f"{sampling_locations.dtype}, {attention_weights.dtype}; they must match"
        )
    if spatial_shapes.is_floating_point() or level_start_index.is_floating_point():
        raise ValueError(
            f"ms_deform_attn: spatial_shapes / level_start_index must be integer (int64), got "
            f"{spatial_shapes.dtype} / {level_start_index.dtype}"
        )
    if sampling_locations.device != value.device or attention_weights.device != value.device:
        raise ValueError(
            f"ms_deform_attn: value on {value.device}, sampling_locations on {sampling_locations.device}, "
            f"attention_weights on {attention_weights.device}; they must share a device"
        )
    return _ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
