"""The labelling flows: `label-dataset` (plan -> every shard -> roll-up) and `label-shard` (stages per batch)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency

from flows.params import LabelParams
from flows.progress import advance, show_progress
from storage.atomic import read_json, sweep_stale_temporaries, write_json
from storage.layout import BATCH_STAGES
from storage.ledger import Ledger, Unit
from tasks.pipeline import RunContext, finalize_shard, merge_stats, run_batch_stage
from tasks.plan_run import plan_run


def _io_error_only(task, task_run, state) -> bool:
    """Retry on I/O errors only; never around a model bug, a bad input or an out-of-memory error."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


def _on_accelerator(ctx: RunContext, stage: str) -> bool:
    """Stages on a GPU take a slot of the Prefect global concurrency limit named "gpu" (a no-op if none exists)."""
    cfg = ctx.config
    return (stage == "caption" and cfg.caption.device != "cpu") or (
        stage == "tag" and cfg.tag.device != "cpu"
    )


_retry = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_io_error_only)


@task(name="plan", cache_policy=None, persist_result=False, **_retry)
def plan_task(params: LabelParams) -> RunContext:
    ctx, manifest = plan_run(
        params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
    )
    log = get_run_logger()
    log.info(
        "run %s: %d images in %d shards (%s)",
        ctx.run_key,
        manifest["counts"].get("images_planned", 0),
        len(manifest["shards"]),
        ctx.layout.base,
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
        with concurrency("gpu", occupy=1):
            info = run_batch_stage(ctx, stage, shard, batch)
    else:
        info = run_batch_stage(ctx, stage, shard, batch)
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

    A batch that fails does not stop the others; the shard's triplet file is only written when every batch
    is done, and a RuntimeError lists the failed units when any is not. Rerunning redoes only those.
    `snap` is one listing of the ledger, so finished units cost no task run at all.
    """
    log = get_run_logger()
    if Unit("write", shard).rel() in snap["done"]:
        for stage in BATCH_STAGES:
            advance(stage, n_total)
        return {"shard": shard, "skipped": True}
    failed = []
    bs = ctx.config.plan.batch_size
    n_images = {b: min(bs, max(0, n_total - b * bs)) for b in range(n_batches)}
    for b in range(n_batches):
        for stage in BATCH_STAGES:
            if Unit(stage, shard, b).rel() in snap["done"]:
                advance(stage, n_images[b])
                continue
            try:
                info = stage_task(ctx, stage, shard, b)
                advance(stage, info["items"], None if info.get("skipped") else info["seconds"])
            except Exception as e:  # recorded in the ledger by run_batch_stage; go on with the next batch
                log.error("%s shard-%05d batch-%05d failed: %s: %s", stage, shard, b, type(e).__name__, e)
                failed.append(Unit(stage, shard, b).rel())
                break
    if failed:
        raise RuntimeError(
            f"shard-{shard:05d}: {len(failed)} unit(s) failed: {', '.join(failed)}; rerun to redo them"
        )
    return write_shard_task(ctx, shard, n_batches)


@flow(name="label-shard", flow_run_name="label {params.dataset_name} shard-{shard:05d}", log_prints=True)
def label_shard(params: LabelParams, shard: int) -> dict:
    """Label one shard of a planned run (plans it first if needed): for spreading shards over workers."""
    ctx = plan_task(params)
    manifest = read_json(ctx.layout.fs, ctx.layout.manifest)
    by_id = {sh["shard"]: sh for sh in manifest["shards"]}
    if shard not in by_id:
        raise ValueError(f"run {ctx.run_key} has shards 0..{len(by_id) - 1}; there is no shard {shard}")
    sh = by_id[shard]
    with show_progress(sh["images"], BATCH_STAGES):
        return run_shard(ctx, shard, sh["batches"], sh["images"], Ledger(ctx.layout).snapshot())


@flow(name="label-dataset", flow_run_name="label {params.dataset_name}", log_prints=True)
def label_dataset(params: LabelParams) -> dict:
    """Plan the dataset, label every shard, roll the statistics up. Safe to rerun after any crash."""
    t0 = time.perf_counter()
    ctx = plan_task(params)
    manifest = read_json(ctx.layout.fs, ctx.layout.manifest)
    failures = []
    snap = Ledger(ctx.layout).snapshot()  # one listing for the whole run
    if ctx.layout.fs.exists(ctx.layout.run_stats) and all(
        Unit("write", sh["shard"]).rel() in snap["done"] for sh in manifest["shards"]
    ):
        get_run_logger().info("run %s is complete; nothing to do (%s)", ctx.run_key, ctx.layout.base)
        summary = read_json(ctx.layout.fs, ctx.layout.run_stats)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return summary
    with show_progress(sum(sh["images"] for sh in manifest["shards"]), BATCH_STAGES):
        for sh in manifest["shards"]:
            try:
                run_shard(ctx, sh["shard"], sh["batches"], sh["images"], snap)
            except Exception as e:
                failures.append(str(e))
    if failures:
        raise RuntimeError("; ".join(failures))
    summary = rollup(ctx, manifest)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def run_in_process(params: LabelParams) -> dict:
    """Run `label-dataset` in this process, as `reltag run` does.

    Without a configured Prefect API (PREFECT_API_URL unset) Prefect starts a temporary server that lives
    and dies with this process; flow-run heartbeats (which let a real server mark a crashed run) then serve
    nothing and cost about a second per flow run (Prefect joins its heartbeat thread, which sleeps in 1 s
    steps), so they are switched off. With a real server, Prefect's settings are left as they are.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        return label_dataset(params)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return label_dataset(params)


def rollup(ctx: RunContext, manifest: dict) -> dict:
    """Merge every shard's stats into `stats/run.json`."""
    layout = ctx.layout
    shard_stats = [read_json(layout.fs, layout.shard_stats(sh["shard"])) for sh in manifest["shards"]]
    stages = {}
    for stage in BATCH_STAGES:
        stages[stage] = merge_stats([s["stages"][stage] for s in shard_stats])
    summary = {
        "run_key": ctx.run_key,
        "dataset": ctx.dataset,
        "output": layout.base,
        "shards": len(shard_stats),
        "images": sum(s["images"] for s in shard_stats),
        "triplets": sum(s["triplets"] for s in shard_stats),
        "images_with_triplets": sum(s["images_with_triplets"] for s in shard_stats),
        "plan": manifest["counts"],
        "stages": stages,
    }
    write_json(layout.fs, layout.run_stats, summary)
    return summary
