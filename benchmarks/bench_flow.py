"""Orchestration overhead of the Prefect flows, and the time to rerun a finished run.

Workload: a generated 1,000-image shard (4 batches) with 5 oracle captions per image, greedy overlap tagger:
the cheapest stages reltag has (~7 s per 1,000 images), so the flow's fixed cost weighs the most.

Three ways to run the same units on the same input, in the same process, each repeat in rotating order on
fresh output folders (so that a drift of the machine's speed falls on every side alike):

- `plain`:  a plain Python loop (`plan_run`, `run_batch_stage` per stage and batch, `finalize_shard`,
            `rollup_stats`); the baseline.
- `flow-1`: the `label-dataset` flow with one stage thread: the same units in the same order, plus Prefect.
- `flow`:   the `label-dataset` flow as `reltag run` runs it (one thread per stage, batches overlapping).

Measured per run: wall time; "compute", the wall time spent inside the functions the plain loop also runs
(plan_run, run_batch_stage, finalize_shard, rollup_stats; measured by wrapping them, on every side); this
process's CPU time and the temporary Prefect server's (a subprocess). The orchestration time of a sequential
run is its wall time minus its compute: what the flow adds (flow-run set-up, task runs, logs, artifacts),
without the run-to-run noise of the compute itself (+-15% on this 2-core machine, larger than the overhead).
Overheads are medians over repeats of paired differences.

Rerun of a finished run: in-process (`run_in_process`), and as a new `reltag run` process (Python start,
imports, the ledger check; Prefect is not started for nothing to do).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # first start migrates
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="reltag-bench-prefect-"))

BATCH_SIZE = 250


class Compute:
    """Wall time spent inside the wrapped functions (from any thread), summed; installed on the modules that
    call them, so the plain loop and the flows are measured alike."""

    NAMES = (("tasks.run.pipeline", "run_batch_stage"), ("tasks.stages.write", "finalize_shard"),
             ("tasks.stages.write", "rollup_stats"), ("tasks.stages.plan.start", "plan_run"),
             ("flows.label", "run_batch_stage"), ("flows.label", "finalize_shard"),
             ("flows.label", "rollup_stats"), ("flows.label", "plan_run"))  # fmt: skip

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()

    def install(self) -> None:
        import importlib

        modules = [
            importlib.import_module(mod) for mod, _ in self.NAMES
        ]  # all imported before any is wrapped
        wrapped = {}  # one wrapper per function, however many modules hold it: never counted twice
        for m, (_, name) in zip(modules, self.NAMES, strict=True):
            fn = getattr(m, name)
            setattr(m, name, wrapped.setdefault(id(fn), self._wrap(fn)))

    def _wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                with self._lock:
                    self.seconds += dt

        return timed

    def reset(self) -> None:
        with self._lock:
            self.seconds = 0.0


def plain_loop(params) -> None:
    """Every unit of the run, in order, then the run's statistics (run.json: the run is finished), without
    Prefect."""
    import tasks.run.pipeline as pipeline
    import tasks.stages.plan.start as planning
    import tasks.stages.write as write
    from tasks.run.registry import batch_stages

    ctx, plan = planning.plan_run(
        params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
    )
    for sh in plan.shards:
        for b in range(sh.batches):
            for stage in batch_stages():
                pipeline.run_batch_stage(ctx, stage, sh.shard, b)
        write.finalize_shard(ctx, sh.shard, sh.batches)
    write.rollup_stats(ctx, plan)


def _cpu(proc) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:  # the server process went away
        return 0.0


#: Seconds of rest before each measured run. The temporary server (SQLite) records the previous flow run's
#: task runs and events for a moment after it ends; an API write that meets those writes is refused
#: ("database is locked") and Prefect's client retries it after 2 s. Between `reltag run` processes (a new
#: server each) this never happens; back to back in one process it hit ~1 flow run in 16.
SETTLE_S = 1.0


def measure(fn, compute: Compute) -> dict:
    """Run fn() once: wall, compute, this process's CPU, the temporary server's CPU (seconds)."""
    import psutil

    time.sleep(SETTLE_S)
    me = psutil.Process()
    servers = me.children(recursive=True)
    gc.collect()  # each run starts without the garbage of the one before
    compute.reset()
    c0, s0 = _cpu(me), sum(_cpu(p) for p in servers)
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    return {
        "wall_s": round(wall, 4),
        "compute_s": round(compute.seconds, 4),
        "orchestration_s": round(wall - compute.seconds, 4),
        "cpu_s": round(_cpu(me) - c0, 3),
        "server_cpu_s": round(sum(_cpu(p) for p in servers) - s0, 3),
    }


def cli_rerun(ds: dict, out: str, shard_size: int) -> tuple[float, str]:
    """`reltag run` of a finished run, as a new process: seconds and its last line of output."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--annotations", ds["detections"], "--images",
           ds["images_root"], "--captions", ds["captions"], "--out", out, "--dataset", "bench",
           "--shard-size", str(shard_size), "--batch-size", str(BATCH_SIZE)]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"reltag run (rerun) failed with {p.returncode}: {p.stderr[-2000:]}")
    return dt, (p.stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 images instead of 1,000, 2 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    n_images = 300 if args.quick else 1000
    repeats = 2 if args.quick else args.repeats

    from benchmarks.common import machine, save_result
    from benchmarks.synth import write_dataset
    from flows.params import LabelParams
    from tasks.config import PipelineConfig, PlanConfig

    compute = Compute()
    compute.install()
    from flows.label import run_in_process  # what `reltag run` calls

    tmp = tempfile.mkdtemp(prefix="reltag-bench-flow-")
    ds = write_dataset(os.path.join(tmp, "ds"), n_images, seed=11)
    # the same shards, a second time: what a further shard of a many-shard run costs
    ds2 = write_dataset(os.path.join(tmp, "ds2"), 2 * n_images, seed=12)
    cfg = PipelineConfig(dataset="bench", plan=PlanConfig(shard_size=n_images, batch_size=BATCH_SIZE))

    def params(out, data=ds):
        return LabelParams(
            annotations=data["detections"],
            images=data["images_root"],
            out=os.path.join(tmp, out),
            captions=data["captions"],
            config=cfg,
        )

    sides = {
        "plain": lambda out: plain_loop(params(out)),
        "flow-1": lambda out: run_in_process(params(out), stage_threads=1, check_finished=False),
        "flow": lambda out: run_in_process(params(out), check_finished=False),
        "flow-1 x2": lambda out: run_in_process(params(out, ds2), stage_threads=1, check_finished=False),
    }
    # warm-up, one run of every side: starts the temporary server, loads spaCy, fills caches, so every side
    # measures the same work
    for name, fn in sides.items():
        fn(f"warm-{name}")

    runs: dict[str, list[dict]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            runs[name].append(measure(lambda fn=sides[name], out=f"{name}-{r}": fn(out), compute))
        print(json.dumps({"repeat": r, **{n: runs[n][-1] for n in sides}}), flush=True)

    # every side wrote the same triplets
    from flows.status import finished_summary

    triplets = {n: finished_summary(params(f"{n}-0"))["triplets"] for n in ("plain", "flow-1", "flow")}
    if len(set(triplets.values())) != 1:
        raise AssertionError(f"the sides wrote different triplet counts: {triplets}")

    rerun = []
    for r in range(repeats):
        t = time.perf_counter()
        run_in_process(params(f"flow-{r}"))
        rerun.append(time.perf_counter() - t)
    cli = [cli_rerun(ds, os.path.join(tmp, f"flow-{r}"), n_images) for r in range(min(3, repeats))]

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    def paired(a, b, key="wall_s"):
        """median over repeats of (a - b) / b, and the ratios themselves"""
        ratios = [(x[key] - y[key]) / y[key] for x, y in zip(runs[a], runs[b], strict=True)]
        return statistics.median(ratios), ratios

    base = med("plain", "wall_s")
    orch_extra = [x["orchestration_s"] - y["orchestration_s"] for x, y in zip(runs["flow-1"], runs["plain"])]
    orch_fraction = statistics.median(orch_extra) / base
    seq_fraction, seq_ratios = paired("flow-1", "plain")
    flow_fraction, flow_ratios = paired("flow", "plain")
    # a second shard in the same run: its orchestration cost (stage and write task runs, logs) vs the run's
    per_shard = [
        x["orchestration_s"] - y["orchestration_s"] for x, y in zip(runs["flow-1 x2"], runs["flow-1"])
    ]
    per_shard_s = statistics.median(per_shard)
    per_run_s = statistics.median(orch_extra) - per_shard_s
    cpu_extra = statistics.median(
        (x["cpu_s"] - x["compute_s"]) - (y["cpu_s"] - y["compute_s"])
        for x, y in zip(runs["flow-1"], runs["plain"])
    )
    import resource

    out = {
        "name": "flow",
        "speedup": round(base / med("flow", "wall_s"), 3),
        "speedup_means": "plain-loop wall time / `reltag run` flow wall time, medians (1.0 = no overhead)",
        "baseline": {
            "name": "plain Python loop over the same units (no Prefect)",
            "median_s": round(base, 3),
            "median_orchestration_s": round(med("plain", "orchestration_s"), 4),
            "runs": runs["plain"],
        },
        "candidate": {
            "name": "label-dataset flow as `reltag run` runs it (one thread per stage), temporary server up",
            "median_s": round(med("flow", "wall_s"), 3),
            "runs": runs["flow"],
        },
        "sequential_flow": {
            "name": "label-dataset flow with one stage thread (the plain loop's order, plus Prefect)",
            "median_s": round(med("flow-1", "wall_s"), 3),
            "median_orchestration_s": round(med("flow-1", "orchestration_s"), 4),
            "runs": runs["flow-1"],
        },
        "orchestration_overhead_fraction": round(orch_fraction, 4),
        "orchestration_overhead_means": "median over repeats of (flow-1 - plain) orchestration seconds "
        "(wall - compute), / plain-loop median wall",
        "orchestration_overhead_s": round(statistics.median(orch_extra), 4),
        "orchestration_per_further_shard_s": round(per_shard_s, 4),
        "orchestration_per_further_shard_fraction": round(per_shard_s / base, 4),
        "orchestration_per_further_shard_runs_s": [round(x, 4) for x in per_shard],
        "orchestration_per_run_s": round(per_run_s, 4),
        "two_shard_flow": {
            "name": f"label-dataset flow, one stage thread, 2 shards of {n_images} images",
            "median_s": round(med("flow-1 x2", "wall_s"), 3),
            "median_orchestration_s": round(med("flow-1 x2", "orchestration_s"), 4),
            "runs": runs["flow-1 x2"],
        },
        "orchestration_extra_cpu_s": round(cpu_extra, 3),
        "server_cpu_s_per_flow_run": round(med("flow-1", "server_cpu_s"), 3),
        "wall_overhead_fraction_sequential": round(seq_fraction, 4),
        "wall_overhead_fraction": round(flow_fraction, 4),
        "wall_overhead_ratios": [round(x, 4) for x in flow_ratios],
        "wall_overhead_ratios_sequential": [round(x, 4) for x in seq_ratios],
        "rerun_finished_run_s": {
            "in_process_median": round(statistics.median(rerun), 4),
            "in_process_runs": [round(x, 4) for x in rerun],
            "reltag_run_process_runs": [round(dt, 3) for dt, _ in cli],
            "reltag_run_output": cli[0][1],
        },
        "workload": {
            "images": n_images,
            "captions": ds["captions_n"],
            "boxes": ds["boxes"],
            "batches": -(-n_images // BATCH_SIZE),
            "triplets": triplets["flow"],
            "repeats": repeats,
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "quick": args.quick,
        "machine": machine(),
    }
    save_result("flow", out)
    print(
        f"flow: {base / med('flow', 'wall_s'):.2f}x the plain-loop speed on a {n_images}-image shard as reltag run "
        f"runs it (wall {100 * flow_fraction:+.1f}%, paired median of {repeats}; orchestration "
        f"{statistics.median(orch_extra):.2f} s a run = {100 * orch_fraction:.1f}% of a one-shard run, "
        f"{per_shard_s:+.3f} s per further shard; one stage thread {100 * seq_fraction:+.1f}%; rerun of a finished "
        f"run {max(dt for dt, _ in cli):.2f} s as a new reltag run process) vs plain Python loop"
    )


if __name__ == "__main__":
    main()
