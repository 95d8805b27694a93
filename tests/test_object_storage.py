"""The output root can be any fsspec URI: the whole pipeline on an in-memory object store."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from benchmarks.synth import write_dataset
from storage.ledger import Ledger
from tasks.config import PipelineConfig, PlanConfig
from tasks.run.pipeline import run_batch_stage
from tasks.run.registry import batch_stages
from tasks.stages.plan.start import plan_run
from tasks.stages.write import finalize_shard


def _run(ds, out):
    cfg = PipelineConfig(dataset="m", plan=PlanConfig(batch_size=10))
    ctx, plan = plan_run(ds["detections"], ds["images_root"], out, ds["captions"], "m", cfg)
    for b in range(plan.shards[0].batches):
        for stage in batch_stages():
            run_batch_stage(ctx, stage, 0, b)
    finalize_shard(ctx, 0, plan.shards[0].batches)
    return ctx


def test_pipeline_on_memory_object_store_matches_local_disk(tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), 30, seed=5)
    mem = _run(ds, "memory://bucket/reltag")
    local = _run(ds, str(tmp_path / "out"))
    assert mem.run_key == local.run_key
    fs = fsspec.filesystem("memory")
    with fs.open(mem.layout.triplets(0), "rb") as f:
        remote_bytes = f.read()
    assert remote_bytes == open(local.layout.triplets(0), "rb").read()
    assert pq.read_table(local.layout.triplets(0)).num_rows > 0
    assert len(Ledger(mem.layout).snapshot()["done"]) == 3 * len(batch_stages()) + 1
    assert not [p for p in fs.find("/bucket/reltag") if ".tmp-" in p]
