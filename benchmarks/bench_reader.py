"""Pre-training reader: throughput (rows/s) and peak RSS of reltag's streaming reader vs read-all-then-filter.

Workload: a synthetic finished run laid out as reltag writes it (plan.json, runs/, images/ and triplets/ shards,
ledger, statistics): N images, 8 boxes and 10 triplet rows each, p_relation uniform in [0, 1), one row group per
shard of 1,000 images. Each reader yields every image with at least one row passing relation_only >= 0.2, with its
boxes and its kept rows; the counts of images and rows are asserted equal.

- baseline: pandas `read_parquet` of every triplet and images file, filter, group by image (what a script that
  loads the whole dataset does);
- reader: `storage.relations.RelationReader` (row group by row group, column projection, statistics);
- dataset: `models.rlipv2.data.RelationDataset` (the reader plus the per-image reference steps: cap, clamp, texts,
  multi-hot pairs), single process;
- export: `tasks.audit.export.export_vg_json` (the reader, every image written to the JSON as it comes, atomic rename).
Each runs in a fresh subprocess; peak RSS is that process's VmHWM, and `rss_after_imports_mb` its VmRSS before
reading (torch's import dominates the dataset's). Two sizes show how memory grows with the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PRELUDE = r"""
import sys, time
def rss(kind):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(kind)) * 1024
"""

READER = (
    PRELUDE
    + r"""
from storage.relations import RelationReader
after = rss("VmRSS:")
t = time.perf_counter()
images = rows = 0
for rec in RelationReader([sys.argv[1]], eta=0.2, rule="relation_only"):
    images += 1
    rows += len(rec.relations)
print(time.perf_counter() - t, rss("VmHWM:"), after, images, rows)
"""
)

DATASET = (
    PRELUDE
    + r"""
from models.rlipv2.data import RelationDataset
after = rss("VmRSS:")
t = time.perf_counter()
images = rows = 0
for item in RelationDataset([sys.argv[1]], eta=0.2, rule="relation_only", max_relations=100):
    images += 1
    rows += len(item.relationships)
print(time.perf_counter() - t, rss("VmHWM:"), after, images, rows)
"""
)

EXPORT = (
    PRELUDE
    + r"""
import json
from tasks.audit.export import export_vg_json
after = rss("VmRSS:")
t = time.perf_counter()
c = export_vg_json(sys.argv[1], sys.argv[1] + ".export.json", eta=0.2, rule="relation_only")
dt, hwm = time.perf_counter() - t, rss("VmHWM:")
with open(sys.argv[1] + ".export.json") as f:  # read back after the measurement: the file is valid JSON
    assert len(json.load(f)) == c["images"]
print(dt, hwm, after, c["images"], c["relationships"])
"""
)

BASELINE = (
    PRELUDE
    + r"""
import glob, os
import pandas as pd
after = rss("VmRSS:")
t = time.perf_counter()
plan = sys.argv[1]
trips = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(os.path.join(plan, "triplets", "*", "*.parquet")))])
imgs = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(os.path.join(plan, "images", "*.parquet")))])
kept = trips[trips["p_relation"].astype("float64") >= 0.2]
boxes = dict(zip(imgs["image_id"], imgs["boxes"]))
images = rows = 0
for image_id, g in kept.groupby("image_id", sort=False):
    rec = (boxes[image_id], list(zip(g["subject_ann_id"], g["object_ann_id"], g["relation"], g["p_relation"])))
    images += 1
    rows += len(rec[1])
