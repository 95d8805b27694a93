"""Backend choice for ms_deform_attn: each backend says why it cannot run; an env var forces one; logged once."""

from __future__ import annotations

import logging
import os

import torch

from kernels import _build

logger = logging.getLogger("kernels")

BACKEND_ENV = "RELTAG_MSDA_BACKEND"
BACKENDS = ("reference", "cpu", "cuda")

_NAMES = {"cpu": "C++ CPU kernel", "cuda": "CUDA kernel"}

_logged: set[tuple[str, str]] = set()  # (device type, message) already logged


def backend_reasons(device: torch.device | str) -> dict[str, str | None]:
    """For every backend, None if it can run on `device`, else why not.

    Builds the extension of the device's own type if not tried yet; for the other compiled backend it only
    says what the machine lacks (no build: it could not take these inputs anyway).

    Args:
        device: the device of the op's inputs.
    """
    dev = torch.device(device)
    reasons: dict[str, str | None] = {"reference": None}
    for kind in _build.KINDS:  # "cpu", "cuda": the compiled backend for tensors of that device type
        if dev.type == kind:
            reasons[kind] = _build.availability(kind).reason
        else:
            lack = _build.missing(kind)
            reasons[kind] = f"inputs are on {dev}, the {_NAMES[kind]} needs {kind} tensors" + (
                f"; also {lack}" if lack else ""
            )
    return reasons


def _forced_backend() -> str | None:
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
    """The backend ms_deform_attn uses for inputs on `device`: the op's one decision point.

    kernels.op calls it once per device type, on the op's first call there, and registers that backend's
    kernels for the device type (see kernels.op.reset_backends to choose again). Order: $RELTAG_MSDA_BACKEND
    if set (raises RuntimeError with every backend's reason when it cannot run); else the compiled kernel of
    the device type (cpu / cuda); else the PyTorch reference, with a warning saying why. The choice is logged
    once per device type and message.

    Raises:
        ValueError: $RELTAG_MSDA_BACKEND names no backend.
        RuntimeError: the forced backend cannot run on `device` (listing every backend's reason).
    """
    dev = torch.device(device)
    forced = _forced_backend()
    if forced is not None:
        if forced != "reference":
            reasons = backend_reasons(dev)
            if reasons[forced] is not None:
                raise RuntimeError(
                    f"{BACKEND_ENV}={forced} cannot run on {dev} inputs. Backends: {_format(reasons)}"
                )
        _log_once(dev, logging.INFO, f"uses the {forced} backend (forced by {BACKEND_ENV})")
        return forced
    if dev.type in _build.KINDS:
        built = _build.availability(dev.type)
        if built.module is not None:
            _log_once(dev, logging.INFO, f"uses the {dev.type} backend (compiled kernel)")
            return dev.type
        why = built.reason
    else:
        why = f"no compiled kernel for device type {dev.type}"
    _log_once(dev, logging.WARNING, f"falls back to the PyTorch reference: {why}")
    return "reference"


def _log_once(dev: torch.device, level: int, what: str) -> None:
    key = (dev.type, what)
    if key not in _logged:
        _logged.add(key)
        logger.log(level, "ms_deform_attn on %s %s", dev.type, what)
