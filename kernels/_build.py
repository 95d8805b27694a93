"""Lazy, guarded JIT builds of the C++ CPU and CUDA extensions, cached in a user-settable directory."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SHARED_HEADER = CSRC / "ms_deform_attn_sampling.h"
CPU_SOURCES = (CSRC / "ms_deform_attn_cpu.cpp",)
CUDA_SOURCES = (CSRC / "ms_deform_attn_cuda_bind.cpp", CSRC / "ms_deform_attn_cuda.cu")
CUDA_HEADERS = (CSRC / "ms_deform_attn_cuda.h",)

CACHE_ENV = "RELTAG_KERNELS_CACHE"


def cache_dir() -> Path:
    """Where compiled extensions live: $RELTAG_KERNELS_CACHE, else ~/.cache/reltag/kernels."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reltag" / "kernels"


def cpu_cflags() -> list[str]:
    """Host compiler flags of the CPU kernel.

    -fopenmp: at::parallel_for is header code that only runs in parallel when the extension itself is
    compiled with OpenMP (it then shares libtorch's libgomp). -mavx2 -mfma only where torch itself
    dispatches to AVX2 or better, so a cached build never carries instructions this CPU lacks.
    """
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def cuda_cflags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr"]


def _digest(paths: tuple[Path, ...], flags: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def find_cxx() -> str | None:
    """The host C++ compiler cpp_extension will call ($CXX or c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


@dataclass
class _Slot:
    module: ModuleType | None = None
    reason: str | None = None  # why the build cannot be used; None while not tried or when built
    tried: bool = False


_lock = threading.Lock()
_slots: dict[str, _Slot] = {"cpu": _Slot(), "cuda": _Slot()}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # cpp_extension puts the compiler's first error deep in its message; keep the head and any "error" lines.
    keep = lines[:2] + [ln for ln in lines[2:] if "error" in ln.lower()][:3]
    return " | ".join(keep)[:600]


def _load(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    if kind == "cpu":
        sources, headers, cflags = CPU_SOURCES, (SHARED_HEADER,), cpu_cflags()
        extra = {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
    else:
        sources, headers, cflags = CUDA_SOURCES, (SHARED_HEADER, *CUDA_HEADERS), cuda_cflags()
        extra = {"extra_cflags": ["-O3"], "extra_cuda_cflags": cflags, "with_cuda": True}
    name = f"reltag_msda_{kind}_{_digest(sources + headers, cflags)}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("loading %s extension %s from %s (compiled there on first use)", kind, name, build_dir)
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        verbose=False,
        **extra,
    )


def _precheck(kind: str) -> str | None:
    if find_cxx() is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            return "nvcc / CUDA_HOME not found"
    return None


def get_extension(kind: str) -> ModuleType | None:
    """The built extension ("cpu" or "cuda"), building it on first call; None when it cannot be built."""
    slot = _slots[kind]
    if slot.tried:
        return slot.module
    with _lock:
        if not slot.tried:
            reason = _precheck(kind)
            if reason is None:
                try:
                    slot.module = _load(kind)
                except Exception as exc:  # a failed build must degrade to the reference, with the reason
                    reason = f"build failed: {_short(exc)}"
            slot.reason = reason
            slot.tried = True
    return slot.module


def extension_reason(kind: str) -> str | None:
    """Why the extension cannot be used (building it if not tried yet), or None when it is available."""
    get_extension(kind)
    return _slots[kind].reason


def reset(kind: str) -> None:
    """Forget a build attempt (tests use this after changing the environment)."""
    with _lock:
        _slots[kind] = _Slot()
