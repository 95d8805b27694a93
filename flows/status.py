"""Run status from the ledger: per shard and stage, how many batches are done, failed and pending."""

from __future__ import annotations

import posixpath

from fsspec.core import url_to_fs

from storage.atomic import read_json
from storage.layout import BATCH_STAGES, RunLayout, batch_name, shard_name
from storage.ledger import Ledger


def find_runs(out: str) -> list[RunLayout]:
    """Every run under an output root: `<out>/<dataset>/<run_key>/manifest.json`."""
    fs, base = url_to_fs(out)
    runs = []
    for path in sorted(fs.glob(posixpath.join(base, "*", "*", "manifest.json"))):
        run_dir = posixpath.dirname(path)
        dataset = posixpath.basename(posixpath.dirname(run_dir))
        runs.append(RunLayout(out, dataset, posixpath.basename(run_dir)))
    return runs


def run_status(layout: RunLayout) -> dict:
    """Counts per shard and stage, plus totals, from one listing of the ledger."""
    manifest = read_json(layout.fs, layout.manifest)
    snap = Ledger(layout).snapshot()
    shards = []
    totals = {s: {"done": 0, "failed": 0, "pending": 0} for s in (*BATCH_STAGES, "write")}
    for sh in manifest["shards"]:
        s, nb = sh["shard"], sh["batches"]
        row = {"shard": s, "images": sh["images"], "batches": nb, "stages": {}}
        for stage in BATCH_STAGES:
            c = {"done": 0, "failed": 0, "pending": 0}
            for b in range(nb):
                rel = posixpath.join(stage, shard_name(s), batch_name(b))
                c["done" if rel in snap["done"] else "failed" if rel in snap["failed"] else "pending"] += 1
            row["stages"][stage] = c
        rel = posixpath.join("write", shard_name(s), "shard")
        w = {"done": int(rel in snap["done"]), "failed": int(rel in snap["failed"]), "pending": 0}
        w["pending"] = 1 - w["done"] - w["failed"]
        row["stages"]["write"] = w
        for stage, c in row["stages"].items():
            for k, v in c.items():
                totals[stage][k] += v
        shards.append(row)
    complete = all(r["stages"]["write"]["done"] for r in shards)
    out = {
        "dataset": layout.dataset,
        "run_key": layout.run_key,
        "output": layout.base,
        "images": sum(r["images"] for r in shards),
        "shards": shards,
        "totals": totals,
        "failed_units": sorted(snap["failed"]),
        "complete": complete,
    }
    if complete and layout.fs.exists(layout.run_stats):
        out["triplets"] = read_json(layout.fs, layout.run_stats).get("triplets")
    return out
