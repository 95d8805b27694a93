"""Lazy, guarded JIT builds of the C++ CPU and CUDA extensions (missing / availability / build), cached on disk."""

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
KINDS = ("cpu", "cuda")


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


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether one extension can be used in this process: its module, or why not (exactly one is None)."""

    kind: str
    module: ModuleType | None
    reason: str | None


# One entry per kind once its build was attempted (availability() never retries: a failed build stays failed
# for the process, with its reason). Import fills nothing.
_lock = threading.Lock()
_attempts: dict[str, Availability] = {}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # cpp_extension puts the compiler's first error deep in its message; keep the head and any "error" lines.
    keep = lines[:2] + [ln for ln in lines[2:] if "error" in ln.lower()][:3]
    return " | ".join(keep)[:600]


def missing(kind: str) -> str | None:
    """What this machine lacks to build the extension `kind` ("cpu" or "cuda"), checked without building:
    a C++ compiler, a CUDA-enabled torch, a CUDA device, nvcc. None when nothing is missing."""
    if kind not in KINDS:
        raise ValueError(f"extension kind {kind!r} is not one of {', '.join(KINDS)}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx} is not on PATH)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            return "nvcc / CUDA_HOME not found"
    return None


def build(kind: str) -> ModuleType:
    """Compile (or load from the cache) the extension `kind` now; raises with the compiler's full output.

    The op goes through availability() instead, which calls this once and keeps the reason of a failure;
    benchmarks/gpu/run.sh calls it directly to show the whole compiler error.
    """
    from torch.utils import cpp_extension

    if kind == "cpu":
        sources, headers, cflags = CPU_SOURCES, (SHARED_HEADER,), cpu_cflags()
        extra = {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}
    elif kind == "cuda":
        sources, headers, cflags = CUDA_SOURCES, (SHARED_HEADER, *CUDA_HEADERS), cuda_cflags()
        extra = {"extra_cflags": ["-O3"], "extra_cuda_cflags": cflags, "with_cuda": True}
    else:
        raise ValueError(f"extension kind {kind!r} is not one of {', '.join(KINDS)}")
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


def availability(kind: str) -> Availability:
    """The extension `kind` ("cpu" or "cuda") or why it cannot be used; the first call per process checks
    missing() and builds, later calls return that outcome. Never raises for a failed build."""
    got = _attempts.get(kind)
    if got is not None:
        return got
    with _lock:
        if kind not in _attempts:
            reason, module = missing(kind), None
            if reason is None:
                try:
                    module = build(kind)
                except Exception as exc:  # a failed build must degrade to the reference, with the reason
                    reason = f"build failed: {_short(exc)}"
            _attempts[kind] = Availability(kind, module, reason)
        return _attempts[kind]
