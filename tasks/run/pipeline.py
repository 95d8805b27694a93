"""Running one stage over one batch: read its inputs, call the stage's pure function, write, then record.

The order inside `run_batch_stage` is the durability contract (DESIGN.md): every output file is written
under a temporary name, closed and renamed; only then is the unit recorded in the ledger. A unit with a
ledger record is never run again; a unit without one is (re)done from its inputs.
"""

from __future__ import annotations

import functools
import json
import posixpath
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from storage import retry, schemas
from storage.atomic import read_json, write_json, write_table
from storage.layout import shard_name
from storage.lease import Leases
from storage.ledger import Ledger, Unit
from storage.records import Quarantined, Reject, Triplet
from tasks.config import PipelineConfig
from tasks.run.context import RunContext, batch_images, plan_manifest, shard_images, vocabulary
from tasks.run.registry import BATCH_STAGES, STAGES, StageOutput, stage
from tasks.stats import Count, Stats, Tally, audit, audit_tables, classes_without_synonyms

__all__ = ["RunContext", "compute", "finalize_shard", "rollup_stats", "run_batch_stage"]


@functools.lru_cache(maxsize=4)
def captioners(config_json: str, captions_file: str | None):
    """The run's captioners, built once per worker process."""
    from tasks.stages.caption import build_captioners

    return build_captioners(PipelineConfig.model_validate_json(config_json).caption, captions_file)


def compute(ctx: RunContext, name: str, shard: int, batch: int) -> StageOutput:
    """Run one stage's function on one batch."""
    st = stage(name)
    if st.compute is None:
        raise ValueError(f"stage {name!r} works on whole shards (finalize_shard), not on batches")
    return st.compute(ctx, shard, batch)


#: Seconds a unit's lease lives without renewal; the holder renews it every third of that while it works.
LEASE_TTL = 600.0
#: Seconds between looks at a unit another worker holds.
LEASE_POLL = 1.0
_LEASES: dict[tuple[str, str], Leases] = {}
_LEASES_LOCK = threading.Lock()


def leases(layout) -> Leases:
    """This process's lease holder for a plan folder (one holder per process: its threads share it)."""
    key = (layout.root, layout.path("_leases"))
    with _LEASES_LOCK:
        if key not in _LEASES:
            _LEASES[key] = Leases(layout.fs, layout.path("_leases"), ttl=LEASE_TTL)
        return _LEASES[key]


def lease_name(layout, unit: Unit) -> str:
    """`<stage>/<stage key>/shard-XXXXX/batch-XXXXX`: a unit's lease, shared by every run with that key."""
    return posixpath.join(unit.stage, layout.key(unit.stage), *unit.rel().split("/")[1:])


def claim_or_wait(layout, ledger: Ledger, unit: Unit) -> dict | None:
    """None when this worker now holds the unit's lease and must do it; the ledger record when the unit is
    done (by another worker, which this one waited for while it held the lease). A lease whose holder died
    (on this host: at once; elsewhere: when it expires) is taken over."""
    held = leases(layout)
    name = lease_name(layout, unit)
    waited = 0.0
    while True:
        if ledger.is_done(unit):
            return {**ledger.read(unit), "skipped": True, "waited_s": round(waited, 3)}
        if held.claim(name):
            if ledger.is_done(unit):  # finished between the look and the claim
                held.release(name)
                continue
            return None
        time.sleep(LEASE_POLL)
        waited += LEASE_POLL


def _record(ledger: Ledger, unit: Unit, info: dict) -> dict:
    """Record a finished unit once. If another worker recorded it meanwhile (it took over a lease this
    worker held too long), its record stands: both wrote the same deterministic output."""
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True, "duplicate_work": True}
    ledger.record_done(unit, info)
    return info


def run_batch_stage(ctx: RunContext, name: str, shard: int, batch: int) -> dict:
    """Do one unit unless the ledger says it is done; returns the ledger record.

    The unit is claimed with a lease first (storage/lease.py), so any number of processes can share a run
    without doing a unit twice: a unit another worker holds is waited for, not redone.
    """
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit(name, shard, batch)
    done = claim_or_wait(layout, ledger, unit)  # the ledger record if the unit is done (by anyone)
    if done is not None:
        return done
    st = stage(name)
    t0 = time.perf_counter()
    with leases(layout).keep_alive(lease_name(layout, unit)), retry.counting() as retries:
        try:
            out = compute(ctx, name, shard, batch)
            fs = layout.fs
            n, nbytes = write_table(
                fs,
                layout.stage_batch(name, shard, batch),
                schemas.to_table(out.rows, st.record),
                schemas.SCHEMAS[st.record],
            )
            stats = Stats(out.stats)
            if out.quarantined:
                write_table(
                    fs,
                    layout.quarantine(name, shard, batch),
                    schemas.to_table(out.quarantined, Quarantined),
                    schemas.QUARANTINE,
                )
                stats.put("quarantined", Count(len(out.quarantined)))
                stats.put("quarantine_reasons", Tally.of(q.reason for q in out.quarantined))
            if st.rejects:
                write_table(
                    fs, layout.rejects(shard, batch), schemas.to_table(out.rejects, Reject), schemas.REJECTS
                )
        except Exception as e:
            ledger.record_failed(unit, f"{type(e).__name__}: {e}")
            raise
        info = {
            "rows": n,
            "bytes": nbytes,
            "seconds": round(time.perf_counter() - t0, 4),
            "items": len(batch_images(ctx, shard, batch)),
            "stats": stats.dump(),  # typed (tasks.stats): the shard's write merges them
            "storage_retries": retries.retries,  # transient storage errors retried (storage/retry.py)
        }
        return _record(ledger, unit, info)


