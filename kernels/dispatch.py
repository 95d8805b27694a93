"""Backend choice for ms_deform_attn: each backend says why it cannot run; an env var forces one; logged once."""

from __future__ import annotations

import logging
import os

import torch

from kernels import _build

logger = logging.getLogger("kernels")

BACKEND_ENV = "RELTAG_MSDA_BACKEND"
BACKENDS = ("reference", "cpu", "cuda")

_logged: set[tuple[str, str]] = set()


def backend_reasons(device: torch.device | str) -> dict[str, str | None]:
    """For every backend, None if it can run on `device`, else why not (builds extensions if not tried).

    Args:
        device: the device of the op's inputs.
    """
    dev = torch.device(device)
    reasons: dict[str, str | None] = {"reference": None}
    cpu_reason = _build.extension_reason("cpu")
    if dev.type != "cpu":
        reasons["cpu"] = f"inputs are on {dev}, the C++ CPU kernel needs cpu tensors" + (
            f"; also {cpu_reason}" if cpu_reason else ""
        )
    else:
        reasons["cpu"] = cpu_reason
    if dev.type != "cuda":
        cuda_reason = _build._precheck("cuda")
        reasons["cuda"] = f"inputs are on {dev}, the CUDA kernel needs cuda tensors" + (
            f"; also {cuda_reason}" if cuda_reason else ""
        )
    else:
        reasons["cuda"] = _build.extension_reason("cuda")
    return reasons


def forced_backend() -> str | None:
    """The backend named by $RELTAG_MSDA_BACKEND, or None when unset or empty."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def _format(reasons: dict[str, str | None]) -> str:
    return "; ".join(f"{b}: {r or 'available'}" for b, r in reasons.items())


def select_backend(device: torch.device | str) -> str:
    """The backend ms_deform_attn uses for inputs on `device`.

    Order: $RELTAG_MSDA_BACKEND if set (raises RuntimeError with every backend's reason when it cannot
    run); else the compiled kernel of the device (cpu / cuda); else the PyTorch reference, logging the
    reason once per device type.
    """
    dev = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        if forced == "reference":
            chosen = "reference"
        else:
            reasons = backend_reasons(dev)
            if reasons[forced] is not None:
                raise RuntimeError(
                    f"{BACKEND_ENV}={forced} cannot run on {dev} inputs. Backends: {_format(reasons)}"
                )
            chosen = forced
        _log_once(dev, chosen, f"forced by {BACKEND_ENV}")
        return chosen
    native = "cuda" if dev.type == "cuda" else "cpu" if dev.type == "cpu" else None
    if native is not None and _build.get_extension(native) is not None:
        _log_once(dev, native, "compiled kernel")
        return native
    why = _build._slots[native].reason if native else f"no compiled kernel for device type {dev.type}"
    key = (dev.type, "reference")
    if key not in _logged:
        _logged.add(key)
        logger.warning("ms_deform_attn on %s falls back to the PyTorch reference: %s", dev.type, why)
    return "reference"


def _log_once(dev: torch.device, backend: str, why: str) -> None:
    key = (dev.type, backend)
    if key not in _logged:
        _logged.add(key)
        logger.info("ms_deform_attn on %s uses the %s backend (%s)", dev.type, backend, why)
