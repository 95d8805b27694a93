"""`reltag plan`, `run` and `demo`: plan a dataset, label it (the label-dataset flow), or label the bundled sample."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tasks.stages  # noqa: F401  (registers the built-in stages, which the help lists)
from flows.cli.common import EXAMPLES
from flows.cli.config_flags import _add_run_args, _params
from tasks.run.registry import stages


def cmd_plan(args) -> int:
    from tasks.stages.caption import uses_human_captions
    from tasks.stages.plan.start import plan_run, validate_captions

    p = _params(args, run=False)
    validate_captions(p.captions, p.config)
    # human captions name the run by their file's checksum: without the file, the plan alone
    record = p.captions is not None or not uses_human_captions(p.config.caption)
    ctx, plan = plan_run(
        p.annotations, p.images, p.out, p.captions, p.dataset_name, p.config, record_run=record
    )
    c = plan.counts
    counts = (
        f"{c.get('images_planned', 0)} images, {c.get('boxes_planned', 0)} boxes in {len(plan.shards)} shards; "
        f"{plan.quarantined} records quarantined"
    )
    if not record:
        print(
            f"plan {ctx.plan_key}: {counts}; no run recorded (captioner 'oracle' needs --captions to name it)"
        )
        print(f"plan: {ctx.layout.plan_manifest}")
        return 0
    print(f"run key {ctx.run_key} (plan {ctx.plan_key}): {counts}")
    print(f"plan: {ctx.layout.plan_manifest}")
    print(f"run:  {ctx.layout.manifest}")
    return 0


#: exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it)
TERMINATED = 143


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill`, a pod's eviction) stops the run cleanly: the main thread raises
    SystemExit(143), so the flow unwinds, units in flight finish and are recorded (queued ones never start,
    and anything cut short has no ledger record), and Prefect's temporary server is shut down with the process.
    A second SIGTERM ends the process at once (still safe: nothing unrecorded is ever read as done)."""
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, lambda *_: os._exit(TERMINATED))
        print(
            "reltag run: SIGTERM: stopping; units in flight finish or stay unrecorded, "
            "rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(TERMINATED)

    signal.signal(signal.SIGTERM, stop)


def _run(params, stage_threads: int | None = None) -> int:
    from flows.status import finished_summary

    summary = finished_summary(params)  # a finished run is answered from the ledger, before Prefect loads
    if summary is None:
        from tasks.stages.plan.start import validate_captions

        validate_captions(
            params.captions, params.config
        )  # before Prefect: a bad file is one line, not retried

        from tasks.stages.plan.start import plan_run

        # plan here, before Prefect starts: a bad detection or captions file is one line and exit 2, not a
        # failed flow run (the flow's plan task then finds the plan and the run record written)
        plan_run(
            params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
        )
        from flows.label import run_in_process

        summary = run_in_process(params, stage_threads, check_finished=False)  # checked just above
    print(
        f"done: {summary['triplets']} triplets on {summary['images_with_triplets']}/{summary['images']} images "
        f"in {summary['shards']} shard(s), run key {summary['run_key']}"
    )
    print(f"output: {summary['output']}")
    return 0


def cmd_run(args) -> int:
    return _run(_params(args), args.stage_threads)


def cmd_demo(args) -> int:
    sample = Path(args.sample or EXAMPLES)
    det = sample / "sample_detections.json"
    if not det.exists():
        raise ValueError(f"no sample at {det} (run from a source checkout, or pass --sample DIR)")
    args.annotations, args.captions, args.images = (
        str(det),
        str(sample / "sample_captions.json"),
        str(sample / "images"),
    )
    return _run(_params(args, dataset="sample" if args.dataset is None else None), args.stage_threads)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="validate the detection file, check the images' headers and cut it into shards",
        description="Stream the detection JSON, quarantine bad records, check every image's header, write "
        "<out>/<dataset>/<plan-key>/plan.json and images/shard-*.parquet; with the captions a human-caption "
        "run needs (or a model captioner), also record the run in runs/<run-key>.json and print its key. "
        "Idempotent.",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "run",
        help="label a dataset: " + ", ".join(["plan", *(s.name for s in stages())]),
        description="Run the label-dataset flow and print `output: <root>/<dataset>/<plan-key>`. Rerunning the "
        "same command after a crash resumes: finished batches are skipped, the rest redone.",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample (examples/)",
        description="The same pipeline as `run`, on five bundled photographs with oracle captions "
        "and the greedy overlap tagger (no model weights needed).",
    )
    _add_run_args(p, inputs=False)
    p.add_argument(
        "--sample", metavar="DIR",
        help="the sample folder: sample_detections.json, sample_captions.json, images/ (default: examples/)",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)
