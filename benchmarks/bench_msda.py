"""Multi-scale deformable attention: compiled kernel (C++ CPU, or CUDA) vs the grid_sample reference.

Baseline: kernels.ms_deform_attn_reference (F.grid_sample per level, autograd through it), which is what
runs on CPU without a compiled kernel. Candidate: kernels.ms_deform_attn with RELTAG_MSDA_BACKEND forced
to the device's kernel. Shapes (R-Tagger, 800x1333 input, ResNet strides 8/16/32/64 -> 100x167, 50x84,
25x42, 13x21, S = 22,223; M = 8 heads x D = 32, L = 4, P = 4):
  encoder: N = 1, Lq = S = 22,223 (one deformable self-attention layer)
  decoder: N = 16 query groups, Lq = 200, same value.
Forward (no grad) and forward+backward, median of repeats with baseline and candidate calls
interleaved (the machine may be shared). Peak memory separately, each implementation and shape in a
fresh subprocess so the peak is its own (CPU: peak RSS above the RSS after the inputs exist, sampled
every millisecond, plus the process's peak RSS (VmHWM); CUDA: torch.cuda.max_memory_allocated above the
inputs). Parity (output and the three gradients, fp32, same inputs) is asserted before the numbers are
saved.

Usage: python benchmarks/bench_msda.py [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "msda.json")

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 at strides 8, 16, 32, 64
HEADS, CHANNELS, POINTS = 8, 32, 4
SHAPES = {"encoder": {"n": 1, "lq": None}, "decoder": {"n": 16, "lq": 200}}  # lq None: Lq = S

# fp32 tolerance for parity of candidate vs baseline (same as tests/test_kernels.py FWD/BWD_TOL fp32):
# |a - b| <= atol * max(1, max|b|) + rtol * |b|
PARITY_TOL = {"output": (1e-5, 1e-5), "grad": (1e-4, 2e-5)}

BASELINE_NAME = "reference: F.grid_sample per level + autograd (kernels.ms_deform_attn_reference)"
CANDIDATE_NAME = {
    "cpu": "C++ CPU kernel (kernels.ms_deform_attn, RELTAG_MSDA_BACKEND=cpu)",
    "cuda": "CUDA kernel (kernels.ms_deform_attn, RELTAG_MSDA_BACKEND=cuda)",
}


def make_inputs(shape: str, device: str, seed: int = 0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
    shape "tiny" is a 2-level toy for warm-ups."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    levels = [(3, 5), (2, 2)] if shape == "tiny" else LEVELS
    ss = torch.tensor(levels, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    n = SHAPES[shape]["n"] if shape in SHAPES else 1
    lq = (SHAPES[shape]["lq"] or s) if shape in SHAPES else 4
    n_levels = len(levels)
    value = torch.randn(n, s, HEADS, CHANNELS, generator=gen)
    loc = torch.rand(n, lq, HEADS, n_levels, POINTS, 2, generator=gen)
    attn = torch.randn(n, lq, HEADS, n_levels * POINTS, generator=gen).softmax(-1)
    attn = attn.view(n, lq, HEADS, n_levels, POINTS)
    grad = torch.randn(n, lq, HEADS * CHANNELS, generator=gen)
    return [t.to(device) for t in (value, ss, lsi, loc, attn, grad)]


def _call(impl, args, backward: bool):
    import torch

    value, ss, lsi, loc, attn, grad = args
    if not backward:
        with torch.no_grad():
            return impl(value, ss, lsi, loc, attn)
    v, lc, a = (t.detach().requires_grad_(True) for t in (value, loc, attn))
    out = impl(v, ss, lsi, lc, a)
    out.backward(grad)
    return out, v.grad, lc.grad, a.grad


def _impl(which: str, device: str):
    import kernels

    if which == "candidate":
        os.environ[kernels.BACKEND_ENV] = device
        return kernels.ms_deform_attn
    return kernels.ms_deform_attn_reference


def _high_water_rss_mb() -> float:
    """Peak RSS of this process image. /proc VmHWM belongs to the address space, which exec replaces;
    ru_maxrss on Linux also carries the parent's RSS from before the fork, so it is only the fallback."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(which: str, shape: str, mode: str, device: str) -> dict:
    """Peak memory of one implementation, shape and mode, in this fresh process: the first call after the
    inputs exist (the extension is loaded beforehand; CUDA gets one warm-up), so nothing is reused from an
    earlier call of the same kind."""
    import torch

    import kernels
    from kernels import _build

    impl = _impl(which, device)
    backward = mode == "forward_backward"
    if which == "candidate":
        assert _build.get_extension(device) is not None, _build.extension_reason(device)
    # a tiny call first loads the Python-side machinery (op dispatch, autograd) of this implementation
    tiny = make_inputs("tiny", device)
    _call(impl, tiny, backward)
    del tiny
    args = make_inputs(shape, device)
    if device == "cuda":
        _call(impl, args, backward)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _call(impl, args, backward)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        from benchmarks.common import PeakRSS

        with PeakRSS() as rss:
            out = _call(impl, args, backward)
        peak = rss.mb
    del out
    return {
        "peak_mb": round(peak, 1),
        "max_rss_mb": round(_high_water_rss_mb(), 1),
        "backend": kernels.select_backend(device) if which == "candidate" else "reference",
    }


