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

--device cuda (one CUDA device; the same run measures both dtypes and the card's bandwidth): fp32 and bf16,
both shapes, forward and forward+backward, timed with CUDA events (median over repeats of the mean of
several back-to-back calls, baseline and candidate interleaved); the bf16 baseline is the reference in fp32
on the upcast inputs, cast back (grid_sample in 16 bits moves samples across pixel edges, see
kernels/op.py), so both produce bf16 from bf16 inputs. Parity against the float64 reference from the same
(rounded) inputs, with tests/test_kernels.py's fp32 / bf16 tolerances. Peak memory in-process
(max_memory_allocated after reset_peak_memory_stats is the call's own). Roofline: the fewest bytes each call
must move (inputs read once, outputs written once) over its time, against a device-to-device copy's
bandwidth measured at the start of the run (results/msda_cuda.json).

Usage: python benchmarks/bench_msda.py [--quick] [--device cpu|cuda] [--threads N] [--results-dir DIR]
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
sys.path.insert(0, ROOT)

from benchmarks.common import add_device_args, check_device, result_path  # noqa: E402

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 at strides 8, 16, 32, 64
HEADS, CHANNELS, POINTS = 8, 32, 4
SHAPES = {"encoder": {"n": 1, "lq": None}, "decoder": {"n": 16, "lq": 200}}  # lq None: Lq = S

# fp32 tolerance for parity of candidate vs baseline (same as tests/test_kernels.py FWD/BWD_TOL fp32):
# |a - b| <= atol * max(1, max|b|) + rtol * |b|
PARITY_TOL = {"output": (1e-5, 1e-5), "grad": (1e-4, 2e-5)}
# bf16 (CUDA only) against the float64 reference from the same rounded inputs: tests/test_kernels.py's
# FWD_TOL / BWD_TOL for torch.bfloat16 (one bf16 rounding of the output on top of fp32 accumulation).
PARITY_TOL_BF16 = {"output": (1.6e-2, 1.6e-2), "grad": (3e-2, 3e-2)}

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


def _force(backend: str) -> None:
    """Force the op's backend: set RELTAG_MSDA_BACKEND and have the op's next call choose with it."""
    import kernels

    os.environ[kernels.BACKEND_ENV] = backend
    kernels.reset_backends()


def _impl(which: str, device: str):
    import kernels

    if which == "candidate":
        _force(device)
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
        built = _build.availability(device)
        assert built.module is not None, built.reason
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
        "backend": kernels.backend_in_use(device) if which == "candidate" else "reference",
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
    _force(device)
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
        from benchmarks.common import gpu_info

        extra.update(gpu_info())
    return machine(**extra)


# ----------------------------------------------------------------------------------------------- CUDA mode


def _cast(args, dtype):
    """make_inputs' tensors with the floating ones in `dtype` (spatial shapes and level starts stay int64)."""
    return [t.to(dtype) if t.is_floating_point() else t for t in args]


def _reference_upcast(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Baseline for 16-bit inputs: the grid_sample reference in fp32 on the upcast inputs, cast back (what the
    reference backend does; grid_sample's pixel coordinates in 16 bits move samples across pixel edges)."""
    import kernels

    out = kernels.ms_deform_attn_reference(
        value.float(),
        spatial_shapes,
        level_start_index,
        sampling_locations.float(),
        attention_weights.float(),
    )
    return out.to(value.dtype)


def _cuda_impls(dtype) -> dict:
    import torch

    import kernels

    _force("cuda")
    baseline = kernels.ms_deform_attn_reference if dtype == torch.float32 else _reference_upcast
    return {"baseline": baseline, "candidate": kernels.ms_deform_attn}


def parity_cuda(shape: str, dtype) -> dict:
    """CUDA kernel vs the float64 reference from the same (rounded) inputs: output and the three gradients."""
    import torch

    import kernels

    args = _cast(make_inputs(shape, "cuda", seed=1), dtype)
    got = _call(_cuda_impls(dtype)["candidate"], args, backward=True)
    ref = _call(kernels.ms_deform_attn_reference, _cast(args, torch.float64), backward=True)
    tols = PARITY_TOL if dtype == torch.float32 else PARITY_TOL_BF16
    report = {}
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), got, ref):
        rtol, atol = tols["output" if name == "output" else "grad"]
        a, b = a.detach().double(), b.detach().double()
        scale = max(1.0, float(b.abs().max()))
        excess = float(((a - b).abs() - (atol * scale + rtol * b.abs())).max())
        report[name] = {
            "max_abs_diff": float((a - b).abs().max()),
            "max_abs_ref": float(b.abs().max()),
            "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-300)),
        }
        if not torch.isfinite(a).all():
            raise AssertionError(f"parity failed at {shape} {dtype} for {name}: non-finite values")
        if excess > 0:
            raise AssertionError(
                f"parity failed at {shape} {dtype} for {name}: {report[name]} (rtol {rtol}, atol {atol})"
            )
    report["tolerance"] = f"|a-b| <= atol*max(1,max|ref|) + rtol*|ref| against float64, {tols}"
    report["passed"] = True
    return report


def timings_cuda(shape: str, dtype, repeats: dict[str, int], inner: int) -> dict:
    """Median ms per call of baseline and candidate: each sample is `inner` back-to-back calls between two
    CUDA events (divided by inner), samples of baseline and candidate interleaved."""
    import torch

    impls = _cuda_impls(dtype)
    args = _cast(make_inputs(shape, "cuda"), dtype)
    res = {which: {"median_ms": {}, "all_ms": {}} for which in impls}
    for mode, backward in (("forward", False), ("forward_backward", True)):
        for impl in impls.values():
            for _ in range(2):  # warm-up: module load, allocator, autograd machinery
                _call(impl, args, backward)
        torch.cuda.synchronize()
        times = {which: [] for which in impls}
        for _ in range(repeats[mode]):
            for which, impl in impls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    _call(impl, args, backward)
                end.record()
                end.synchronize()
                times[which].append(start.elapsed_time(end) / inner)
        for which in impls:
            res[which]["median_ms"][mode] = round(statistics.median(times[which]), 4)
            res[which]["all_ms"][mode] = [round(t, 4) for t in times[which]]
    return res


def peak_cuda(which: str, shape: str, dtype, backward: bool) -> float:
    """MiB allocated above the inputs during one call (after a warm-up call), this process."""
    import torch

    impl = _cuda_impls(dtype)[which]
    args = _cast(make_inputs(shape, "cuda"), dtype)
    _call(impl, args, backward)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = _call(impl, args, backward)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return round(peak, 1)


def traffic_bytes(shape: str, elt: int) -> dict:
    """Bytes one call moves through device memory, per mode.

    compulsory: every input read once and every output written once (the roofline's floor). Forward reads
    value [N,S,M,D], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P] and writes the output [N,Lq,M*D];
    forward+backward adds reading grad_output and the three inputs again, writing the three gradients.
    gathered: every bilinear corner of every sample fetched from memory (4 x D values per sample; in the
    backward also added into grad_value): the traffic with no cache reuse at all, an upper bound.
    """
    s = sum(h * w for h, w in LEVELS)
    n = SHAPES[shape]["n"]
    lq = SHAPES[shape]["lq"] or s
    n_levels = len(LEVELS)
    value = n * s * HEADS * CHANNELS
    samples = n * lq * HEADS * n_levels * POINTS
    loc_attn = samples * 3  # 2 coordinates + 1 weight per sample
    out = n * lq * HEADS * CHANNELS
    fwd = value + loc_attn + out
    bwd = out + value + loc_attn + value + loc_attn  # grad_out, inputs again, then the three gradients
    corners = samples * 4 * CHANNELS
    return {
        "forward": {"compulsory": fwd * elt, "gathered": (corners + loc_attn + out) * elt},
        "forward_backward": {
            "compulsory": (fwd + bwd) * elt,
            "gathered": (corners + loc_attn + out + out + 2 * corners + 2 * loc_attn) * elt,
        },
    }


def cuda_main(opts) -> None:
    """--device cuda: fp32 and bf16, both shapes and modes, parity, peak memory, roofline; saves msda_cuda.json."""
    import torch

    from benchmarks.common import gpu_info, measure_copy_bandwidth

    quick = opts.quick
    repeats = {"forward": 5, "forward_backward": 3} if quick else {"forward": 15, "forward_backward": 10}
    inner = 5 if quick else 10
    load_before = os.getloadavg()
    bandwidth = measure_copy_bandwidth()
    bw = bandwidth["gb_per_s"] * 1e9
    print(f"device-to-device copy: {bandwidth['gb_per_s']:.0f} GB/s (read + write)", flush=True)
    per_dtype, roofline = {}, {}
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        elt = torch.empty(0, dtype=dtype).element_size()
        baseline = {"name": BASELINE_NAME, "median_ms": {}, "all_ms": {}, "peak_mb": {}}
        if dtype != torch.float32:
            baseline["name"] += ", on the inputs upcast to fp32, output cast back to bf16"
        candidate = {"name": CANDIDATE_NAME["cuda"], "median_ms": {}, "all_ms": {}, "peak_mb": {}}
        slots = {"baseline": baseline, "candidate": candidate}
        speedup, checks = {}, {}
        for shape in SHAPES:
            checks[shape] = parity_cuda(shape, dtype)  # first: also loads the extension
            res = timings_cuda(shape, dtype, repeats, inner)
            traffic = traffic_bytes(shape, elt)
            for which, slot in slots.items():
                for mode, backward in (("forward", False), ("forward_backward", True)):
                    key = f"{shape}_{mode}"
                    slot["median_ms"][key] = res[which]["median_ms"][mode]
                    slot["all_ms"][key] = res[which]["all_ms"][mode]
                    slot["peak_mb"][key] = peak_cuda(which, shape, dtype, backward)
                print(
                    f"{dname:8s} {shape:8s} {which:9s} fwd {res[which]['median_ms']['forward']:8.3f} ms  "
                    f"fwd+bwd {res[which]['median_ms']['forward_backward']:8.3f} ms  "
                    f"peak fwd +{slot['peak_mb'][shape + '_forward']:.0f} MB, "
                    f"fwd+bwd +{slot['peak_mb'][shape + '_forward_backward']:.0f} MB",
                    flush=True,
                )
            for mode in ("forward", "forward_backward"):
                key = f"{shape}_{mode}"
                speedup[key] = round(baseline["median_ms"][key] / candidate["median_ms"][key], 2)
                entry = {
                    "compulsory_bytes": traffic[mode]["compulsory"],
                    "gathered_bytes": traffic[mode]["gathered"],
                    "floor_ms": round(traffic[mode]["compulsory"] / bw * 1e3, 4),
                }
                for which, slot in slots.items():
                    t = slot["median_ms"][key] / 1e3
                    entry[which] = {
                        "median_ms": slot["median_ms"][key],
                        "compulsory_gb_per_s": round(traffic[mode]["compulsory"] / t / 1e9, 1),
                        "fraction_of_copy_bandwidth": round(traffic[mode]["compulsory"] / t / bw, 4),
                        "gathered_gb_per_s": round(traffic[mode]["gathered"] / t / 1e9, 1),
                    }
                roofline[f"{dname}_{key}"] = entry
        per_dtype[dname] = {
            "speedup": speedup["encoder_forward"],
            "speedups": speedup,
            "baseline": baseline,
            "candidate": candidate,
            "parity": checks,
        }
    fp32, bf16 = per_dtype["float32"], per_dtype["bfloat16"]
    enc = roofline["bfloat16_encoder_forward"]["candidate"]
    s = sum(h * w for h, w in LEVELS)
    result = {
        "name": "msda",
        "mode": "quick" if quick else "full",
        "device": "cuda",
        "dtype": "float32",
        "speedup": fp32["speedup"],
        "speedup_means": "fp32 encoder-shape forward: baseline median ms / candidate median ms, same run; every "
        "shape and mode in `speedups`, bf16 under `bfloat16`",
        "speedups": fp32["speedups"],
        "baseline": fp32["baseline"],
        "candidate": fp32["candidate"],
        "parity": fp32["parity"],
        "bfloat16": bf16,
        "peak_memory_means": "peak_mb: torch.cuda.max_memory_allocated above the inputs during one call after a "
        "warm-up call (reset_peak_memory_stats before it), in this process",
        "timing_means": f"median over repeats of (CUDA-event time of {inner} back-to-back calls) / {inner}, "
        "baseline and candidate samples interleaved",
        "copy_bandwidth": bandwidth,
        "roofline": roofline,
        "roofline_means": "per dtype, shape and mode: compulsory_bytes (inputs read once, outputs written once), "
        "gathered_bytes (every bilinear corner from memory, no cache reuse), floor_ms = compulsory_bytes / "
        "measured copy bandwidth; per implementation its compulsory GB/s and that as a fraction of the copy "
        "bandwidth",
        "shapes": shapes_record(s),
        "repeats": repeats,
        "inner_calls": inner,
        "load_average_1_5_15": load_record(load_before),
        "machine": machine_info("cuda"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {opts.out}")
    gpu = gpu_info()["gpu"]
    print(
        f"msda (cuda, {gpu}): CUDA kernel vs grid_sample reference, encoder shape: fp32 "
        f"{fp32['speedups']['encoder_forward']}x fwd / {fp32['speedups']['encoder_forward_backward']}x fwd+bwd, "
        f"bf16 {bf16['speedups']['encoder_forward']}x / {bf16['speedups']['encoder_forward_backward']}x "
        f"(decoder fp32 {fp32['speedups']['decoder_forward']}x / {fp32['speedups']['decoder_forward_backward']}x); "
        f"bf16 encoder fwd {enc['median_ms']:.3f} ms = {enc['compulsory_gb_per_s']:.0f} GB/s compulsory, "
        f"{100 * enc['fraction_of_copy_bandwidth']:.1f}% of the measured {bandwidth['gb_per_s']:.0f} GB/s copy"
    )


def shapes_record(s: int) -> dict:
    """The benchmarked shapes, as every result file records them."""
    return {"levels_hw": LEVELS, "S": s, "heads": HEADS, "channels": CHANNELS, "points": POINTS,
            "encoder": {"N": 1, "Lq": s}, "decoder": {"N": 16, "Lq": 200}}  # fmt: skip


def load_record(before) -> dict:
    """The 1/5/15-minute load averages before the run and now."""
    return {"before": [round(x, 2) for x in before], "after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 forward, 2 forward+backward)")
    add_device_args(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON (default RESULTS_DIR/msda.json, msda_cuda.json on cuda)",
    )
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "SHAPE", "MODE"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    check_device(ap, opts.device)
    opts.out = opts.out or result_path(opts.results_dir, "msda", opts.device)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    if opts.worker:
        print(json.dumps(memory_worker(*opts.worker, device=opts.device)))
        return

    import torch

    if opts.device == "cuda":
        cuda_main(opts)
        return
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
        "shapes": shapes_record(s),
        "repeats": repeats,
        "threads": threads,
        "load_average_1_5_15": load_record(load_before),
        "machine": machine_info(opts.device),
    }
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