print(time.perf_counter() - t, rss("VmHWM:"), after, images, rows)
"""
)


def write_run(
    root: str, n_images: int, rows_per_image: int = 10, boxes_per_image: int = 8, shard: int = 1000
) -> str:
    """A finished synthetic run under `root`; returns its plan folder."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.atomic import write_json
    from storage.layout import RunLayout
    from storage.ledger import Ledger, Unit
    from storage.manifest import ChainLink, PlanManifest, RunRecord, ShardInfo
    from storage.schemas import IMAGES, TRIPLETS

    rng = np.random.default_rng(0)
    run_key, plan_key = "benchrun", "benchplan"
    layout = RunLayout(root, "bench", run_key, plan_key, (("threshold", "th"), ("write", run_key)))
    shards = []
    rels = np.array([f"rel{i}" for i in range(50)])
    for k, start in enumerate(range(0, n_images, shard)):
        ids = np.arange(start, min(start + shard, n_images), dtype=np.int64)
        n, nb, nr = len(ids), len(ids) * boxes_per_image, len(ids) * rows_per_image
        ann = np.arange(nb, dtype=np.int64) + start * boxes_per_image
        xywh = rng.uniform(0, 300, (nb, 4)).astype(np.float32)
        box_struct = pa.StructArray.from_arrays(
            [pa.array(ann), pa.array(rng.integers(1, 366, nb).astype(np.int32)), pa.array(["lbl"] * nb),
             *(pa.array(xywh[:, i]) for i in range(4))],
            names=["ann_id", "category_id", "label", "x", "y", "w", "h"],
        )  # fmt: skip
        boxes = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * boxes_per_image), box_struct
        )
        images = pa.table(
            {"image_id": ids, "file_name": [f"{i:012d}.jpg" for i in ids], "width": np.full(n, 640, np.int32),
             "height": np.full(n, 480, np.int32), "shard": np.full(n, k, np.int32), "boxes": boxes,
             "box_file_index": pa.nulls(n, pa.list_(pa.int64())), "class_order": pa.nulls(n, pa.list_(pa.int32()))}
        ).cast(IMAGES)  # fmt: skip
        img_of_row = np.repeat(ids, rows_per_image)
        local = np.repeat(np.arange(n), rows_per_image) * boxes_per_image + start * boxes_per_image
        sub = local + rng.integers(0, boxes_per_image, nr)
        obj = local + rng.integers(0, boxes_per_image, nr)
        p = rng.random((nr, 3)).astype(np.float32)

        def fixed4(a):
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 4)

        trip = pa.table(
            {"image_id": img_of_row, "subject_ann_id": sub, "object_ann_id": obj,
             "subject_category_id": np.ones(nr, np.int32), "object_category_id": np.ones(nr, np.int32),
             "subject_label": ["a"] * nr, "object_label": ["b"] * nr,
             "subject_box": fixed4(xywh[sub - start * boxes_per_image]),
             "object_box": fixed4(xywh[obj - start * boxes_per_image]),
             "relation": rels[rng.integers(0, 50, nr)], "relation_lemma": ["x"] * nr, "confidence": p[:, 0] * p[:, 1] * p[:, 2],
             "p_subject": p[:, 0], "p_object": p[:, 1], "p_relation": p[:, 2],
             "relation_rank": np.ones(nr, np.int16),
             "caption_ids": pa.ListArray.from_arrays(pa.array(np.arange(nr + 1, dtype=np.int32)), pa.array(np.zeros(nr, np.int16))),
             "n_captions": np.ones(nr, np.int16), "tagger": ["synth"] * nr, "run_key": [run_key] * nr,
             "caption_source_ids": pa.nulls(nr, TRIPLETS.field("caption_source_ids").type)}
        ).cast(TRIPLETS)  # fmt: skip
        for path, table in ((layout.images(k), images), (layout.triplets(k), trip)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path, compression="zstd")
        shards.append(ShardInfo(k, n, 1))
    write_json(layout.fs, layout.plan_manifest,
               PlanManifest(plan_key, "bench", "2026-01-01", {}, [], shards, {}, 0, {}, {}).to_dict())  # fmt: skip
    record = RunRecord(
        run_key, "bench", plan_key, "2026-01-01",
        [ChainLink("threshold", "th", plan_key, {}, ""), ChainLink("write", run_key, "th", {}, "")],
        {"match": {"vocabulary": "o365"}, "threshold": {"rule": "relation_only", "eta": 0.0}}, {}, {},
        {"images_root": "/images/train2017"},
    )  # fmt: skip
    write_json(layout.fs, layout.manifest, record.to_dict())
    ledger = Ledger(layout)
    for s in shards:
        ledger.record_done(Unit("write", s.shard), {})
    write_json(layout.fs, layout.run_stats, {})
    return layout.base


def _run(code: str, plan: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", code, plan], capture_output=True, text=True, check=True, env=env
    )
    dt, hwm, after, images, rows = out.stdout.split()
    return {"seconds": float(dt), "peak_rss_mb": int(hwm) / 1e6, "rss_after_imports_mb": int(after) / 1e6,
            "images": int(images), "rows": int(rows)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="20,000 and 100,000 rows instead of 100,000 and 1,000,000"
    )
    args = ap.parse_args()
    from benchmarks.common import machine, save_result

    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            plan = write_run(os.path.join(tmp, f"r{rows}"), rows // 10)
            r = {"rows": rows, "images": rows // 10}
            for name, code in (
                ("baseline", BASELINE),
                ("reader", READER),
                ("dataset", DATASET),
                ("export", EXPORT),
            ):
                m = _run(code, plan)
                m["rows_per_s"] = round(rows / m["seconds"])
                r[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()}
            assert r["baseline"]["images"] == r["reader"]["images"] == r["dataset"]["images"], r
            assert r["baseline"]["rows"] == r["reader"]["rows"], (
                r
            )  # the dataset caps at 100: none here has more
            print(json.dumps(r))
            results.append(r)
    big, small = results[-1], results[0]

    def growth(name):
        return round(big[name]["peak_rss_mb"] - small[name]["peak_rss_mb"], 1)

    def work(name):
        return round(big[name]["peak_rss_mb"] - big[name]["rss_after_imports_mb"], 1)

    out = {
        "name": "reader",
        "speedup": round(work("baseline") / max(work("reader"), 0.1), 2),
        "speedup_means": "memory used for reading (peak RSS minus RSS after imports): baseline / reader, largest run",
        "baseline": {"name": "pandas read_parquet of every file, filter, groupby", **big["baseline"]},
        "candidate": {"name": "storage.relations.RelationReader (streaming row groups)", **big["reader"]},
        "dataset": {"name": "models.rlipv2.data.RelationDataset, one process", **big["dataset"]},
        "export": {"name": "tasks.audit.export.export_vg_json (streamed JSON, atomic)", **big["export"]},
        "rss_growth_mb": {
            "reader": growth("reader"),
            "dataset": growth("dataset"),
            "baseline": growth("baseline"),
            "from_rows": small["rows"],
            "to_rows": big["rows"],
        },  # fmt: skip
        "sizes": results,
        "quick": args.quick,
        "machine": machine(),
    }
    save_result("reader", out)
    print(
        f"reader: {big['rows']:,} rows ({big['images']:,} images): {big['reader']['rows_per_s']:,} rows/s, "
        f"reading memory {work('reader')} MB (peak {big['reader']['peak_rss_mb']} MB) vs pandas read-all "
        f"{big['baseline']['rows_per_s']:,} rows/s, {work('baseline')} MB (peak {big['baseline']['peak_rss_mb']} MB); "
        f"dataset items {big['dataset']['rows_per_s']:,} rows/s; vg-json export {big['export']['rows_per_s']:,} rows/s; "
        f"RSS growth {small['rows']:,}->{big['rows']:,} rows: reader {growth('reader'):+} MB, export "
        f"{growth('export'):+} MB, baseline {growth('baseline'):+} MB"
    )


if __name__ == "__main__":
    main()
