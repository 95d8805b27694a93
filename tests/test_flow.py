"""Flows end to end under one Prefect test harness: the demo sample, rerun, failure and resume."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest

from benchmarks.synth import write_dataset
from flows.cli import EXAMPLES, main
from flows.params import LabelParams
from flows.status import find_runs, run_status
from storage.layout import BATCH_STAGES
from tasks.config import PipelineConfig, PlanConfig

pytestmark = [pytest.mark.flow]


def _params(tmp_path, det, caps, images, out="out", **plan):
    cfg = PipelineConfig(dataset="t", plan=PlanConfig(**plan)) if plan else PipelineConfig(dataset="t")
    return LabelParams(annotations=det, images=images, out=str(tmp_path / out), captions=caps, config=cfg)


def _done_markers(out: str) -> dict[str, dict]:
    found = {}
    for p in glob.glob(os.path.join(out, "*", "*", "_ledger", "**", "*.done.json"), recursive=True):
        with open(p) as f:
            found[p.split("_ledger/")[1]] = json.load(f)
    return found


def test_demo_sample_writes_readable_triplets(prefect_harness, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out]) == 0
    (run,) = find_runs(out)
    st = run_status(run)
    assert st["complete"] and st["totals"]["threshold"] == {"done": 1, "failed": 0, "pending": 0}
    path = run.triplets(0)
    table = pq.read_table(path)
    assert table.num_rows > 0
    rows = table.to_pylist()
    for r in rows:
        assert r["confidence"] >= 0.2 and r["run_key"] == run.run_key and r["caption_ids"]
        assert r["subject_ann_id"] != r["object_ann_id"]
    labels = {(r["subject_label"], r["object_label"]) for r in rows}
    assert ("Person", "Helmet") in labels or ("Cup", "Plate") in labels, labels
    # readable by pandas and DuckDB as well
    import duckdb
    import pandas as pd

    assert len(pd.read_parquet(path)) == table.num_rows
    assert duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall() == [(table.num_rows,)]
    stats = json.loads(open(run.run_stats).read())
    assert stats["triplets"] == table.num_rows and stats["stages"]["caption"]["captions"] == 19
    # the CLI reports the run as JSON
    capsys.readouterr()
    assert main(["status", "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
    assert main(["stats", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["triplets"] == table.num_rows
    # pictures for an audit: every image with triplets, and one named image
    png = tmp_path / "sheet.png"
    assert main(["show", "--out", out, "--png", str(png)]) == 0
    from PIL import Image

    with_triplets = len({r["image_id"] for r in rows})
    assert f"{with_triplets} image(s)" in capsys.readouterr().out
    assert Image.open(png).size[0] >= 512
    assert (
        main(["show", "--out", out, "--png", str(png), "--image-id", "4"]) == 0
    )  # the cat: boxes, no triplets
    assert main(["show", "--out", out, "--png", str(png), "--image-id", "999"]) == 1
    assert "image ids [999] are not in run" in capsys.readouterr().err


def test_rerun_of_a_finished_run_does_nothing(prefect_harness, tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), 30)
    params = _params(tmp_path, ds["detections"], ds["captions"], str(tmp_path), batch_size=10)
    from flows.label import label_dataset

    first = label_dataset(params)
    markers = _done_markers(params.out)
    assert len(markers) == 3 * len(BATCH_STAGES) + 1  # 3 batches x stages + the shard write
    (run,) = find_runs(params.out)
    before = open(run.triplets(0), "rb").read()
    second = label_dataset(params)
    assert _done_markers(params.out) == markers  # nothing was redone
    assert open(run.triplets(0), "rb").read() == before
    assert second["triplets"] == first["triplets"] > 0


def test_a_failed_batch_fails_the_flow_and_only_it_is_redone(prefect_harness, tmp_path, monkeypatch):
    import tasks.pipeline as pipeline
    from flows.label import label_dataset

    ds = write_dataset(str(tmp_path / "ds"), 40, seed=3)
    clean = _params(tmp_path, ds["detections"], ds["captions"], str(tmp_path), out="clean", batch_size=10)
    label_dataset(clean)
    params = _params(tmp_path, ds["detections"], ds["captions"], str(tmp_path), out="faulty", batch_size=10)

    real = pipeline.compute
    calls = []

    def flaky(ctx, stage, shard, batch):
        calls.append((stage, shard, batch))
        if (stage, shard, batch) == ("parse", 0, 2):
            raise RuntimeError("parser exploded on batch 2")
        return real(ctx, stage, shard, batch)

    monkeypatch.setattr(pipeline, "compute", flaky)
    with pytest.raises(RuntimeError, match=r"parse/shard-00000/batch-00002"):
        label_dataset(params)
    (run,) = find_runs(params.out)
    st = run_status(run)
    assert st["failed_units"] == ["parse/shard-00000/batch-00002"]
    assert (
        st["totals"]["threshold"]["done"] == 3 and st["totals"]["write"]["done"] == 0
    )  # other batches went on
    before = _done_markers(params.out)
    monkeypatch.setattr(pipeline, "compute", real)
    calls.clear()
    monkeypatch.setattr(pipeline, "compute", lambda *a: (calls.append(a[1:]), real(*a))[1])
    label_dataset(params)
    assert calls == [("parse", 0, 2), ("match", 0, 2), ("tag", 0, 2), ("threshold", 0, 2)]
    after = _done_markers(params.out)
    assert {k: v for k, v in after.items() if k in before} == before  # finished units untouched
    assert after["parse/shard-00000/batch-00002.done.json"]["attempts"] == 2
    (clean_run,) = find_runs(clean.out)
    assert open(run.triplets(0), "rb").read() == open(clean_run.triplets(0), "rb").read()


def test_demo_sample_is_bundled():
    assert (EXAMPLES / "sample_detections.json").exists() and len(list((EXAMPLES / "images").iterdir())) == 5


def test_label_shard_runs_one_shard_and_label_dataset_finishes_the_rest(prefect_harness, tmp_path):
    from flows.label import label_dataset, label_shard

    ds = write_dataset(str(tmp_path / "ds"), 30, seed=4)
    params = _params(tmp_path, ds["detections"], ds["captions"], str(tmp_path), shard_size=20, batch_size=10)
    label_shard(params, 1)
    (run,) = find_runs(params.out)
    st = run_status(run)
    assert [r["stages"]["write"]["done"] for r in st["shards"]] == [0, 1]
    assert st["totals"]["threshold"] == {"done": 1, "failed": 0, "pending": 2}
    with pytest.raises(ValueError, match=r"has shards 0..1; there is no shard 5"):
        label_shard(params, 5)
    summary = label_dataset(params)
    assert run_status(run)["complete"] and summary["shards"] == 2
