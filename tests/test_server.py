"""A real deployment: PostgreSQL + `prefect server` + a process work pool + `prefect deploy` + a worker.

Everything runs on loopback in temporary folders and is stopped at the end. Skipped (by marker) where the
PostgreSQL server binaries are not installed; `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        not PG_BIN,
        reason="[postgres] PostgreSQL server binaries are not installed (apt-get install postgresql)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str], **kw):
    # initdb and postgres refuse to run as root
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def postgres():
    import tempfile

    bin_dir = PG_BIN[-1]
    # not under pytest's tmp folder: that one is private to root, and the server runs as the postgres user
    base = Path(tempfile.mkdtemp(prefix="reltag-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    _as_postgres([f"{bin_dir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    _as_postgres(
        [
            f"{bin_dir}/pg_ctl",
            "-D",
            str(data),
            "-w",
            "-l",
            str(base / "pg.log"),
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
            "start",
        ]
    )
    try:
        _as_postgres([f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"])
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        _as_postgres([f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def _wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s: {log.read_text()[-3000:]}")


def test_deployment_runs_on_a_prefect_server_backed_by_postgres(postgres, tmp_path):
    prefect = str(Path(sys.executable).parent / "prefect")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=postgres,
        PREFECT_UI_ENABLED="true",
        RELTAG_HOME=str(REPO),
        HF_HUB_OFFLINE="1",
    )
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as slog:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=slog,
            stderr=subprocess.STDOUT,
        )
    worker = None
    fan_workers: list[subprocess.Popen] = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180, server, server_log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:  # the UI is served too
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"

        def cli(*args):
            return subprocess.run(
                [prefect, *args], env=env, cwd=REPO, check=True, capture_output=True, text=True, timeout=300
            )

        cli("work-pool", "create", "reltag-local", "--type", "process")
        cli("--no-prompt", "deploy", "--all")
        out = tmp_path / "out"
        params = {
            "params": {
                "annotations": str(REPO / "examples" / "sample_detections.json"),
                "images": str(REPO / "examples" / "images"),
                "captions": str(REPO / "examples" / "sample_captions.json"),
                "out": str(out),
                "dataset": "sample",
            }
        }
        run = cli("deployment", "run", "label-dataset/label-dataset", "--params", json.dumps(params))
        assert "label-dataset/label-dataset" in run.stdout
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "w") as wlog:
            worker = subprocess.Popen(
                [prefect, "worker", "start", "--pool", "reltag-local", "--run-once"],
                env=env,
                cwd=REPO,
                stdout=wlog,
                stderr=subprocess.STDOUT,
            )
        worker.wait(timeout=600)
        triplets = glob.glob(str(out / "sample" / "*" / "triplets" / "*" / "shard-00000.parquet"))
        assert triplets, f"no triplets written; worker log:\n{worker_log.read_text()[-4000:]}"
        import pyarrow.parquet as pq

        assert pq.read_table(triplets[0]).num_rows > 0
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/flow_runs/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())
        assert [(fr["name"], fr["state_type"]) for fr in runs] == [("label sample", "COMPLETED")]
        # the run's audit is in the server's artifacts, under the dataset's keys, attached to the flow run
        from flows.artifacts import artifact_keys

        keys = sorted(artifact_keys("sample").values())
        areq = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/artifacts/filter",
            data=json.dumps({"artifacts": {"key": {"any_": keys}}}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(areq, timeout=10) as r:
            arts = json.loads(r.read())
        assert sorted(a["key"] for a in arts) == keys and {a["flow_run_id"] for a in arts} == {runs[0]["id"]}

        # many workers: the fan-out flow starts one label-shard flow run per shard; two workers take them
        fan = tmp_path / "fan"
        fparams = {
            "params": {
                **params["params"],
                "out": str(fan),
                "config": {"plan": {"shard_size": 2, "batch_size": 1}},
            }
        }  # 5 images: 3 shards
        run = cli(
            "deployment", "run", "label-dataset-fanout/label-dataset-fanout", "--params", json.dumps(fparams)
        )
        for i in (1, 2):
            log = open(tmp_path / f"fan-worker-{i}.log", "w")
            fan_workers.append(subprocess.Popen(
                [prefect, "worker", "start", "--pool", "reltag-local", "--limit", "2", "--name", f"fan-{i}"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        deadline = time.time() + 600
        while True:
            with urllib.request.urlopen(req, timeout=10) as r:
                runs = json.loads(r.read())
            parent = [fr for fr in runs if fr["name"] == "label sample over workers"]
            if parent and parent[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, "fan-out did not finish: " + "".join(
                (tmp_path / f"fan-worker-{i}.log").read_text()[-2000:] for i in (1, 2)
            )
            time.sleep(2)
        logs = "".join((tmp_path / f"fan-worker-{i}.log").read_text() for i in (1, 2))
        assert parent[0]["state_type"] == "COMPLETED", logs[-4000:]
        shard_runs = sorted(fr["name"] for fr in runs if fr["name"].startswith("label sample shard-"))
        assert shard_runs == [f"label sample shard-0000{i}" for i in range(3)]
        assert all(fr["state_type"] == "COMPLETED" for fr in runs), [
            (fr["name"], fr["state_type"]) for fr in runs
        ]
        import re

        # the parent and the three shards were each submitted by one of the two workers (a worker may log a
        # submission attempt it then loses to the other, so ids are compared, not lines counted)
        submitted = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", logs))
        assert submitted == {fr["id"] for fr in runs if fr["name"].startswith("label sample ")} - {
            fr["id"] for fr in runs if fr["name"] == "label sample"
        }
        files = sorted(glob.glob(str(fan / "sample" / "*" / "triplets" / "*" / "shard-*.parquet")))
        assert (
            len(files) == 3
            and sum(pq.read_table(f).num_rows for f in files) == pq.read_table(triplets[0]).num_rows
        )
    finally:
        for p in (*fan_workers, worker, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
