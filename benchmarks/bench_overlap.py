"""Stages side by side: the label-dataset flow with its stage threads vs the same flow one unit at a time.

Workload: a synthetic Objects365-like shard (benchmarks/synth.py) with human captions, the greedy tagger, and a
captioner whose cost is device-like: the oracle captioner wrapped so that each image costs a fixed sleep
(`--ms-per-image`), which waits without holding the CPU or the GIL, as a GPU captioner's generate call does.
Baseline: `run_in_process(stage_threads=1)`, every unit in sequence (reltag's flow before stages overlapped).
Candidate: the default, one thread per batch stage: batch b+1 is captioned while batch b is parsed, matched,
tagged and thresholded. Both write byte-identical triplets (asserted). The headline compares wall time with
the slowest stage's busy time (the floor for any overlap) and with the sum of the stages' busy times (what
sequential execution costs).

    python benchmarks/bench_overlap.py           # 600 images, 12 batches, 2 repeats
    python benchmarks/bench_overlap.py --quick   # 200 images, 8 batches, 1 repeat
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # first start migrates
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="reltag-bench-prefect-"))


class DeviceLikeCaptioner:
    """Wraps a captioner; every image costs `seconds` of sleep (the GIL is released, the CPU is idle)."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.name, self.revision, self.needs_pixels = inner.name, inner.revision, inner.needs_pixels

    def sampling(self) -> dict:
        return self.inner.sampling()

    def caption(self, images, pixels, seed):
        time.sleep(self.seconds * len(images))
        return self.inner.caption(images, pixels, seed)


def install_device_like_oracle(seconds: float) -> None:
    """Replace the oracle entry of the captioner registry in this process (benchmark only)."""
    import dataclasses

    import tasks.run.context as context
    import tasks.stages.caption as caption

    entry = caption.CAPTIONERS["oracle"]
    caption.CAPTIONERS["oracle"] = dataclasses.replace(
        entry, build=lambda cfg, captions_file: DeviceLikeCaptioner(entry.build(cfg, captions_file), seconds)
    )
    context.clear_process_resources()  # captioners are built once per process: drop the calibration's


def stage_seconds(out: str) -> dict[str, float]:
    """Busy seconds per stage, from the ledger records of one output root."""
    import json

    busy: dict[str, float] = {}
    for p in glob.glob(os.path.join(out, "*", "*", "_ledger", "*", "*", "*", "*.done.json")):
        stage = p.split("_ledger" + os.sep)[1].split(os.sep)[0]
        with open(p) as f:
            busy[stage] = busy.get(stage, 0.0) + float(json.load(f).get("seconds", 0.0))
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 images, 1 repeat")
    ap.add_argument("--ms-per-image", type=float, default=None, help="device-like caption cost per image")
    ap.add_argument("--results-dir", default=None, help="where NAME.json goes (default benchmarks/results)")
    args = ap.parse_args()
    n_images, batch, repeats = (200, 25, 1) if args.quick else (600, 50, 2)

    from benchmarks.common import PeakRSS, machine, save_result
    from benchmarks.synth import write_dataset
    from flows.label import run_in_process
    from flows.params import LabelParams
    from flows.status import find_runs
    from tasks.config import PipelineConfig, PlanConfig

    tmp = tempfile.mkdtemp(prefix="reltag-bench-overlap-")
    ds = write_dataset(os.path.join(tmp, "ds"), n_images, seed=21)
    cfg = PipelineConfig(dataset="bench", plan=PlanConfig(shard_size=n_images, batch_size=batch))

    def params(out):
        return LabelParams(
            annotations=ds["detections"],
            images=ds["images_root"],
            out=os.path.join(tmp, out),
            captions=ds["captions"],
            config=cfg,
        )

    # calibrate: the CPU stages' cost per image on this machine, measured sequentially without any sleep;
    # the device-like captioner then costs as much as all of them together (a GPU-bound captioning stage)
    run_in_process(params("warm"), stage_threads=1)  # server up, spaCy loaded
    t0 = time.perf_counter()
    run_in_process(params("calibrate"), stage_threads=1)
    cpu_busy = sum(v for k, v in stage_seconds(os.path.join(tmp, "calibrate")).items() if k != "caption")
    per_image = args.ms_per_image / 1000 if args.ms_per_image else cpu_busy / n_images
    calib_s = time.perf_counter() - t0
    install_device_like_oracle(per_image)

    seq, ovl, busy_seq, busy_ovl = [], [], [], []
    with PeakRSS() as mem:
        for r in range(repeats):
            t = time.perf_counter()
            run_in_process(params(f"seq-{r}"), stage_threads=1)
            seq.append(time.perf_counter() - t)
            busy_seq.append(stage_seconds(os.path.join(tmp, f"seq-{r}")))
            t = time.perf_counter()
            run_in_process(params(f"overlap-{r}"))
            ovl.append(time.perf_counter() - t)
            busy_ovl.append(stage_seconds(os.path.join(tmp, f"overlap-{r}")))
            a, b = (find_runs(os.path.join(tmp, f"{k}-{r}"))[0] for k in ("seq", "overlap"))
            if open(a.triplets(0), "rb").read() != open(b.triplets(0), "rb").read():
                raise SystemExit("overlapped and sequential runs wrote different triplets")
            print(f"repeat {r}: sequential {seq[-1]:.2f} s, overlapped {ovl[-1]:.2f} s", flush=True)
    s, o = statistics.median(seq), statistics.median(ovl)
    busy = {k: statistics.median(d[k] for d in busy_seq) for k in busy_seq[0]}
    if busy["caption"] < 0.9 * per_image * n_images:
        raise SystemExit(f"the device-like captioner was not used: caption busy {busy['caption']:.2f} s")
    slowest = max(busy.values())
    total = sum(busy.values())
    out = {
        "name": "overlap",
        "speedup": round(s / o, 3),
        "speedup_means": "wall time of the flow one unit at a time / with one thread per stage",
        "baseline": {"name": "label-dataset, stage_threads=1 (sequential units)", "median_s": round(s, 3),
                     "runs_s": [round(x, 3) for x in seq]},
        "candidate": {"name": "label-dataset, one thread per batch stage (overlapped)", "median_s": round(o, 3),
                      "runs_s": [round(x, 3) for x in ovl]},
        "stage_busy_s_sequential": {k: round(v, 3) for k, v in busy.items()},
        "stage_busy_s_overlapped": {k: round(statistics.median(d[k] for d in busy_ovl), 3) for k in busy_ovl[0]},
        "slowest_stage_s": round(slowest, 3),
        "sum_of_stages_s": round(total, 3),
        "caption_sleep_ms_per_image": round(per_image * 1000, 3),
        "calibration_s": round(calib_s, 3),
        "workload": {"images": n_images, "batch_size": batch, "batches": -(-n_images // batch),
                     "captions": ds["captions_n"], "boxes": ds["boxes"]},
        "peak_rss_mib": round(mem.peak_mib, 1),
        "quick": args.quick,
        "machine": machine(),
    }  # fmt: skip
    save_result("overlap", out, args.results_dir)
    print(
        f"overlap: {s / o:.2f}x wall time vs sequential stages ({o:.2f} s vs {s:.2f} s; slowest stage "
        f"{slowest:.2f} s, sum of stages {total:.2f} s, device-like captioner {per_image * 1000:.1f} ms/image)"
    )


if __name__ == "__main__":
    main()