def finalize_shard(ctx: RunContext, shard: int, n_batches: int) -> dict:
    """Concatenate the shard's accepted batches into `triplets/shard-XXXXX.parquet` and write its stats."""
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit(STAGES[-1].name, shard)
    done = claim_or_wait(layout, ledger, unit)  # the ledger record if the shard is written (by anyone)
    if done is not None:
        return done
    with leases(layout).keep_alive(lease_name(layout, unit)), retry.counting() as retries:
        return _finalize(ctx, layout, ledger, unit, shard, n_batches, retries)


def _finalize(
    ctx: RunContext, layout, ledger: Ledger, unit: Unit, shard: int, n_batches: int, retries: retry.RetryCount
) -> dict:
    import pyarrow as pa

    tables = []
    src = stage("write").input
    for b in range(n_batches):
        with layout.fs.open(layout.stage_batch(src, shard, b), "rb") as f:
            tables.append(pq.read_table(f, schema=schemas.TRIPLETS))
    table = pa.concat_tables(tables) if tables else schemas.to_table([], Triplet)
    # one row group per shard file, sorted by image then pair then rank: stable bytes on every rerun
    table = table.sort_by(
        [
            ("image_id", "ascending"),
            ("subject_ann_id", "ascending"),
            ("object_ann_id", "ascending"),
            ("relation_rank", "ascending"),
            ("relation", "ascending"),
        ]
    )
    n, nbytes = write_table(layout.fs, layout.triplets(shard), table, schemas.TRIPLETS)
    per_stage = {}
    for st in STAGES:
        if st.per_batch:
            per_stage[st.name] = Stats.merge_all(
                Stats.load(
                    ledger.read(Unit(st.name, shard, b)).get("stats", {}),
                    f"ledger record {Unit(st.name, shard, b).rel()}",
                )
                for b in range(n_batches)
            )
    images = shard_images(ctx, shard)
    per_image = Counter(table.column("image_id").to_pylist()) if n else Counter()
    own = Stats(
        images=Count(len(images)),
        boxes=Count(sum(len(im.boxes) for im in images)),
        triplets=Count(n),
        images_with_triplets=Count(len(per_image)),
        # every planned image of the shard by its number of accepted triplets (0 included)
        triplets_per_image=Tally.of((str(per_image.get(im.image_id, 0)) for im in images), form="keys"),
    )
    plan = plan_manifest(ctx)
    stats = {
        "shard": shard,
        "run_key": ctx.run_key,
        **own.to_json(),
        "stages": {name: s.to_json() for name, s in per_stage.items()},
        **audit({**per_stage, "shard": own}, None, _no_synonyms(ctx, plan)),
        # lossless, typed (tasks.stats.Stats.dump): what the run's roll-up merges
        "state": {"shard": own.dump(), "stages": {name: s.dump() for name, s in per_stage.items()}},
    }
    write_json(layout.fs, layout.shard_stats(shard), stats)
    info = {"rows": n, "bytes": nbytes, "stats": {"triplets": n}, "storage_retries": retries.retries}
    return _record(ledger, unit, info)


def _no_synonyms(ctx: RunContext, plan) -> list[str]:
    # the match stage's cached vocabulary (same arguments)
    cats = json.dumps(plan.categories, sort_keys=True)
    return classes_without_synonyms(vocabulary(cats, ctx.config.match.vocabulary))


def rollup_stats(ctx: RunContext, plan) -> dict:
    """Merge every shard's statistics into the run's `stats/<run_key>/run.json`, with the audit (funnel,
    histograms, eta sweep, unmatched nouns, ...) also as Parquet tables beside it (tasks.stats.audit_tables).
    run.json is written last: its presence says the run is finished."""
    layout = ctx.layout
    shard_stats = [read_json(layout.fs, layout.shard_stats(sh.shard)) for sh in plan.shards]
    states = []
    for sh, s in zip(plan.shards, shard_stats):
        if "state" not in s:
            raise ValueError(
                f"{layout.shard_stats(sh.shard)} has no typed 'state' (written by an older reltag); delete it "
                f"and its ledger record _ledger/write/.../{shard_name(sh.shard)} to rewrite the shard"
            )
        what = layout.shard_stats(sh.shard)
        states.append(
            {
                "shard": Stats.load(s["state"]["shard"], what),
                **{k: Stats.load(v, f"{what} stage {k}") for k, v in s["state"]["stages"].items()},
            }
        )
    merged = {
        name: Stats.merge_all(st[name] for st in states if name in st) for name in ("shard", *BATCH_STAGES)
    }
    own = merged["shard"].to_json()
    summary = {
        "run_key": ctx.run_key,
        "dataset": ctx.dataset,
        "output": layout.base,
        "shards": len(shard_stats),
        "images": own.get("images", 0),
        "triplets": own.get("triplets", 0),
        "images_with_triplets": own.get("images_with_triplets", 0),
        "plan_key": ctx.plan_key,
        "stage_keys": dict(ctx.stage_keys),
        "plan": plan.counts,
        "stages": {name: merged[name].to_json() for name in BATCH_STAGES},
        **audit(merged, plan.counts, _no_synonyms(ctx, plan)),
    }
    for name, table in audit_tables(summary).items():
        write_table(layout.fs, layout.path("stats", ctx.run_key, f"{name}.parquet"), table, table.schema)
    write_json(layout.fs, layout.run_stats, summary)
    return summary
