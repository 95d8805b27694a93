"""What every benchmark shares: its --device / --results-dir options, the machine it ran on, peak memory,
and the GPU-side measurements (copy bandwidth, GPU utilisation, image-decode throughput)."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Where results are saved unless --results-dir says otherwise (the committed numbers live here).
RESULTS_DIR = os.path.join(HERE, "results")
#: The bundled sample images (examples/images) that the decode-throughput measurement cycles through.
IMAGES_DIR = os.path.join(ROOT, "examples", "images")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture name where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra) -> dict:
    """CPU, cores, memory, Python, torch and its threads, load average; `extra` adds benchmark-specific fields."""
    import psutil

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return {**info, **extra}


def save_result(name: str, result: dict, results_dir: str | None = None) -> str:
    """Write RESULTS_DIR/NAME.json (or results_dir/NAME.json); returns its path."""
    folder = results_dir or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled by a thread.

    After the block: `peak` (bytes), `start` (bytes at entry), `mb` (peak above entry, MiB), `peak_mib`.
    """

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval_s
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


# ----------------------------------------------------------------------------------------------- options


def add_device_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark shares: --device cpu|cuda (default cpu) and --results-dir DIR."""
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default: the committed CPU numbers) or cuda (one CUDA device; results saved as NAME_cuda.json)",
    )
    ap.add_argument(
        "--results-dir",
        default=RESULTS_DIR,
        metavar="DIR",
        help=f"folder the result JSON is written to (default {os.path.relpath(RESULTS_DIR, ROOT)})",
    )


def cuda_unavailable_reason() -> str | None:
    """Why this process cannot use a CUDA device, or None when it can."""
    import torch

    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def check_device(ap: argparse.ArgumentParser, device: str) -> None:
    """Exit with code 2 and one line on stderr when `device` is cuda and no CUDA device can be used."""
    if device == "cuda":
        why = cuda_unavailable_reason()
        if why:
            ap.exit(
                2, f"{ap.prog}: error: --device cuda: {why}; run without --device (cpu) or on a GPU machine\n"
            )


def result_path(results_dir: str, name: str, device: str) -> str:
    """RESULTS/NAME.json on cpu, RESULTS/NAME_cuda.json on cuda (the CPU file is never overwritten by a GPU run)."""
    return os.path.join(results_dir, f"{name}.json" if device == "cpu" else f"{name}_{device}.json")


def gpu_info() -> dict:
    """Name, memory, multiprocessors, capability, CUDA and driver versions of CUDA device 0."""
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:  # the driver version through NVML (nvidia-ml-py), where present
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:  # NVML is optional: say why it is missing
        info["driver"] = f"unknown ({type(e).__name__}: {e})"
    return info


# ----------------------------------------------------------------------------------------------- GPU side


def measure_copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth of CUDA device 0, counting bytes read plus bytes written.

    The roofline's memory ceiling measured in the same run (METHOD: measure the ceilings, do not take the
    datasheet's). Random bytes (never zeros), 3 warm-ups, median of `repeats` timed with CUDA events.
    """
    import torch

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    med = statistics.median(times)
    return {
        "bytes_copied": nbytes,
        "median_s": med,
        "all_s": times,
        "gb_per_s": round(2 * nbytes / med / 1e9, 1),
        "means": "2 x bytes copied (read + write) / median time of one device-to-device copy (CUDA events)",
    }


class GpuUtilisation:
    """Mean GPU utilisation (NVML: % of time a kernel was running) sampled by a thread while the block runs.

    Re-entrant: every `with` block adds its samples. After a block: `samples` (list of %), `mean` (None when
    NVML is not available: `error` says why).
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval = interval_s
        self.samples: list[int] = []
        self.error: str | None = None

    def _poll(self):
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append(int(torch.cuda.utilization()))
            except Exception as e:  # pynvml missing or NVML refused: recorded, the benchmark goes on
                self.error = f"{type(e).__name__}: {e}"
                return
            time.sleep(self.interval)

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None

    def report(self) -> dict:
        return {
            "nvml_mean_percent": self.mean,
            "nvml_samples": len(self.samples),
            "nvml_error": self.error,
            "nvml_means": "torch.cuda.utilization() every 50 ms: % of the sample period in which a kernel ran",
        }


def kernel_busy_time(fn: Callable[[], object], cuda: bool = True) -> dict:
    """One call of `fn` under torch.profiler: the time CUDA kernels / copies / memsets ran (union of their
    intervals, from the Chrome trace), and the profiled wall time. Divide `busy_s` by an unprofiled wall time
    for the GPU's busy fraction (the profiler slows the host side, not the kernels). `cuda=False` profiles
    the CPU side only (no GPU events: busy_s 0; what the tests can run without a GPU)."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    )
    busy, n_kernels, end = 0.0, len(spans), None
    for a, b in spans:  # union of intervals (µs)
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return {"busy_s": busy / 1e6, "profiled_wall_s": wall, "gpu_events": n_kernels}


# ----------------------------------------------------------------------------------------------- decoding


def bundled_images() -> list[str]:
    """Paths of the bundled sample images (examples/images), sorted."""
    names = sorted(n for n in os.listdir(IMAGES_DIR) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    return [os.path.join(IMAGES_DIR, n) for n in names]


class _DecodeSet:
    """Map-style dataset: item i decodes file i mod len(files) from its bytes with PIL and preprocesses it."""

    def __init__(self, blobs: list[bytes], n: int, preprocess: Callable):
        self.blobs, self.n, self.preprocess = blobs, n, preprocess

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])).convert("RGB")
        return self.preprocess(img)


def _as_list(items):
    """Collate to a list: preprocessed images keep their own sizes (the tagger keeps the aspect ratio)."""
    return list(items)


def decode_throughput(
    preprocess: Callable,
    n_images: int | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    files: list[str] | None = None,
) -> dict:
    """Images/s the decode side sustains: PIL decode of the bundled images (bytes in memory, so the disk is
    out of it) + `preprocess` (resize / normalise to the model's input tensor), in DataLoader worker
    processes, one per core by default. The first batch (worker start-up) is not timed.

    Args:
        preprocess: PIL RGB image -> Tensor[3, H, W]; picklable (module-level function or partial).
        n_images: images decoded in all (default 48 per worker).
        workers: DataLoader worker processes (default os.cpu_count(); 0 decodes in this process).
    """
    from torch.utils.data import DataLoader

    files = files or bundled_images()
    workers = (os.cpu_count() or 1) if workers is None else workers
    n_images = n_images or 48 * max(1, workers)
    blobs = []
    for path in files:
        with open(path, "rb") as f:
            blobs.append(f.read())
    loader = DataLoader(
        _DecodeSet(blobs, n_images, preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=4 if workers else None,
        # spawned, not forked: a fork of a process with live threads (a CUDA context, Prefect's clients, a
        # test session's) can die at start; the start-up is not timed (the first batch is skipped)
        multiprocessing_context="spawn" if workers else None,
    )
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    count = 0
    for batch in it:
        count += len(batch)
    dt = time.perf_counter() - t0
    return {
        "images_per_s": round(count / dt, 1) if dt > 0 else None,
        "images_timed": count,
        "seconds": round(dt, 3),
        "workers": workers,
        "cores": os.cpu_count(),
        "output_shapes": sorted({tuple(t.shape) for t in first}),
        "files": [os.path.basename(p) for p in files],
        "mean_file_kb": round(sum(len(b) for b in blobs) / len(blobs) / 1024, 1),
        "means": "PIL decode (from bytes) + resize/normalise to the model input, DataLoader workers, first "
        "batch excluded",
    }
