"""Running one stage over one batch: read its inputs, call the stage's pure function, write, then record.

The order inside `run_batch_stage` is the durability contract (DESIGN.md): every output file is written
under a temporary name, closed and renamed; only then is the unit recorded in the ledger. A unit with a
ledger record is never run again; a unit without one is (re)done from its inputs.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import pyarrow.parquet as pq

from storage import schemas
from storage.atomic import write_json, write_table
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


def run_batch_stage(ctx: RunContext, name: str, shard: int, batch: int) -> dict:
    """Do one unit unless the ledger says it is done; returns the ledger record."""
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit(name, shard, batch)
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True}
    st = stage(name)
    t0 = time.perf_counter()
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
    }
    ledger.record_done(unit, info)
    return info


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
    unit = Unit("write", shard)
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True}
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
    info = {"rows": n, "bytes": nbytes, "stats": {"triplets": n}}
    ledger.record_done(unit, info)
    return info
