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
from tasks.config import PipelineConfig, PlanConfig
from tasks.run.registry import batch_stages

pytestmark = [pytest.mark.flow]


def _params(tmp_path, det, caps, images, out="out", **plan):
    cfg = PipelineConfig(dataset="t", plan=PlanConfig(**plan)) if plan else PipelineConfig(dataset="t")
    return LabelParams(annotations=det, images=images, out=str(tmp_path / out), captions=caps, config=cfg)


def _done_markers(out: str) -> dict[str, dict]:
    found = {}
    for p in glob.glob(os.path.join(out, "*", "*", "_ledger", "**", "*.done.json"), recursive=True):
        with open(p) as f:
            stage, _key, shard, batch = p.split("_ledger/")[1].split("/")  # one folder per stage key
            found[f"{stage}/{shard}/{batch}"] = json.load(f)
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
    assert main(["show", "--out", out, "--png", str(png), "--image-id", "999"]) == 2
    assert capsys.readouterr().err.startswith("reltag show: error: image ids [999] are not in run")


def test_rerun_of_a_finished_run_does_nothing(prefect_harness, tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), 30)
    params = _params(tmp_path, ds["detections"], ds["captions"], ds["images_root"], batch_size=10)
    from flows.label import label_dataset

    first = label_dataset(params)
    markers = _done_markers(params.out)
    assert len(markers) == 3 * len(batch_stages()) + 1  # 3 batches x stages + the shard write
    (run,) = find_runs(params.out)
    before = open(run.triplets(0), "rb").read()
    second = label_dataset(params)
    assert _done_markers(params.out) == markers  # nothing was redone
    assert open(run.triplets(0), "rb").read() == before
    assert second["triplets"] == first["triplets"] > 0


def test_a_failed_batch_fails_the_flow_and_only_it_is_redone(prefect_harness, tmp_path, monkeypatch):
    import tasks.run.pipeline as pipeline
    from flows.label import label_dataset

    ds = write_dataset(str(tmp_path / "ds"), 40, seed=3)
    clean = _params(tmp_path, ds["detections"], ds["captions"], ds["images_root"], out="clean", batch_size=10)
    label_dataset(clean)
    params = _params(
        tmp_path, ds["detections"], ds["captions"], ds["images_root"], out="faulty", batch_size=10
    )

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
    assert calls == [("parse", 0, 2), ("match", 0, 2), ("region", 0, 2), ("tag", 0, 2), ("threshold", 0, 2)]
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
    params = _params(
        tmp_path, ds["detections"], ds["captions"], ds["images_root"], shard_size=20, batch_size=10
    )
    label_shard(params, 1)
    (run,) = find_runs(params.out)
    st = run_status(run)
    assert [r["stages"]["write"]["done"] for r in st["shards"]] == [0, 1]
    assert st["totals"]["threshold"] == {"done": 1, "failed": 0, "pending": 2}
    with pytest.raises(ValueError, match=r"has shards 0..1; there is no shard 5"):
        label_shard(params, 5)
    summary = label_dataset(params)
    assert run_status(run)["complete"] and summary["shards"] == 2


def test_changed_eta_redoes_only_threshold_and_write_and_equals_a_fresh_run(
    prefect_harness, tmp_path, monkeypatch
):
    """Keys chain per stage: eta changes the threshold stage's key and the run's, so captions, parses,
    candidates and tags are reused in place; the triplets equal a fresh run's byte for byte."""
    import tasks.run.pipeline as pipeline
    from flows.label import label_dataset

    ds = write_dataset(str(tmp_path / "ds"), 30, seed=4)
    first = _params(tmp_path, ds["detections"], ds["captions"], ds["images_root"], batch_size=10)
    label_dataset(first)
    cfg = first.config.model_copy(
        update={"threshold": first.config.threshold.model_copy(update={"eta": 0.5})}
    )
    second = first.model_copy(update={"config": cfg})
    real = pipeline.compute
    calls = []
    monkeypatch.setattr(pipeline, "compute", lambda *a: (calls.append(a[1]), real(*a))[1])
    summary = label_dataset(second)
    assert calls == ["threshold"] * 3  # 3 batches; caption, parse, match, tag reused
    runs = {r.run_key: r for r in find_runs(first.out)}
    assert len(runs) == 2 and summary["run_key"] in runs
    a, b = (runs[k] for k in sorted(runs, key=lambda k: k != summary["run_key"]))
    assert a.key("tag") == b.key("tag") and a.key("threshold") != b.key("threshold")
    assert a.stage_batch("tag", 0, 0) == b.stage_batch("tag", 0, 0)  # the same file, not a copy
    monkeypatch.setattr(pipeline, "compute", real)
    fresh = second.model_copy(update={"out": str(tmp_path / "fresh")})
    label_dataset(fresh)
    (f,) = find_runs(fresh.out)
    assert f.run_key == a.run_key
    assert open(a.triplets(0), "rb").read() == open(f.triplets(0), "rb").read()
    rows = pq.read_table(a.triplets(0)).to_pylist()
    assert rows and all(r["confidence"] >= 0.5 and r["run_key"] == a.run_key for r in rows)


