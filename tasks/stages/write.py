"""Write stage: per shard, the threshold stage's batches as one sorted triplet file plus the shard's statistics;
per run, every shard's statistics merged into `stats/<run_key>/run.json` (its presence says the run is finished)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from storage import retry, schemas
from storage.atomic import read_json, write_json, write_table
from storage.layout import shard_name
from storage.ledger import Ledger, Unit
from storage.records import Triplet
from tasks.audit.summary import audit, audit_tables, classes_without_synonyms
from tasks.run.context import RunContext, run_vocabulary, shard_images
from tasks.run.leases import claim_or_wait, lease_name, leases, record_once
from tasks.run.registry import Stage, batch_stages, register, stages
from tasks.stats import Count, Stats, Tally

# one Parquet triplet file and one stats file per shard, from the threshold stage's batches
STAGE = register(Stage("write", "threshold", Triplet, "triplets", None, settings=lambda cfg: {}))


def finalize_shard(ctx: RunContext, shard: int, n_batches: int) -> dict:
    """Concatenate the shard's accepted batches into `triplets/shard-XXXXX.parquet` and write its stats."""
    layout = ctx.layout
    ledger = Ledger(layout)
    unit = Unit(STAGE.name, shard)
    done = claim_or_wait(layout, ledger, unit)  # the ledger record if the shard is written (by anyone)
    if done is not None:
        return done
    with leases(layout).keep_alive(lease_name(layout, unit)), retry.counting() as retries:
        return _finalize(ctx, layout, ledger, unit, shard, n_batches, retries)


def _finalize(
    ctx: RunContext, layout, ledger: Ledger, unit: Unit, shard: int, n_batches: int, retries: retry.RetryCount
) -> dict:
    tables = []
    src = STAGE.input
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
    for st in stages():
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
    stats = {
        "shard": shard,
        "run_key": ctx.run_key,
        **own.to_json(),
        "stages": {name: s.to_json() for name, s in per_stage.items()},
        **audit({**per_stage, "shard": own}, None, _no_synonyms(ctx)),
        # lossless, typed (tasks.stats.Stats.dump): what the run's roll-up merges
        "state": {"shard": own.dump(), "stages": {name: s.dump() for name, s in per_stage.items()}},
    }
    write_json(layout.fs, layout.shard_stats(shard), stats)
    info = {"rows": n, "bytes": nbytes, "stats": {"triplets": n}, "storage_retries": retries.retries}
    return record_once(ledger, unit, info)


def _no_synonyms(ctx: RunContext) -> list[str]:
    return classes_without_synonyms(run_vocabulary(ctx))  # the match stage's cached vocabulary


def rollup_stats(ctx: RunContext, plan) -> dict:
    """Merge every shard's statistics into the run's `stats/<run_key>/run.json`, with the audit (funnel,
    histograms, eta sweep, unmatched nouns, ...) also as Parquet tables beside it (tasks.audit.summary.audit_tables).
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
        name: Stats.merge_all(st[name] for st in states if name in st) for name in ("shard", *batch_stages())
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
        "stages": {name: merged[name].to_json() for name in batch_stages()},
        **audit(merged, plan.counts, _no_synonyms(ctx)),
    }
    for name, table in audit_tables(summary).items():
        write_table(layout.fs, layout.path("stats", ctx.run_key, f"{name}.parquet"), table, table.schema)
    write_json(layout.fs, layout.run_stats, summary)
    return summary
