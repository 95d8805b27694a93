"""Multi-scale deformable attention: parity of every backend with the float64 reference, gradients, dispatch."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

import kernels
from kernels import (
    _build,
    backend_in_use,
    dispatch,
    ms_deform_attn,
    ms_deform_attn_reference,
    ms_deform_attn_reference_backward,
    reset_backends,
)

BACKEND_ENV = kernels.BACKEND_ENV


# ----------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Tol:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected| (per element)."""

    rtol: float
    atol: float


# Per-dtype tolerances against the float64 reference computed from the same (rounded) inputs.
# fp16 / bf16: one rounding of the output (2^-11 / 2^-8 relative) on top of fp32 accumulation.
FWD_TOL = {
    torch.float64: Tol(1e-10, 1e-12),
    torch.float32: Tol(1e-5, 1e-5),
    torch.float16: Tol(2e-3, 2e-3),
    torch.bfloat16: Tol(1.6e-2, 1.6e-2),
}
# Gradients sum over up to D channels (location gradients also scale with the level width): looser.
BWD_TOL = {
    torch.float64: Tol(1e-9, 1e-11),
    torch.float32: Tol(1e-4, 2e-5),
    torch.float16: Tol(4e-3, 4e-3),
    torch.bfloat16: Tol(3e-2, 3e-2),
}


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str) -> None:
    """Assert elementwise closeness; the failure names the worst element, both values and the bound."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    scale = max(1.0, float(e.abs().max()))
    bound = tol.atol * scale + tol.rtol * e.abs()
    excess = (a - e).abs() - bound
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
    assert float(excess.flatten()[worst]) <= 0, (
        f"{what}: worst element {idx}: got {float(a[idx]):.9g}, expected {float(e[idx]):.9g}, "
        f"|diff| {float((a - e).abs()[idx]):.3g} > bound {float(bound[idx]):.3g} ({tol})"
    )
    assert torch.isfinite(a).all(), f"{what}: non-finite output"


def level_index(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ss = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = ss[:, 0] * ss[:, 1]
    return ss, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_inputs(n, shapes, m, d, lq, p, dtype=torch.float64, lo=0.0, hi=1.0, seed=0, locations=None):
    """Random op inputs (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    gen = torch.Generator().manual_seed(seed)
    ss, lsi = level_index(shapes)
    s = int((ss[:, 0] * ss[:, 1]).sum())
    n_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    if locations is None:
        loc = torch.rand(n, lq, m, n_levels, p, 2, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    else:
        pool = torch.tensor(locations, dtype=torch.float64)
        pick = torch.randint(len(pool), (n, lq, m, n_levels, p, 2), generator=gen)
        loc = pool[pick]
    attn = torch.rand(n, lq, m, n_levels, p, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True).clamp_min(1e-6)
    return value.to(dtype), ss, lsi, loc.to(dtype), attn.to(dtype)


def reference64(value, ss, lsi, loc, attn, grad_out=None):
    """Float64 reference output (and gradients) from the given, possibly rounded, inputs."""
    args = (value.double(), ss, lsi, loc.double(), attn.double())
    out = ms_deform_attn_reference(*args)
    if grad_out is None:
        return out
    return out, ms_deform_attn_reference_backward(*args, grad_out.double())


def run_op(value, ss, lsi, loc, attn, grad_out):
    """Output and gradients of kernels.ms_deform_attn (through autograd, i.e. the registered backward)."""
    v = value.detach().clone().requires_grad_(True)
    lc = loc.detach().clone().requires_grad_(True)
    a = attn.detach().clone().requires_grad_(True)
    out = ms_deform_attn(v, ss, lsi, lc, a)
    out.backward(grad_out)
    return out, (v.grad, lc.grad, a.grad)


# Locations on and beyond the borders: the level edges (0, 1), just inside/outside them, far outside.
# -0.5 and 1.5 on a 1-pixel side sit exactly one pixel outside (x = -1, x = W): grid_sample keeps a gradient at -1.
BORDER_LOCATIONS = [
    0.0,
    1.0,
    1e-3,
    1 - 1e-3,
    -1e-3,
    1 + 1e-3,
    -0.07,
    1.07,
    -0.5,
    1.5,
    -0.6,
    1.6,
    -3.0,
    4.0,
    0.3,
    0.71,
]

CASES = {
    # name: (n, shapes, m, d, lq, p, extra kwargs for make_inputs)
    "d30-nonsquare": (2, [(6, 4), (3, 5), (2, 7)], 2, 30, 9, 3, {}),
    "d71": (1, [(5, 3), (4, 4)], 3, 71, 7, 2, {}),
    "d1025": (1, [(3, 4), (2, 2)], 2, 1025, 5, 2, {}),
    "batch0": (0, [(4, 6), (2, 3)], 2, 8, 5, 2, {}),
    "batch1-single-level": (1, [(7, 3)], 4, 16, 11, 4, {}),
    "batch80": (80, [(4, 6), (2, 3)], 2, 8, 6, 2, {}),
    "one-head-d-split": (1, [(9, 5), (3, 3)], 1, 64, 13, 3, {}),  # N*M = 1: backward splits D
    "beyond-borders": (2, [(5, 8), (3, 2), (1, 1)], 2, 12, 10, 3, {"lo": -0.5, "hi": 1.5}),
    "border-values": (2, [(4, 6), (3, 3), (1, 2)], 2, 9, 12, 4, {"locations": BORDER_LOCATIONS}),
}


@pytest.fixture(scope="session")
def cpu_kernel():
    """The C++ CPU extension, built (or loaded from the cache) once per session."""
    built = _build.availability("cpu")
    assert built.module is not None, f"CPU extension did not build: {built.reason}"
    return built.module


@pytest.fixture(autouse=True)
def fresh_backend_choice():
    """Each test starts with no backend chosen and leaves none behind (tests force different ones)."""
    reset_backends()
    yield
    reset_backends()


@pytest.fixture
def force(monkeypatch):
    """force(name) sets RELTAG_MSDA_BACKEND for this test only; the op's next call chooses with it."""

    def _force(name: str) -> None:
        monkeypatch.setenv(BACKEND_ENV, name)
        reset_backends()

    return _force


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_float64_reference(cpu_kernel, force, case, dtype):
    force("cpu")
    n, shapes, m, d, lq, p, extra = CASES[case]
    inputs = make_inputs(n, shapes, m, d, lq, p, dtype=dtype, seed=zlib.crc32(case.encode()) % 1000, **extra)
    grad_out = torch.randn(n, lq, m * d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = run_op(*inputs, grad_out.to(dtype))
    # reference from the same rounded inputs and output gradient
    exp_out, exp_grads = reference64(*inputs, grad_out.to(dtype))
    assert out.dtype == dtype and out.shape == (n, lq, m * d)
    assert_within(out, exp_out, FWD_TOL[dtype], f"{case}/{dtype} output")
    for name, got, exp in zip(("grad_value", "grad_locations", "grad_weights"), grads, exp_grads):
        assert got.dtype == dtype, f"{case}/{dtype} {name} has dtype {got.dtype}"
        assert_within(got, exp, BWD_TOL[dtype], f"{case}/{dtype} {name}")


@pytest.mark.parametrize("case", ["d30-nonsquare", "batch0", "border-values"])
def test_reference_backend_through_the_op_matches_autograd_of_reference(force, case):
    """The op's reference backend (explicit backward) equals autograd through grid_sample."""
    force("reference")
    n, shapes, m, d, lq, p, extra = CASES[case]
    inputs = make_inputs(n, shapes, m, d, lq, p, seed=3, **extra)
    grad_out = torch.randn(n, lq, m * d, dtype=torch.float64)
    out, grads = run_op(*inputs, grad_out)
    v, ss, lsi, loc, attn = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    exp = ms_deform_attn_reference(v, ss, lsi, loc, attn)
    exp.backward(grad_out)
    assert_within(out, exp, FWD_TOL[torch.float64], f"{case} output")
    for name, got, want in zip(("value", "locations", "weights"), grads, (v.grad, loc.grad, attn.grad)):
        assert_within(got, want, BWD_TOL[torch.float64], f"{case} grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["d30-nonsquare", "batch80", "beyond-borders"])
def test_reference_backend_computes_16bit_in_fp32(force, case, dtype):
    """The fallback (no compiler) meets the same 16-bit tolerances as the C++ kernel: it upcasts to fp32."""
    force("reference")
    n, shapes, m, d, lq, p, extra = CASES[case]
    inputs = make_inputs(n, shapes, m, d, lq, p, dtype=dtype, seed=1, **extra)
    grad_out = torch.randn(n, lq, m * d, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, grads = run_op(*inputs, grad_out)
    exp_out, exp_grads = reference64(*inputs, grad_out)
    assert out.dtype == dtype
    assert_within(out, exp_out, FWD_TOL[dtype], f"reference {case}/{dtype} output")
    for name, got, exp in zip(("grad_value", "grad_locations", "grad_weights"), grads, exp_grads):
        assert got.dtype == dtype
        assert_within(got, exp, BWD_TOL[dtype], f"reference {case}/{dtype} {name}")


@pytest.mark.compiler
def test_non_contiguous_inputs(cpu_kernel, force):
    force("cpu")
    value, ss, lsi, loc, attn = make_inputs(2, [(5, 4), (2, 3)], 3, 10, 6, 2, dtype=torch.float32, seed=5)
    # value as a transposed view [N, S, M, D] of [N, M, S, D]; locations / weights as strided slices
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = loc.repeat_interleave(2, dim=1)[:, ::2]
    attn_nc = attn.repeat_interleave(2, dim=1)[:, ::2]
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous() and not attn_nc.is_contiguous()
    grad_out = torch.randn(2, 6 * 2, 30)[:, ::2]  # non-contiguous output gradient too
    out, grads = run_op(value_nc, ss, lsi, loc_nc, attn_nc, grad_out)
    exp_out, exp_grads = reference64(value, ss, lsi, loc, attn, grad_out)
    assert_within(out, exp_out, FWD_TOL[torch.float32], "non-contiguous output")
    for got, exp in zip(grads, exp_grads):
        assert_within(got, exp, BWD_TOL[torch.float32], "non-contiguous gradient")


@pytest.mark.compiler
def test_cpu_kernel_is_built_with_openmp(cpu_kernel):
    # without -fopenmp, at::parallel_for in the extension silently runs on one thread (kernels/_build.py)
    assert cpu_kernel.built_with_openmp() is True


@pytest.mark.compiler
def test_cpu_kernel_result_does_not_depend_on_thread_count(cpu_kernel, force):
    force("cpu")
    inputs = make_inputs(1, [(9, 5), (3, 3)], 1, 64, 13, 3, dtype=torch.float64, seed=9)
    grad_out = torch.randn(1, 13, 64, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = run_op(*inputs, grad_out)
    finally:
        torch.set_num_threads(before)
    out2, grads2 = run_op(*inputs, grad_out)
    assert_within(out2, out1, FWD_TOL[torch.float64], "threads output")
    for a, b in zip(grads2, grads1):
        assert_within(a, b, BWD_TOL[torch.float64], "threads gradient")


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.compiler
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_double(cpu_kernel, force, backend):
    force(backend)
    value, ss, lsi, loc, attn = make_inputs(2, [(4, 5), (2, 3), (1, 1)], 2, 3, 4, 2, lo=-0.2, hi=1.2, seed=11)
    args = [t.requires_grad_(True) for t in (value, loc, attn)]

    def fn(v, lc, a):
        return ms_deform_attn(v, ss, lsi, lc, a)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.compiler
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(cpu_kernel, force, backend):
    force(backend)
    value, ss, lsi, loc, attn = make_inputs(2, [(4, 5), (3, 2)], 2, 6, 5, 2, dtype=torch.float32, seed=13)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    result = torch.library.opcheck(torch.ops.reltag.ms_deform_attn.default, (value, ss, lsi, loc, attn))
    assert set(result.values()) == {"SUCCESS"}, result


class _TinyDeformAttn(torch.nn.Module):
    """Smallest module around the op: offsets and weights predicted from the queries (test-only)."""

    def __init__(self, dim=16, heads=2, levels=2, points=2):
        super().__init__()
        self.h, self.l, self.p, self.dim = heads, levels, points, dim
        self.offsets = torch.nn.Linear(dim, heads * levels * points * 2)
        self.weights = torch.nn.Linear(dim, heads * levels * points)
        self.value = torch.nn.Linear(dim, dim)

    def forward(self, query, reference, feats, spatial_shapes, level_start_index):
        n, lq, _ = query.shape
        s = feats.shape[1]
        value = self.value(feats).view(n, s, self.h, self.dim // self.h)
        off = self.offsets(query).view(n, lq, self.h, self.l, self.p, 2).tanh() * 0.1
        loc = reference[:, :, None, None, None, :] + off
        w = self.weights(query).view(n, lq, self.h, self.l * self.p).softmax(-1)
        w = w.view(n, lq, self.h, self.l, self.p)
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc, w)


@pytest.mark.compiler
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(cpu_kernel, force):
    force("cpu")
    torch.manual_seed(0)
    mod = _TinyDeformAttn()
    ss, lsi = level_index([(6, 5), (3, 3)])
    feats = torch.randn(2, 39, 16)
    query = torch.randn(2, 7, 16)
    ref_pts = torch.rand(2, 7, 2)
    eager = mod(query, ref_pts, feats, ss, lsi)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True)
    out = compiled(query, ref_pts, feats, ss, lsi)
    out.sum().backward()
    assert_within(out, eager, FWD_TOL[torch.float32], "compiled output")
    for (name, p), g in zip(mod.named_parameters(), eager_grads):
        assert_within(p.grad, g, BWD_TOL[torch.float32], f"compiled grad {name}")


# ----------------------------------------------------------------------------------------------- dispatch


def test_forced_backend_that_cannot_run_raises_with_every_reason(force):
    force("cuda")
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 3)], 1, 4, 2, 1, dtype=torch.float32)
    for _ in range(2):  # nothing is registered after a failed choice: every call raises, with the reasons
        with pytest.raises(RuntimeError, match=r"RELTAG_MSDA_BACKEND=cuda cannot run on cpu") as info:
            ms_deform_attn(value, ss, lsi, loc, attn)
        msg = str(info.value)
        assert "reference: available" in msg and "cpu: " in msg, msg
        assert "cuda: inputs are on cpu, the CUDA kernel needs cuda tensors" in msg, msg
        assert backend_in_use("cpu") is None


class _CountingExtension:
    """Stands in for the built CPU extension: records calls, delegates to the real one."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def forward(self, *args):
        self.calls.append("forward")
        return self.ext.forward(*args)

    def backward(self, *args):
        self.calls.append("backward")
        return self.ext.backward(*args)


@pytest.fixture
def counting(cpu_kernel, monkeypatch):
    """(extension calls, backend choices): the CPU extension and dispatch.select_backend, both counted."""
    ext = _CountingExtension(cpu_kernel)
    monkeypatch.setitem(_build._attempts, "cpu", _build.Availability("cpu", ext, None))
    choices = []
    select = dispatch.select_backend

    def counted(device):
        choices.append(select(device))
        return choices[-1]

    monkeypatch.setattr(dispatch, "select_backend", counted)
    return ext.calls, choices


@pytest.mark.compiler
def test_backend_is_chosen_once_per_device_type_then_called_directly(counting, monkeypatch):
    """Without forcing, CPU inputs reach the C++ extension (forward and backward); the backend is chosen on
    the first call and registered, later calls do not consult the selector, an env change alone changes
    nothing, and reset_backends makes the next call choose again."""
    calls, choices = counting
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 4)], 2, 4, 3, 2, dtype=torch.float32, seed=4)
    assert backend_in_use("cpu") is None
    for _ in range(3):
        run_op(value, ss, lsi, loc, attn, torch.ones(1, 3, 8))
    assert choices == ["cpu"]
    assert calls == ["forward", "backward"] * 3
    assert backend_in_use("cpu") == "cpu"
    # the env var is read when the choice is made, not per call
    monkeypatch.setenv(BACKEND_ENV, "reference")
    run_op(value, ss, lsi, loc, attn, torch.ones(1, 3, 8))
    assert choices == ["cpu"] and len(calls) == 8
    reset_backends()
    out, grads = run_op(value, ss, lsi, loc, attn, torch.ones(1, 3, 8))
    run_op(value, ss, lsi, loc, attn, torch.ones(1, 3, 8))
    assert choices == ["cpu", "reference"] and len(calls) == 8
    assert backend_in_use("cpu") == "reference"
    exp_out, exp_grads = reference64(value, ss, lsi, loc, attn, torch.ones(1, 3, 8))
    assert_within(out, exp_out, FWD_TOL[torch.float32], "reference after reset")


@pytest.mark.compiler
def test_op_runs_the_backend_the_selector_chose(counting, monkeypatch):
    """The registered kernel is the chosen backend itself: a selector that answers "reference" while the
    C++ extension is available sends CPU inputs to the reference, forward and backward."""
    calls, choices = counting
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "select_backend", lambda device: choices.append("reference") or "reference")
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 4)], 2, 4, 3, 2, seed=6)
    grad_out = torch.randn(1, 3, 8, dtype=torch.float64)
    out, grads = run_op(value, ss, lsi, loc, attn, grad_out)
    run_op(value, ss, lsi, loc, attn, grad_out)
    assert calls == [] and choices == ["reference"]
    exp_out, exp_grads = reference64(value, ss, lsi, loc, attn, grad_out)
    assert_within(out, exp_out, FWD_TOL[torch.float64], "reference output")
    for got, exp in zip(grads, exp_grads):
        assert_within(got, exp, BWD_TOL[torch.float64], "reference gradient")


def test_unknown_forced_backend_is_rejected(force):
    force("triton")
    with pytest.raises(ValueError, match=r"RELTAG_MSDA_BACKEND='triton' is not one of reference, cpu, cuda"):
        dispatch.select_backend("cpu")
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 3)], 1, 4, 2, 1)
    with pytest.raises(ValueError, match=r"RELTAG_MSDA_BACKEND='triton'"):
        ms_deform_attn(value, ss, lsi, loc, attn)


def test_missing_compiler_falls_back_to_reference_and_says_so_once(monkeypatch, caplog):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(_build, "_attempts", {})  # no build tried; the built module is restored afterwards
    monkeypatch.setattr(dispatch, "_logged", set())
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 4)], 2, 4, 3, 2, seed=2)
    with caplog.at_level(logging.INFO, logger="kernels"):
        out1 = ms_deform_attn(value, ss, lsi, loc, attn)
        reset_backends()  # choosing again does not warn again
        out2 = ms_deform_attn(value, ss, lsi, loc, attn)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "falls back to the PyTorch reference" in warnings[0].getMessage()
    assert "no C++ compiler (/nonexistent/c++ is not on PATH)" in warnings[0].getMessage()
    assert backend_in_use("cpu") == "reference"
    expected = ms_deform_attn_reference(value, ss, lsi, loc, attn)
    assert_within(out1, expected, FWD_TOL[torch.float64], "fallback output")
    assert torch.equal(out1, out2)
    # forcing the C++ kernel without a compiler raises and gives the reason
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    reset_backends()
    with pytest.raises(RuntimeError, match=r"cpu: no C\+\+ compiler"):
        ms_deform_attn(value, ss, lsi, loc, attn)


def test_dispatch_and_op_use_only_public_names_of_build():
    """kernels/dispatch.py and kernels/op.py reach _build through its public surface only."""
    for module in (dispatch, kernels.op):
        tree = ast.parse(open(module.__file__).read())
        private = sorted(
            {
                node.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "_build"
                and node.attr.startswith("_")
            }
        )
        assert private == [], f"{module.__name__} reads _build.{private}"


def test_import_builds_nothing_and_cache_dir_is_settable(tmp_path):
    code = (
        "import sys, kernels\n"
        "from kernels import _build\n"
        "assert not _build._attempts, 'build attempted at import'\n"
        "assert kernels.backend_in_use('cpu') is None, 'backend chosen at import'\n"
        "assert not [m for m in sys.modules if m.startswith('reltag_msda')], 'extension imported'\n"
        "print(_build.cache_dir())\n"
    )
    env = {"RELTAG_KERNELS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------- validation


def test_validation_names_the_values():
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 4), (2, 2)], 2, 4, 3, 2)
    with pytest.raises(ValueError, match=r"attention_weights has shape \(1, 3, 2, 2, 3\), expected"):
        ms_deform_attn(value, ss, lsi, loc, torch.rand(1, 3, 2, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"value must be \[N, S, M, D\], got shape \(16, 2, 4\)"):
        ms_deform_attn(value[0], ss, lsi, loc, attn)
    with pytest.raises(ValueError, match=r"dtypes torch.float64, torch.float32, torch.float64"):
        ms_deform_attn(value, ss, lsi, loc.float(), attn)
    with pytest.raises(
        ValueError, match=r"spatial_shapes \[\[3, 4\], \[2, 3\]\] hold 18 positions but value has S = 16"
    ):
        ms_deform_attn(value, torch.tensor([[3, 4], [2, 3]]), lsi, loc, attn)
    with pytest.raises(ValueError, match=r"level_start_index\[1\] = 11 but levels 0..0 hold 12 positions"):
        ms_deform_attn(value, ss, torch.tensor([0, 11]), loc, attn)
    with pytest.raises(ValueError, match=r"level 0 has spatial shape \(0, 4\)"):
        ms_deform_attn(value[:, :4], torch.tensor([[0, 4], [2, 2]]), torch.tensor([0, 0]), loc, attn)


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernel_matches_float64_reference(force, case, dtype):
    force("cuda")
    n, shapes, m, d, lq, p, extra = CASES[case]
    inputs = make_inputs(n, shapes, m, d, lq, p, dtype=dtype, seed=zlib.crc32(case.encode()) % 1000, **extra)
    grad_out = torch.randn(n, lq, m * d, dtype=torch.float64).to(dtype)
    exp_out, exp_grads = reference64(*inputs, grad_out)
    dev = [t.cuda() for t in inputs]
    out, grads = run_op(*dev, grad_out.cuda())
    assert_within(out.cpu(), exp_out, FWD_TOL[dtype], f"cuda {case}/{dtype} output")
    for name, got, exp in zip(("grad_value", "grad_locations", "grad_weights"), grads, exp_grads):
        assert_within(got.cpu(), exp, BWD_TOL[dtype], f"cuda {case}/{dtype} {name}")
