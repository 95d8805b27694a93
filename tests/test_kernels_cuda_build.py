"""The CUDA sources compile (nvcc, sm_90) and the torch glue matches their C ABI, on a machine without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest

from kernels import _build

CU = _build.CSRC / "ms_deform_attn_cuda.cu"
GLUE = _build.CSRC / "ms_deform_attn_cuda_bind.cpp"
LAUNCHERS = {"msda_cuda_forward", "msda_cuda_backward", "msda_cuda_error_string"}


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _symbols(obj, *flags: str) -> set[str]:
    done = _run(["nm", *flags, str(obj)])
    assert done.returncode == 0, done.stderr
    return {line.split()[-1] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.nvcc
@pytest.mark.slow
def test_cuda_kernel_compiles_with_nvcc_for_sm90(tmp_path):
    """nvcc compiles the .cu (shared header + launchers; fp32/fp64/fp16/bf16 instantiations) warning-free,
    with the flags torch's extension build adds (they remove implicit __half / bf16 conversions)."""
    from torch.utils import cpp_extension

    obj = tmp_path / "ms_deform_attn_cuda.o"
    cmd = [shutil.which("nvcc"), "-c", "-arch=sm_90", "-std=c++17", *cpp_extension.COMMON_NVCC_FLAGS]
    cmd += [*_build.cuda_cflags(), "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]
    cmd += [f"-I{_build.CSRC}", str(CU), "-o", str(obj)]
    done = _run(cmd)
    assert done.returncode == 0, f"nvcc failed:\n{done.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    defined = _symbols(obj, "--defined-only")
    assert LAUNCHERS <= defined, f"launchers missing from the object: {LAUNCHERS - defined}"


@pytest.mark.nvcc
@pytest.mark.compiler
@pytest.mark.slow
def test_cuda_glue_compiles_against_torch_and_calls_only_existing_launchers(tmp_path):
    """The host-side glue compiles with the torch headers; every msda_* symbol it needs is a launcher."""
    from torch.utils import cpp_extension

    obj = tmp_path / "glue.o"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{_build.CSRC}",
    ]
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-c", "-fPIC", "-O0", "-std=c++20", "-DTORCH_EXTENSION_NAME=glue_check", *includes, str(GLUE)]
    done = _run([*cmd, "-o", str(obj)])
    assert done.returncode == 0, f"{cxx} failed on the CUDA glue:\n{done.stderr[-4000:]}"
    needed = {s for s in _symbols(obj, "--undefined-only") if s.startswith("msda_")}
    assert needed == LAUNCHERS, f"glue needs {needed}, launchers are {LAUNCHERS}"


def test_cuda_sources_do_not_include_torch():
    """The .cu depends on the CUDA runtime and the shared header only (what lets nvcc 13 build it alone)."""
    text = CU.read_text()
    includes = [ln.split()[1] for ln in text.splitlines() if ln.startswith("#include")]
    assert includes == [
        "<cuda_bf16.h>",
        "<cuda_fp16.h>",
        "<cuda_runtime.h>",
        '"ms_deform_attn_cuda.h"',
        '"ms_deform_attn_sampling.h"',
    ], includes
