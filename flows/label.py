"""The labelling flows: `label-dataset` (plan -> every shard -> roll-up) and `label-shard` (stages per batch)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import LabelParams
from flows.progress import advance, show_progress
from flows.status import WRITE, is_finished, unwritten_shards
from storage.atomic import read_json, sweep_stale_temporaries
from storage.ledger import Ledger, Unit
from storage.manifest import PlanManifest
from tasks.run.context import RunContext, plan_manifest
from tasks.run.pipeline import run_batch_stage
from tasks.run.registry import batch_stages
from tasks.run.registry import stage as get_stage
from tasks.run.schedule import DONE, FAILED, BatchBoard, run_stage, worth_retrying
from tasks.stages.plan.start import plan_run
from tasks.stages.write import finalize_shard, rollup_stats


def _io_error_only(task, task_run, state) -> bool:
    """Retry on passing I/O errors only (tasks.run.schedule.worth_retrying); never on a full disk, a missing file,
    a model bug, a bad input or an out-of-memory error."""
    try:
        state.result()
    except BaseException as e:
        return worth_retrying(e)
    return False


def _on_accelerator(ctx: RunContext, name: str) -> bool:
    """Stages on a GPU take a slot of the Prefect global concurrency limit named "gpu" (a no-op if none exists)."""
    return get_stage(name).device(ctx.config) != "cpu"


_retry = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_io_error_only)


@task(name="plan", cache_policy=None, persist_result=False, **_retry)
def plan_task(params: LabelParams) -> RunContext:
    ctx, plan = plan_run(
        params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
    )
    log = get_run_logger()
    log.info(
        "run %s: %d images in %d shards (%s); stage keys %s",
        ctx.run_key,
        plan.counts.get("images_planned", 0),
        len(plan.shards),
        ctx.layout.base,
        ", ".join(f"{s}={k}" for s, k in ctx.stage_keys),
    )
    swept = sweep_stale_temporaries(ctx.layout.fs, ctx.layout.base)
    if swept:  # a killed run's half-written files (never read: a unit counts only once renamed and recorded)
        log.info("removed %d temporary file(s) left by a killed run, e.g. %s", len(swept), swept[0])
    return ctx


def _unit_logged(ctx: RunContext, stage: str, shard: int):
    """Per unit done: progress bar and one log line (from the worker's thread, not a future's callback,
    which would cost ~150 ms a unit reading its state)."""
    log = get_run_logger()

    def on_unit(batch: int, info: dict) -> None:
        advance(stage, info["items"], None if info.get("skipped") else info["seconds"])
        if info.get("skipped"):
            return
        secs = max(info["seconds"], 1e-9)
        log.info(
            "%s shard-%05d batch-%05d: %d images -> %d rows in %.2f s (%.1f images/s)",
            stage, shard, batch, info["items"], info["rows"], info["seconds"], info["items"] / secs,
        )  # fmt: skip

    return on_unit


@task(name="stage", task_run_name="{stage} shard-{shard:05d}", cache_policy=None, persist_result=False)
def stage_task(ctx: RunContext, stage: str, shard: int, board: BatchBoard) -> dict:
    """One stage over every batch of a shard, in order, each batch once its input is written (tasks.run.schedule).
    Fails, after going through every batch, when a unit failed; I/O errors are retried per unit in place."""
    log = get_run_logger()

    def run_unit(batch: int) -> dict:
        if _on_accelerator(ctx, stage):
            with concurrency("gpu", occupy=1):  # a slot of the "gpu" limit (no-op when none is defined)
                return run_batch_stage(ctx, stage, shard, batch)
        return run_batch_stage(ctx, stage, shard, batch)

    res = run_stage(board, stage, run_unit, _unit_logged(ctx, stage, shard))
    for b, err in res.failed:
        log.error("%s shard-%05d batch-%05d failed: %s", stage, shard, b, err)
    if res.failed:
        units = ", ".join(Unit(stage, shard, b).rel() for b, _ in res.failed)
        raise RuntimeError(f"{len(res.failed)} unit(s) failed: {units}")
    return {"stage": stage, "done": res.done, "not_run": res.not_run, "io_retries": res.io_retries}


@task(
    name="write-shard",
    task_run_name="write shard-{shard:05d}",
    cache_policy=None,
    persist_result=False,
    **_retry,
)
def write_shard_task(ctx: RunContext, shard: int, n_batches: int) -> dict:
    return finalize_shard(ctx, shard, n_batches)


def run_shard(ctx: RunContext, shard: int, n_batches: int, n_total: int, snap: dict[str, set[str]]) -> dict:
    """Every stage over every batch of one shard, then the shard's triplet file.

    One task run per stage (tasks.run.schedule): each takes the batches in order and starts batch b as soon as
    the stage above has written it, so with the flow's thread pool batch b+1 captions (on the GPU) while
    batch b is parsed, matched and thresholded (on the CPU). A unit that fails does not stop the others: its
    stage goes on with the next batch, the failed batch's later stages do not run. The shard's triplet file is
    written only when every unit is done; a RuntimeError lists the failed units otherwise, and a rerun redoes
    only what is not done. `snap` is one listing of the ledger, so finished units cost nothing at all.
    """
    if Unit(WRITE, shard).rel() in snap["done"]:
        for name in batch_stages():
            advance(name, n_total)
        return {"shard": shard, "skipped": True}
    bs = ctx.config.plan.batch_size
    done = {
        (n, b) for n in batch_stages() for b in range(n_batches) if Unit(n, shard, b).rel() in snap["done"]
    }
    for name, b in sorted(done):
        advance(name, min(bs, max(0, n_total - b * bs)))
    board = BatchBoard(batch_stages(), n_batches, done)
    # submitted in stage order: a worker waits only on the ones before it, so any pool size finishes
    futures = [
        stage_task.submit(ctx, name, shard, board) for name in batch_stages() if _has_work(board, name)
    ]
    for fut in futures:
        fut.wait()
    failed = [Unit(n, shard, b).rel() for n, b in board.units(FAILED)]
    if failed:
        raise RuntimeError(
            f"shard-{shard:05d}: {len(failed)} unit(s) failed: {', '.join(failed)}; rerun to redo them"
        )
    not_done = [
        Unit(n, shard, b).rel() for n in batch_stages() for b in range(n_batches) if board.state(n, b) != DONE
    ]
    if (
        not_done
    ):  # a worker stopped early (its error is in its task run); never write a shard with a unit missing
        errors = [str(f.state.message or f.state.name) for f in futures if not f.state.is_completed()]
        raise RuntimeError(
            f"shard-{shard:05d}: units did not run: {', '.join(not_done)} ({'; '.join(errors)}); rerun to redo them"
        )
    return write_shard_task(ctx, shard, n_batches)


def _has_work(board: BatchBoard, stage: str) -> bool:
    return any(board.state(stage, b) != DONE for b in range(board.n_batches))


#: one thread per batch stage: the stages of consecutive batches run side by side (see run_shard)
STAGE_THREADS = len(batch_stages())


@flow(
    name="label-shard",
    flow_run_name="label {params.dataset_name} shard-{shard:05d}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=STAGE_THREADS),
)
def label_shard(params: LabelParams, shard: int) -> dict:
    """Label one shard of a planned run (plans it first if needed): for spreading shards over workers."""
    ctx = plan_task(params)
    sh = plan_manifest(ctx).shard(shard)
    with show_progress(sh.images, batch_stages()):
        return run_shard(ctx, shard, sh.batches, sh.images, Ledger(ctx.layout).snapshot())


@flow(
    name="label-dataset",
    flow_run_name="label {params.dataset_name}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=STAGE_THREADS),
)
def label_dataset(params: LabelParams) -> dict:
    """Plan the dataset, label every shard, roll the statistics up. Safe to rerun after any crash."""
    t0 = time.perf_counter()
    ctx = plan_task(params)
    plan = plan_manifest(ctx)
    failures = []
    snap = Ledger(ctx.layout).snapshot()  # one listing for the whole run
    if is_finished(ctx.layout, plan, snap):
        get_run_logger().info("run %s is complete; nothing to do (%s)", ctx.run_key, ctx.layout.base)
        summary = read_json(ctx.layout.fs, ctx.layout.run_stats)
        publish(ctx, summary)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        start_pretraining(ctx, params.out)  # idempotent: a trigger lost to a crash is made up for here
        return summary
    with show_progress(plan.images, batch_stages()):
        for sh in plan.shards:
            try:
                run_shard(ctx, sh.shard, sh.batches, sh.images, snap)
            except Exception as e:
                failures.append(str(e))
    if failures:
        raise RuntimeError("; ".join(failures))
    summary = rollup(ctx, plan)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    start_pretraining(ctx, params.out)
    return summary


@flow(
    name="label-dataset-fanout",
    flow_run_name="label {params.dataset_name} over workers",
    log_prints=True,
)
def label_dataset_fanout(
    params: LabelParams, shard_deployment: str = "label-shard/label-shard", poll_seconds: float = 5.0
) -> dict:
    """Plan, then start one `label-shard` flow run per shard through its deployment, so that every worker of
    the pool takes shards; wait for all, roll the statistics up. Shards already written start nothing.

    Workers share units through leases (a shard's flow run can also meet units of another run of the same
    keys); a rerun of this flow after any failure starts only the shards that are not finished.
    """
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context
    from prefect.deployments import run_deployment

    t0 = time.perf_counter()
    ctx = plan_task(params)
    plan = plan_manifest(ctx)
    snap = Ledger(ctx.layout).snapshot()
    todo = unwritten_shards(plan, snap)
    log = get_run_logger()
    parent = get_run_context().flow_run.id
    started = {}
    for sh in todo:
        fr = run_deployment(
            shard_deployment,
            parameters={"params": params.model_dump(mode="json"), "shard": sh.shard},
            timeout=0,  # start it and go on: the shards run side by side on the pool's workers
            idempotency_key=f"{parent}-shard-{sh.shard:05d}",
        )
        started[sh.shard] = fr.id
        log.info("shard-%05d: flow run %s started through %s", sh.shard, fr.id, shard_deployment)
    failed = []
    with get_client(sync_client=True) as client:
        pending = dict(started)
        while pending:
            for shard, fr_id in list(pending.items()):
                fr = client.read_flow_run(fr_id)
                if fr.state is not None and fr.state.is_final():
                    del pending[shard]
                    if not fr.state.is_completed():
                        failed.append(f"shard-{shard:05d} ({fr.name}: {fr.state.name})")
            if pending:
                time.sleep(poll_seconds)
    if failed:
        raise RuntimeError(
            f"{len(failed)} shard flow run(s) did not complete: {', '.join(failed)}; rerun to redo them"
        )
    summary = rollup(ctx, plan)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    start_pretraining(ctx, params.out)
    return summary


def run_in_process(
    params: LabelParams, stage_threads: int | None = None, check_finished: bool = True
) -> dict:
    """Run `label-dataset` in this process, as `reltag run` does.

    stage_threads: threads for stage units (default one per batch stage, so the stages of consecutive batches
    overlap; 1 runs every unit in sequence). check_finished: answer a finished run from the ledger first
    (the CLI has already asked).

    Without a configured Prefect API (PREFECT_API_URL unset) Prefect starts a temporary server that lives
    and dies with this process; flow-run heartbeats are off there (flows.local.temporary_server_settings).
    """
    from flows.local import temporary_server_settings
    from flows.status import finished_summary

    t0 = time.perf_counter()
    done = finished_summary(params) if check_finished else None
    if done is not None:  # decided from the ledger: no Prefect server is started for nothing to do
        done["seconds"] = round(time.perf_counter() - t0, 3)
        return done
    flow_fn = label_dataset
    if stage_threads is not None:
        if stage_threads < 1:
            raise ValueError(f"stage_threads must be >= 1, got {stage_threads}")
        flow_fn = label_dataset.with_options(task_runner=ThreadPoolTaskRunner(max_workers=stage_threads))
    with temporary_server_settings():
        return flow_fn(params)


def rollup(ctx: RunContext, plan: PlanManifest) -> dict:
    """Merge every shard's stats into the run's `stats/<run_key>/run.json` (and its Parquet tables), then
    publish the run's audit as Prefect artifacts."""
    summary = rollup_stats(ctx, plan)
    publish(ctx, summary)
    return summary


