"""Running one stage over one batch: read its inputs, call the stage's pure function, write, then record.

The order inside `run_batch_stage` is the durability contract (DESIGN.md): every output file is written
under a temporary name, closed and renamed; only then is the unit recorded in the ledger. A unit with a
ledger record is never run again; a unit without one is (re)done from its inputs.
"""

from __future__ import annotations

import functools
import posixpath
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from storage import retry, schemas
from storage.atomic import write_json, write_table
from storage.lease import Leases
from storage.ledger import Ledger, Unit
from storage.records import Quarantined, Reject, Triplet
from tasks.config import PipelineConfig
from tasks.context import RunContext, batch_images, shard_images
from tasks.stages import STAGES, StageOutput, stage

__all__ = ["RunContext", "compute", "finalize_shard", "merge_stats", "run_batch_stage"]


@functools.lru_cache(maxsize=4)
def captioners(config_json: str, captions_file: str | None):
    """The run's captioners, built once per worker process."""
    from tasks.caption import build_captioners

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
            stats = out.stats
            if out.quarantined:
                write_table(
                    fs,
                    layout.quarantine(name, shard, batch),
                    schemas.to_table(out.quarantined, Quarantined),
                    schemas.QUARANTINE,
                )
                stats = {**stats, "quarantined": len(out.quarantined)}
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
            "stats": stats,
            "storage_retries": retries.retries,  # transient storage errors retried (storage/retry.py)
        }
        return _record(ledger, unit, info)


def merge_stats(parts: list[dict], name: str | None = None) -> dict:
    """Merge per-batch stats of one stage: counts are summed, `top_*` tables merged (50 largest kept), the
    stage's ratios recomputed from the merged counts, its maxima kept as the largest value."""
    ratios = {k: v for s in STAGES for k, v in s.ratios.items()} if name is None else stage(name).ratios
    maxima = frozenset().union(*(s.maxima for s in STAGES)) if name is None else stage(name).maxima
    total: Counter = Counter()
    tops: dict[str, Counter] = {}
    top: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            if k.startswith("top_") and isinstance(v, dict):
                tops.setdefault(k, Counter()).update(v)
            elif k in ratios or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            elif k in maxima:
                top[k] = max(top.get(k, v), v)
            else:
                total[k] += v
    out: dict = {**dict(total), **top}
    for k, (num, den) in ratios.items():
        if any(k in p for p in parts):
            out[k] = round(total[num] / total[den], 4) if total[den] else 0.0
    for k, c in tops.items():
        out[k] = dict(c.most_common(50))
    return out


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
            per_stage[st.name] = merge_stats(
                [ledger.read(Unit(st.name, shard, b)).get("stats", {}) for b in range(n_batches)], st.name
            )
    images = shard_images(ctx, shard)
    stats = {
        "shard": shard,
        "run_key": ctx.run_key,
        "images": len(images),
        "boxes": sum(len(im.boxes) for im in images),
        "triplets": n,
        "images_with_triplets": len(set(table.column("image_id").to_pylist())) if n else 0,
        "stages": per_stage,
    }
    write_json(layout.fs, layout.shard_stats(shard), stats)
    info = {"rows": n, "bytes": nbytes, "stats": {"triplets": n}, "storage_retries": retries.retries}
    return _record(ledger, unit, info)