def test_blip_settings_do_not_touch_a_human_caption_run(prefect_harness, tmp_path, monkeypatch):
    """With human captions only, sampling settings are not the caption stage's settings: same keys, nothing
    redone."""
    import tasks.run.pipeline as pipeline
    from flows.label import label_dataset

    ds = write_dataset(str(tmp_path / "ds"), 20, seed=6)
    first = _params(tmp_path, ds["detections"], ds["captions"], ds["images_root"], batch_size=10)
    label_dataset(first)
    cap = first.config.caption.model_copy(update={"top_p": 0.5, "n_cap": 3, "model": "elsewhere/blip"})
    second = first.model_copy(update={"config": first.config.model_copy(update={"caption": cap})})
    calls = []
    real = pipeline.compute
    monkeypatch.setattr(pipeline, "compute", lambda *a: (calls.append(a[1]), real(*a))[1])
    assert label_dataset(second)["run_key"] == label_dataset(first)["run_key"]
    assert calls == [] and len(find_runs(first.out)) == 1


def test_cli_runs_lists_and_key_prefix_picks(prefect_harness, tmp_path, capsys):
    ds = write_dataset(str(tmp_path / "ds"), 12, seed=8)
    out = str(tmp_path / "out")
    base = ["run", "--annotations", ds["detections"], "--images", ds["images_root"], "--captions", ds["captions"],
            "--out", out, "--dataset", "t"]  # fmt: skip
    assert main(base) == 0
    assert main([*base, "--eta", "0.6"]) == 0
    capsys.readouterr()
    assert main(["runs", "--out", out, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["eta"] for r in rows] == [0.2, 0.6] and all(r["complete"] for r in rows)
    assert rows[0]["stage_keys"]["tag"] == rows[1]["stage_keys"]["tag"]
    key = rows[1]["run_key"]
    assert main(["stats", "--out", out, "--run", key[:6]]) == 0
    stats = json.loads(capsys.readouterr().out)  # one JSON document
    assert stats["run_key"] == key
    assert main(["stats", "--out", out]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run_key"] == key and f"showing run {key}" in captured.err
    assert main(["status", "--out", out, "--run", "zzz"]) == 2
    assert capsys.readouterr().err.startswith(
        f"reltag status: error: no run under {out} has a key starting 'zzz'"
    )


def test_stages_of_consecutive_batches_run_side_by_side(prefect_harness, tmp_path, monkeypatch):
    """A unit waits for its input and for its stage's previous batch, nothing else: caption of batch b+1 runs
    while batch b is parsed; within a batch the stages keep their order, within a stage the batches keep
    theirs; the triplets equal those of a one-unit-at-a-time run."""
    import threading
    import time as _time

    import tasks.run.pipeline as pipeline
    from flows.label import run_in_process

    ds = write_dataset(str(tmp_path / "ds"), 40, seed=9)
    params = _params(tmp_path, ds["detections"], ds["captions"], ds["images_root"], batch_size=10)
    real = pipeline.compute
    spans, lock = [], threading.Lock()

    def timed(ctx, stage, shard, batch):
        t0 = _time.perf_counter()
        if stage in ("caption", "parse"):
            _time.sleep(0.3)  # long enough that an overlap, if allowed, must show
        out = real(ctx, stage, shard, batch)
        with lock:
            spans.append((stage, batch, t0, _time.perf_counter()))
        return out

    monkeypatch.setattr(pipeline, "compute", timed)
    run_in_process(params)
    span = {(s, b): (t0, t1) for s, b, t0, t1 in spans}
    assert len(span) == 4 * len(batch_stages())
    order = list(batch_stages())
    for (s, b), (t0, _t1) in span.items():
        i = order.index(s)
        if i:
            assert t0 >= span[(order[i - 1], b)][1]  # its input was written first
        if b:
            assert t0 >= span[(s, b - 1)][1]  # one batch of a stage at a time, in order
    overlaps = [b for b in range(3) if span[("caption", b + 1)][0] < span[("parse", b)][1]]
    assert overlaps, "no caption of batch b+1 ran while batch b was parsed"
    monkeypatch.setattr(pipeline, "compute", real)
    seq = params.model_copy(update={"out": str(tmp_path / "seq")})
    run_in_process(seq, stage_threads=1)
    (a,) = find_runs(params.out)
    (b,) = find_runs(seq.out)
    assert open(a.triplets(0), "rb").read() == open(b.triplets(0), "rb").read()


def test_rerun_of_a_finished_run_starts_no_prefect(prefect_harness, tmp_path):
    """`reltag run` on a finished run answers from the ledger before Prefect (or torch) is imported: run in a
    process where importing either fails."""
    import subprocess
    import sys

    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out]) == 0
    code = (
        "import sys; sys.modules['prefect'] = None; sys.modules['torch'] = None; "
        "from flows.cli import main; sys.exit(main(['demo', '--out', sys.argv[1]]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=120, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 17 triplets" in r.stdout  # 14 before the synonym extensions (astronaut, photographer)
