"""Running one stage over one batch: read its inputs, call the stage's pure function, write, then record.

The order inside `run_batch_stage` is the durability contract (DESIGN.md): every output file is written
under a temporary name, closed and renamed; only then is the unit recorded in the ledger. A unit with a
ledger record is never run again; a unit without one is (re)done from its inputs.
"""

from __future__ import annotations

import time

from storage import retry, schemas
from storage.atomic import write_table
from storage.ledger import Ledger, Unit
from storage.records import Quarantined, Reject
from tasks.run.context import RunContext, batch_images
from tasks.run.leases import claim_or_wait, lease_name, leases, record_once
from tasks.run.registry import StageOutput, stage
from tasks.stats import Count, Stats, Tally

__all__ = ["compute", "run_batch_stage"]


def compute(ctx: RunContext, name: str, shard: int, batch: int) -> StageOutput:
    """Run one stage's function on one batch; a statistic the stage declares but did not report is an error
    (its funnel row would read 0 without a word)."""
    st = stage(name)
    if st.compute is None:
        raise ValueError(f"stage {name!r} works on whole shards, not on batches")
    out = st.compute(ctx, shard, batch)
    missing = [s for s in st.stats if s not in out.stats]
    if missing:
        raise ValueError(
            f"stage {name!r} reported no statistic {missing} for shard {shard} batch {batch}; it declares "
            f"{list(st.stats)} (its funnel rows count them)"
        )
    return out


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
                fs, layout.stage_batch(name, shard, batch), schemas.to_table(out.rows, st.record, st.arrow_schema),
                st.arrow_schema,
            )  # fmt: skip
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
        return record_once(ledger, unit, info)