def timings(shape: str, device: str, repeats: dict[str, int]) -> dict:
    """Median ms of baseline and candidate, calls interleaved (B, C, B, C, ...) so that load changes on a
    shared machine hit both alike."""
    import torch

    impls = {which: _impl(which, device) for which in ("baseline", "candidate")}
    args = make_inputs(shape, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res = {which: {"median_ms": {}, "all_ms": {}} for which in impls}
    for mode, backward in (("forward", False), ("forward_backward", True)):
        for impl in impls.values():
            _call(impl, args, backward)  # warm-up
        sync()
        times = {which: [] for which in impls}
        for _ in range(repeats[mode]):
            for which, impl in impls.items():
                t0 = time.perf_counter()
                out = _call(impl, args, backward)
                sync()
                times[which].append((time.perf_counter() - t0) * 1e3)
                del out
        for which in impls:
            res[which]["median_ms"][mode] = round(statistics.median(times[which]), 2)
            res[which]["all_ms"][mode] = [round(t, 2) for t in times[which]]
    return res


def parity(shape: str, device: str) -> dict:
    """Candidate vs baseline on the same fp32 inputs: max abs difference per tensor, asserted."""

    import kernels

    args = make_inputs(shape, device, seed=1)
    os.environ[kernels.BACKEND_ENV] = device
    got = _call(kernels.ms_deform_attn, args, backward=True)
    ref = _call(kernels.ms_deform_attn_reference, args, backward=True)
    report = {}
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
        rtol, atol = PARITY_TOL["output" if name == "output" else "grad"]
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        scale = max(1.0, float(b.abs().max()))
        excess = float(((a - b).abs() - (atol * scale + rtol * b.abs())).max())
        report[name] = {"max_abs_diff": float((a - b).abs().max()), "max_abs_ref": float(b.abs().max())}
        if excess > 0:
            raise AssertionError(
                f"parity failed at {shape} for {name}: {report[name]} (rtol {rtol}, atol {atol})"
            )
    report["tolerance"] = (
        "fp32: |a-b| <= atol*max(1,max|ref|) + rtol*|ref|, output (1e-5, 1e-5), grads (1e-4, 2e-5)"
    )
    report["passed"] = True
    return report


def machine_info(device: str) -> dict:
    import torch

    from benchmarks.common import machine

    extra = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()}
    if device == "cuda":
        extra.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return machine(**extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 forward, 2 forward+backward)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--out", default=None, help="results JSON (default results/msda.json, msda_cuda.json on cuda)"
    )
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "SHAPE", "MODE"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    sys.path.insert(0, ROOT)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    if opts.worker:
        print(json.dumps(memory_worker(*opts.worker, device=opts.device)))
        return

    import torch

    repeats = {"forward": 3, "forward_backward": 2} if opts.quick else {"forward": 9, "forward_backward": 7}
    baseline = {"name": BASELINE_NAME, "median_ms": {}, "all_ms": {}, "peak_mb": {}, "max_rss_mb": {}}
    candidate = {
        "name": CANDIDATE_NAME[opts.device],
        "median_ms": {},
        "all_ms": {},
        "peak_mb": {},
        "max_rss_mb": {},
    }
    slots = {"baseline": baseline, "candidate": candidate}
    speedup, checks = {}, {}
    load_before = os.getloadavg()
    for shape in SHAPES:
        checks[shape] = parity(shape, opts.device)  # first: also builds / loads the extension
        res = timings(shape, opts.device, repeats)
        for which, slot in slots.items():
            for mode in ("forward", "forward_backward"):
                slot["median_ms"][f"{shape}_{mode}"] = res[which]["median_ms"][mode]
                slot["all_ms"][f"{shape}_{mode}"] = res[which]["all_ms"][mode]
            for mode in ("forward", "forward_backward"):
                cmd = [sys.executable, os.path.abspath(__file__), "--device", opts.device]
                cmd += ["--worker", which, shape, mode]
                if opts.threads:
                    cmd += ["--threads", str(opts.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    raise SystemExit(f"memory worker {which} {shape} {mode} failed:\n{done.stderr[-3000:]}")
                mem = json.loads(done.stdout.strip().splitlines()[-1])
                if which == "candidate" and mem["backend"] != opts.device:
                    raise SystemExit(f"candidate ran on backend {mem['backend']}, not {opts.device}")
                slot["peak_mb"][f"{shape}_{mode}"] = mem["peak_mb"]
                slot["max_rss_mb"][f"{shape}_{mode}"] = mem["max_rss_mb"]
            print(
                f"{shape:8s} {which:9s} fwd {res[which]['median_ms']['forward']:9.1f} ms  "
                f"fwd+bwd {res[which]['median_ms']['forward_backward']:9.1f} ms  "
                f"peak fwd +{slot['peak_mb'][shape + '_forward']:.0f} MB, "
                f"fwd+bwd +{slot['peak_mb'][shape + '_forward_backward']:.0f} MB",
                flush=True,
            )
        for mode in ("forward", "forward_backward"):
            key = f"{shape}_{mode}"
            speedup[key] = round(baseline["median_ms"][key] / candidate["median_ms"][key], 2)
    threads = torch.get_num_threads()

    s = 22223
    result = {
        "name": "msda",
        "mode": "quick" if opts.quick else "full",
        "device": opts.device,
        "dtype": "float32",
        "speedup": speedup["encoder_forward"],
        "speedup_means": "encoder-shape forward: baseline median ms / candidate median ms, same run; every shape "
        "and mode in `speedups`",
        "speedups": speedup,
        "baseline": baseline,
        "candidate": candidate,
        "peak_memory_means": (
            "peak_mb: peak RSS (CPU, sampled each ms) or max_memory_allocated (CUDA) above the level after the "
            "inputs exist, during one call in a fresh process; max_rss_mb: that process's peak RSS (VmHWM: "
            "torch, inputs and the call)"
        ),
        "parity": checks,
        "shapes": {
            "levels_hw": LEVELS,
            "S": s,
            "heads": HEADS,
            "channels": CHANNELS,
            "points": POINTS,
            "encoder": {"N": 1, "Lq": s},
            "decoder": {"N": 16, "Lq": 200},
        },
        "repeats": repeats,
        "threads": threads,
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "machine": machine_info(opts.device),
    }
    opts.out = opts.out or (
        RESULTS if opts.device == "cpu" else RESULTS.replace("msda.json", "msda_cuda.json")
    )
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {opts.out}")
    print(
        f"msda: {speedup['encoder_forward']}x forward, {speedup['encoder_forward_backward']}x forward+backward "
        f"at the encoder shape (N=1, S=Lq=22,223, M=8, D=32, L=4, P=4; decoder N=16 Lq=200: "
        f"{speedup['decoder_forward']}x / {speedup['decoder_forward_backward']}x) "
        f"{CANDIDATE_NAME[opts.device].split(' (')[0]} vs grid_sample reference, {opts.device}, "
        f"{threads} threads"
    )


if __name__ == "__main__":
    main()
