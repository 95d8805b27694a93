"""Runs under an output root: whether each is finished (`unfinished`, the one test) and its ledger, per stage."""

from __future__ import annotations

import posixpath

from fsspec.core import url_to_fs

import tasks.stages  # noqa: F401  (registers the built-in stages)
from storage.atomic import read_json
from storage.layout import RunLayout
from storage.ledger import Ledger, Unit, run_gaps, unwritten
from storage.manifest import PlanManifest, RunRecord
from tasks.run.registry import folders, last_stage, stages

WRITE = last_stage().name  # the shard-level stage that writes the product


def unwritten_shards(plan: PlanManifest, snap: dict[str, set[str]]) -> list:
    """The plan's shards whose triplet file is not recorded as written, from one ledger listing."""
    todo = set(unwritten([sh.shard for sh in plan.shards], snap, WRITE))
    return [sh for sh in plan.shards if sh.shard in todo]


def unfinished(
    layout: RunLayout, plan: PlanManifest | None = None, snap: dict[str, set[str]] | None = None
) -> list[str]:
    """What a run lacks to count as finished, one phrase per gap (empty: finished). The one test of "is the run
    finished" (the CLI, the flows, `reltag run` on a finished run): every shard's write unit is done in the
    ledger AND the run's statistics (stats/<run_key>/run.json) are written. plan / snap: the plan manifest and a
    ledger snapshot when the caller holds them (read here otherwise)."""
    fs = layout.fs
    if plan is None:
        if not fs.exists(layout.plan_manifest):
            return [f"its plan {layout.plan_manifest} is not written"]
        plan = plan_of(layout)
    if snap is None:
        snap = Ledger(layout).snapshot()
    return run_gaps(layout, [sh.shard for sh in plan.shards], snap, WRITE)


def check_finished(
    layout: RunLayout, plan: PlanManifest | None = None, snap: dict[str, set[str]] | None = None
) -> None:
    """Raise a one-line ValueError naming what the run lacks, unless it is finished (`unfinished`)."""
    gaps = unfinished(layout, plan, snap)
    if gaps:
        raise ValueError(
            f"run {layout.run_key} under {layout.root} is not finished: {'; '.join(gaps)} "
            f"(`reltag status --out {layout.root} --run {layout.run_key}` shows what is left; "
            "rerunning `reltag run` finishes it)"
        )


def is_finished(layout: RunLayout, plan: PlanManifest, snap: dict[str, set[str]]) -> bool:
    """Every shard written and the run's statistics rolled up (`unfinished` is empty)."""
    return not unfinished(layout, plan, snap)


def find_runs(out: str) -> list[RunLayout]:
    """Every run under an output root: `<out>/<dataset>/<plan_key>/runs/<run_key>.json`, oldest first."""
    fs, base = url_to_fs(out)
    found = []
    for path in fs.glob(posixpath.join(base, "*", "*", "runs", "*.json")):
        record = RunRecord.from_dict(read_json(fs, path))
        layout = RunLayout(out, record.dataset, record.run_key, record.plan_key, record.stage_keys, folders())
        found.append((record.created_at, record.run_key, layout))
    return [layout for _, _, layout in sorted(found)]


def run_record(layout: RunLayout) -> RunRecord:
    return RunRecord.from_dict(read_json(layout.fs, layout.manifest))


def plan_of(layout: RunLayout) -> PlanManifest:
    return PlanManifest.from_dict(read_json(layout.fs, layout.plan_manifest))


def run_status(layout: RunLayout) -> dict:
    """Counts per shard and stage, plus totals, from one listing of the ledger."""
    plan = plan_of(layout)
    snap = Ledger(layout).snapshot()
    shards = []
    totals = {s.name: {"done": 0, "failed": 0, "pending": 0} for s in stages()}
    for sh in plan.shards:
        row = {"shard": sh.shard, "images": sh.images, "batches": sh.batches, "stages": {}}
        for st in stages():
            units = (
                [Unit(st.name, sh.shard, b) for b in range(sh.batches)]
                if st.per_batch
                else [Unit(st.name, sh.shard)]
            )
            c = {"done": 0, "failed": 0, "pending": 0}
            for u in units:
                rel = u.rel()
                c["done" if rel in snap["done"] else "failed" if rel in snap["failed"] else "pending"] += 1
            row["stages"][st.name] = c
            for k, v in c.items():
                totals[st.name][k] += v
        shards.append(row)
    complete = is_finished(layout, plan, snap)
    out = {
        "dataset": layout.dataset,
        "run_key": layout.run_key,
        "plan_key": layout.plan_key,
        "stage_keys": dict(layout.stage_keys),
        "output": layout.base,
        "images": sum(r["images"] for r in shards),
        "shards": shards,
        "totals": totals,
        "failed_units": sorted(snap["failed"]),
        "complete": complete,
    }
    if complete:
        out["triplets"] = read_json(layout.fs, layout.run_stats).get("triplets")
    return out


def finished_summary(params) -> dict | None:
    """The run's summary if it is complete (its statistics written and every shard's write unit recorded),
    else None. Reads checksums (cached), the plan and one ledger listing; starts nothing."""
    from tasks.stages.plan.start import run_context

    ctx = run_context(
        params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
    ).ctx
    layout = ctx.layout
    if not (layout.fs.exists(layout.run_stats) and layout.fs.exists(layout.plan_manifest)):
        return None  # the cheap test first: most unfinished runs have no statistics yet
    if unfinished(layout):
        return None
    return read_json(layout.fs, layout.run_stats)
