"""Shared by the real-server tests: a PostgreSQL fixture and a `prefect server` on loopback with the
deployments of prefect.yaml and a process work pool. Skips (by marker) without the PostgreSQL binaries."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
PREFECT = str(Path(sys.executable).parent / "prefect")

#: the marks of every test module that needs the real server
SERVER_MARKS = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        not PG_BIN,
        reason="[postgres] PostgreSQL server binaries are not installed (apt-get install postgresql)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str], **kw):
    # initdb and postgres refuse to run as root
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + cmd, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = PG_BIN[-1]
    # not under pytest's tmp folder: that one is private to root, and the server runs as the postgres user
    base = Path(tempfile.mkdtemp(prefix="reltag-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
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


def wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
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


class Server:
    """A running `prefect server` (its port, the environment that reaches it) and its subprocesses."""

    def __init__(self, port: int, env: dict, tmp: Path):
        self.port, self.env, self.tmp = port, env, tmp
        self.procs: list[subprocess.Popen] = []

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PREFECT, *args], env=self.env, cwd=REPO, check=True, capture_output=True, text=True, timeout=300
        )

    def worker(self, name: str, *extra: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "reltag-local", "--name", name, *extra],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def post(self, path: str, body: dict | None = None, method: str = "POST"):
        req = urllib.request.Request(
            f"{self.api}/{path}", data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"}, method=method,
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            blob = r.read()
        return json.loads(blob) if blob else None

    def flow_runs(self) -> list[dict]:
        """Every flow run, with its flow's name under "flow_name"."""
        flows = {f["id"]: f["name"] for f in self.post("flows/filter")}
        runs = self.post("flow_runs/filter")
        for fr in runs:
            fr["flow_name"] = flows.get(fr["flow_id"])
        return runs


@contextlib.contextmanager
def prefect_server(postgres_url: str, tmp_path: Path, deploy: bool = True):
    """`prefect server start` on a free loopback port, backed by `postgres_url`; with deploy: the work pool
    reltag-local and `prefect deploy --all` (prefect.yaml). Stops the server and every worker at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=postgres_url,
        PREFECT_UI_ENABLED="true",
        RELTAG_HOME=str(REPO),
        HF_HUB_OFFLINE="1",
    )
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as slog:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=slog,
            stderr=subprocess.STDOUT,
        )
    srv = Server(port, env, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, server_log)
        env["PREFECT_API_URL"] = srv.api
        if deploy:
            srv.cli("work-pool", "create", "reltag-local", "--type", "process")
            srv.cli("--no-prompt", "deploy", "--all")
        yield srv
    finally:
        for p in (*srv.procs, proc):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
