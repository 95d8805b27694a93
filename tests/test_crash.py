"""Kill -9 in the middle of a run, rerun: identical output, no duplicated batch, every unit done once."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from benchmarks.synth import write_dataset
from tasks.run.registry import batch_stages

pytestmark = [pytest.mark.flow, pytest.mark.slow]


def _cmd(ds, out):
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--annotations",
        ds["detections"],
        "--images",
        os.path.dirname(ds["detections"]),
        "--captions",
        ds["captions"],
        "--out",
        out,
        "--dataset",
        "crash",
        "--batch-size",
        "20",
        "--shard-size",
        "100",
    ]


def _env(tmp_path):
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # one database for the three runs: migrations once
    env.pop("PREFECT_API_URL", None)
    return env


def _markers(out):
    return sorted(glob.glob(os.path.join(out, "crash", "*", "_ledger", "**", "*.done.json"), recursive=True))


def test_sigkill_mid_run_then_rerun_gives_identical_output(tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), 200, seed=7)
    env = _env(tmp_path)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    subprocess.run(_cmd(ds, ref), env=env, check=True, capture_output=True, timeout=600)
    n_units = len(_markers(ref))
    assert n_units == 2 * (5 * len(batch_stages()) + 1)  # 2 shards x 5 batches x stages + 2 shard writes

    # its own process group, so the kill takes the run's ephemeral Prefect server down with it (as a
    # scheduler killing the job, or a machine losing power, would)
    proc = subprocess.Popen(
        _cmd(ds, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    try:
        while len(_markers(out)) < n_units // 3:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(_markers(out))
    assert 0 < killed_at < n_units

    subprocess.run(_cmd(ds, out), env=env, check=True, capture_output=True, timeout=600)
    markers = _markers(out)
    assert len(markers) == n_units
    for m in markers:
        with open(m) as f:
            assert json.load(f)["attempts"] == 1, (
                m
            )  # a killed unit left no record; nothing was recorded twice
    ref_files = sorted(glob.glob(os.path.join(ref, "crash", "*", "triplets", "*", "*.parquet")))
    assert len(ref_files) == 2  # one per shard: the comparison below cannot pass on nothing
    for ref_file in ref_files:
        mine = ref_file.replace(ref, out)
        assert open(mine, "rb").read() == open(ref_file, "rb").read(), mine
        t = pq.read_table(mine).to_pylist()
        keys = [(r["image_id"], r["subject_ann_id"], r["object_ann_id"], r["relation"]) for r in t]
        assert len(keys) == len(set(keys)), "duplicated triplets"
    # the killed run's half-written temporaries (if the kill caught a write) were swept by the rerun
    leftovers = glob.glob(os.path.join(out, "**", ".*.tmp-*"), recursive=True)
    assert leftovers == []
