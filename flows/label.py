"""The labelling flows: `label-dataset` (plan -> every shard -> roll-up) and `label-shard` (stages per batch)."""

from __future__ import annotations

import time

from prefect import allow_failure, flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import LabelParams
from flows.progress import advance, show_progress
from flows.status import WRITE, is_finished, unwritten_shards
from storage.atomic import read_json, sweep_stale_temporaries, write_json
from storage.ledger import Ledger, Unit
from storage.manifest import PlanManifest
from tasks.context import plan_manifest
from tasks.pipeline import RunContext, finalize_shard, merge_stats, run_batch_stage
from tasks.plan_run import plan_run
from tasks.stages import BATCH_STAGES
from tasks.stages import stage as get_stage


def _io_error_only(task, task_run, state) -> bool:
    """Retry on I/O errors only; never around a model bug, a bad input or an out-of-memory error."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
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


@task(
    name="stage",
    task_run_name="{stage} shard-{shard:05d} batch-{batch:05d}",
    cache_policy=None,
    persist_result=False,
    **_retry,
)
def stage_task(ctx: RunContext, stage: str, shard: int, batch: int) -> dict:
    if _on_accelerator(ctx, stage):
        with concurrency("gpu", occupy=1):  # a slot of the "gpu" limit (no-op when none is defined)
            info = run_batch_stage(ctx, stage, shard, batch)
    else:
        info = run_batch_stage(ctx, stage, shard, batch)
    # progress from the worker thread (a future's done-callback that reads its state costs ~150 ms a unit)
    advance(stage, info["items"], None if info.get("skipped") else info["seconds"])
    if not info.get("skipped"):
        secs = max(info["seconds"], 1e-9)
        get_run_logger().info(
            "%s shard-%05d batch-%05d: %d images -> %d rows in %.2f s (%.1f images/s)",
            stage,
            shard,
            batch,
            info["items"],
            info["rows"],
            info["seconds"],
            info["items"] / secs,
        )
    return info


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
    """Every stage over every batch of one shard (as Prefect tasks), then the shard's triplet file.

    Stages of consecutive batches overlap: a unit waits for its input (the previous stage, same batch) and
    for the same stage's previous batch (so each stage runs one batch at a time, in order, and holds at most
    one batch in flight), nothing else; with the flow's thread pool, batch b+1 captions (on the GPU) while
    batch b is parsed, matched and thresholded (on the CPU). A unit that fails does not stop the others: the
    same stage goes on with the next batch (its wait ignores failure), the failed batch's later stages do not
    run. The shard's triplet file is written only when every unit is done; a RuntimeError lists the failed
    units otherwise, and a rerun redoes only what is not done. `snap` is one listing of the ledger, so
    finished units cost no task run at all.
    """
    log = get_run_logger()
    if Unit(WRITE, shard).rel() in snap["done"]:
        for name in BATCH_STAGES:
            advance(name, n_total)
        return {"shard": shard, "skipped": True}
    bs = ctx.config.plan.batch_size
    n_images = {b: min(bs, max(0, n_total - b * bs)) for b in range(n_batches)}
    futures: dict[tuple[str, int], object] = {}
    for b in range(n_batches):
        for i, name in enumerate(BATCH_STAGES):
            if Unit(name, shard, b).rel() in snap["done"]:
                advance(name, n_images[b])
                continue
            deps = []
            if i and (BATCH_STAGES[i - 1], b) in futures:
                deps.append(futures[(BATCH_STAGES[i - 1], b)])  # its input; a failure there stops this unit
            if (name, b - 1) in futures:
                deps.append(allow_failure(futures[(name, b - 1)]))  # in order, one batch at a time
            futures[(name, b)] = stage_task.submit(ctx, name, shard, b, wait_for=deps)
    failed = []
    for (name, b), fut in futures.items():
        fut.wait()
        if fut.state.is_failed():  # recorded in the ledger by run_batch_stage; the others went on
            try:
                fut.result()
            except Exception as e:
                log.error("%s shard-%05d batch-%05d failed: %s: %s", name, shard, b, type(e).__name__, e)
            failed.append(Unit(name, shard, b).rel())
    if failed:
        raise RuntimeError(
            f"shard-{shard:05d}: {len(failed)} unit(s) failed: {', '.join(failed)}; rerun to redo them"
        )
    not_run = [Unit(n, shard, b).rel() for (n, b), f in futures.items() if not f.state.is_completed()]
    if not_run:  # cannot happen without a failure above; never write a shard with a unit missing
        raise RuntimeError(f"shard-{shard:05d}: units did not run: {', '.join(not_run)}; rerun to redo them")
    return write_shard_task(ctx, shard, n_batches)


#: one thread per batch stage: the stages of consecutive batches run side by side (see run_shard)
STAGE_THREADS = len(BATCH_STAGES)


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
    with show_progress(sh.images, BATCH_STAGES):
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
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        start_pretraining(ctx, params.out)  # idempotent: a trigger lost to a crash is made up for here
        return summary
    with show_progress(plan.images, BATCH_STAGES):
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
    and dies with this process; flow-run heartbeats (which let a real server mark a crashed run) then serve
    nothing and cost about a second per flow run (Prefect joins its heartbeat thread, which sleeps in 1 s
    steps), so they are switched off. With a real server, Prefect's settings are left as they are.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

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
    if PREFECT_API_URL.value():
        return flow_fn(params)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return flow_fn(params)


def rollup(ctx: RunContext, plan: PlanManifest) -> dict:
    """Merge every shard's stats into the run's `stats/<run_key>/run.json`."""
    layout = ctx.layout
    shard_stats = [read_json(layout.fs, layout.shard_stats(sh.shard)) for sh in plan.shards]
    stages = {}
    for name in BATCH_STAGES:
        stages[name] = merge_stats([s["stages"][name] for s in shard_stats], name)
    summary = {
        "run_key": ctx.run_key,
        "dataset": ctx.dataset,
        "output": layout.base,
        "shards": len(shard_stats),
        "images": sum(s["images"] for s in shard_stats),
        "triplets": sum(s["triplets"] for s in shard_stats),
        "images_with_triplets": sum(s["images_with_triplets"] for s in shard_stats),
        "plan_key": ctx.plan_key,
        "stage_keys": dict(ctx.stage_keys),
        "plan": plan.counts,
        "stages": stages,
    }
    write_json(layout.fs, layout.run_stats, summary)
    return summary


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