def publish(ctx: RunContext, summary: dict) -> None:
    """The run's audit as Prefect artifacts (flows/artifacts.py). The statistics are already durable on disk;
    a failure to publish is logged, and does not fail the run."""
    from flows.artifacts import publish_run_artifacts

    layout = ctx.layout
    try:
        publish_run_artifacts(
            summary, layout.fs.unstrip_protocol(layout.path("report", f"{ctx.run_key}.html"))
        )
    except Exception as e:  # the API may be down; run.json holds everything the artifacts show
        get_run_logger().error("could not publish the run's artifacts: %s: %s", type(e).__name__, e)


def trigger_parameters(template, values: dict[str, str]):
    """The trigger's parameters with {run_key} {run_dir} {run_record} {out} {dataset} filled in (in every string,
    at any depth); other braces are left as they are."""
    if isinstance(template, str):
        for k, v in values.items():
            template = template.replace("{" + k + "}", v)
        return template
    if isinstance(template, dict):
        return {k: trigger_parameters(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [trigger_parameters(v, values) for v in template]
    return template


def start_pretraining(ctx: RunContext, out: str, via: str = "flow") -> str | None:
    """Start the config's `trigger` deployment for this finished run, once per run key: the flow run is
    created with idempotency_key = run key, so the server returns the existing flow run to every later call
    (a rerun of the finished run, a second worker finishing the same run, the event trigger). Returns its id.

    Does nothing without a trigger section, when the trigger is `via` the other path, or without a Prefect
    server (PREFECT_API_URL unset: the temporary server of `reltag run` dies with the process).
    """
    trig = ctx.config.trigger
    if trig is None or trig.via != via:
        return None
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    log = get_run_logger()
    if not PREFECT_API_URL.value():
        log.warning(
            "run %s: trigger %s skipped: no Prefect server (PREFECT_API_URL unset)",
            ctx.run_key,
            trig.deployment,
        )
        return None
    layout = ctx.layout
    values = {"run_key": ctx.run_key, "run_dir": layout.base, "run_record": layout.manifest, "out": out,
              "dataset": ctx.dataset}  # fmt: skip
    params = trigger_parameters(trig.parameters, values)
    try:
        fr = run_deployment(trig.deployment, parameters=params, timeout=0, idempotency_key=ctx.run_key)
    except Exception as e:
        raise RuntimeError(
            f"run {ctx.run_key} is complete ({layout.base}), but starting {trig.deployment} failed: "
            f"{type(e).__name__}: {e}; rerun to retry the trigger (it starts nothing twice)"
        ) from e
    log.info("run %s: %s flow run %s (%s)", ctx.run_key, trig.deployment, fr.name, fr.id)
    return str(fr.id)
