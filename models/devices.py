"""Torch devices and dtypes by name, checked with a message that says which component asked and why not."""

from __future__ import annotations

import torch

#: the dtypes a config may name for model weights and activations
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str, what: str = "model") -> torch.dtype:
    """The torch dtype of a config name, or a ValueError naming the component (`what`) and the choices."""
    if name not in DTYPES:
        raise ValueError(f"{what} dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_device(device: str, what: str = "model") -> torch.device:
    """The torch device, or a ValueError that names the component (`what`) and says why it cannot be used."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{what} device {device!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} device {device!r} requested but this machine has no usable CUDA device")
    return dev
