"""Many workers on one run: units are claimed with leases, so processes share a run without doing a unit
twice, and a worker killed with -9 loses its units to the others."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.synth import write_dataset
from tasks.run.registry import batch_stages

pytestmark = [pytest.mark.flow, pytest.mark.slow]


def _cmd(ds, out):
    return [
        sys.executable, "-m", "flows.cli", "run", "--annotations", ds["detections"],
        "--images", os.path.dirname(ds["detections"]), "--captions", ds["captions"], "--out", out,
        "--dataset", "w", "--batch-size", "20", "--shard-size", "100",
    ]  # fmt: skip


def _env(tmp_path, name):
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / f"prefect-{name}")  # each worker its own temporary Prefect server
    env.pop("PREFECT_API_URL", None)
    return env


def _markers(out, kind="done"):
    return sorted(glob.glob(os.path.join(out, "w", "*", "_ledger", "**", f"*.{kind}.json"), recursive=True))


def _triplets(out):
    files = sorted(glob.glob(os.path.join(out, "w", "*", "triplets", "*", "*.parquet")))
    return {os.path.relpath(f, out): open(f, "rb").read() for f in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    ds = write_dataset(str(tmp / "ds"), 200, seed=13)
    out = str(tmp / "out")
    subprocess.run(_cmd(ds, out), env=_env(tmp, "ref"), check=True, capture_output=True, timeout=600)
    return ds, out


def test_two_runs_started_together_share_the_work(reference, tmp_path):
    ds, ref = reference
    out = str(tmp_path / "out")
    procs = [
        subprocess.Popen(
            _cmd(ds, out), env=_env(tmp_path, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for name in ("a", "b")
    ]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    n_units = 2 * (5 * len(batch_stages()) + 1)  # 2 shards x 5 batches x stages + 2 shard writes
    markers = _markers(out)
    assert len(markers) == n_units and not _markers(out, "failed")
    for m in markers:
        with open(m) as f:
            rec = json.load(f)
        assert rec["attempts"] == 1 and not rec.get("duplicate_work"), m  # every unit done and recorded once
    assert _triplets(out) == _triplets(ref) and len(_triplets(ref)) == 2
    assert not glob.glob(os.path.join(out, "w", "*", "_leases", "**", "*.lease.json"), recursive=True)


def test_a_worker_killed_with_sigkill_loses_its_units_to_the_other(reference, tmp_path):
    ds, ref = reference
    out = str(tmp_path / "out")
    victim = subprocess.Popen(_cmd(ds, out), env=_env(tmp_path, "victim"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    try:
        while len(_markers(out)) < 6:  # the victim is mid-run, holding leases
            assert victim.poll() is None, "the run finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        survivor = subprocess.Popen(_cmd(ds, out), env=_env(tmp_path, "survivor"), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        time.sleep(1.0)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        log = survivor.communicate(timeout=600)[0].decode(errors="replace")
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert survivor.returncode == 0, log[-4000:]
    markers = _markers(out)
    assert len(markers) == 2 * (5 * len(batch_stages()) + 1)
    for m in markers:
        with open(m) as f:
            assert json.load(f)["attempts"] == 1, m  # the killed worker's units left no record
    assert _triplets(out) == _triplets(ref)
