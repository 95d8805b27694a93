"""Object storage for real: the pipeline against an S3-compatible server (moto) on loopback.

Inputs (annotations, captions, images) and the output root on s3://; the output equals a local run's byte for
byte; a `reltag run` killed with -9 and rerun gives the same bytes; a writer killed between its data object and
its ledger record leaves the unit undone (and one killed while writing leaves no object at all).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import fsspec
import pyarrow.parquet as pq
import pytest

import tasks.stages  # noqa: F401  (registers the stages: N_UNITS below counts them at import)
from flows.cli import EXAMPLES
from flows.params import LabelParams
from storage.ledger import Ledger, Unit
from tasks.config import PipelineConfig, PlanConfig
from tasks.run.registry import batch_stages
from tests.s3_server import CREDENTIALS, moto_server, s3_env

pytestmark = [pytest.mark.flow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "reltag-test"
#: the bundled sample: 5 images, 3 shards of 2, batches of 1 image: 5 batches x each batch stage + 3 shard writes
CFG = PipelineConfig(dataset="sample", plan=PlanConfig(shard_size=2, batch_size=1))
N_UNITS = 5 * len(batch_stages()) + 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The loopback server with the sample uploaded; yields (filesystem, endpoint). Endpoint and dummy
    credentials reach s3fs as a deployment would set them: fsspec's per-protocol config
    (FSSPEC_S3_ENDPOINT_URL in the environment fills the same dict) and the AWS_* variables."""
    mp = pytest.MonkeyPatch()
    with moto_server() as endpoint:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        fs.put(str(EXAMPLES / "sample_detections.json"), f"{BUCKET}/in/detections.json")
        fs.put(str(EXAMPLES / "sample_captions.json"), f"{BUCKET}/in/captions.json")
        for p in sorted((EXAMPLES / "images").iterdir()):
            fs.put(str(p), f"{BUCKET}/in/images/{p.name}")
        yield fs, endpoint
        mp.undo()


def _s3_params(out: str) -> LabelParams:
    return LabelParams(
        annotations=f"s3://{BUCKET}/in/detections.json",
        images=f"s3://{BUCKET}/in/images",
        captions=f"s3://{BUCKET}/in/captions.json",
        out=out,
        config=CFG,
    )


def _local_params(out: str, scheme: str = "") -> LabelParams:
    return LabelParams(
        annotations=scheme + str(EXAMPLES / "sample_detections.json"),
        images=scheme + str(EXAMPLES / "images"),
        captions=scheme + str(EXAMPLES / "sample_captions.json"),
        out=scheme + out,
        config=CFG,
    )


def _files(fs, base: str, suffix: str) -> dict[str, bytes]:
    """{path relative to base: bytes} of every file under base ending in suffix (a fresh listing)."""
    fs.invalidate_cache()
    base = fs._strip_protocol(base).rstrip("/")
    return {p[len(base) + 1 :]: fs.cat_file(p) for p in fs.find(base) if p.endswith(suffix)}


def _keyless(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same files with every plan/stage key in their paths replaced by <key>, and triplet files (which
    carry their run key in a column) as their rows without that column: the image root is part of the plan
    key (a plan of other images is another plan), so a run on s3:// images has other keys than the same
    images on local disk. One run per root here, so nothing collides."""
    out = {}
    for p, b in files.items():
        table = pq.read_table(io.BytesIO(b))
        if "run_key" in table.column_names:
            b = repr(table.drop_columns(["run_key"]).to_pylist()).encode()
        out[re.sub(r"(?<=/)[0-9a-f]{16}(?=/)", "<key>", p)] = b
    assert len(out) == len(files)
    return out


@pytest.fixture(scope="module")
def local_out(prefect_harness, tmp_path_factory):
    """The sample labelled on local disk: its output root."""
    from flows.label import run_in_process

    out = str(tmp_path_factory.mktemp("local") / "out")
    summary = run_in_process(_local_params(out))
    # the demo's count (tests/test_flow.py; 14 before the synonym extensions matched "astronaut" and
    # "photographer"): the comparisons are not of nothing
    assert summary["triplets"] == 17
    return out


@pytest.fixture(scope="module")
def local_run(local_out):
    """{relative path without keys: bytes} of every Parquet file the local run wrote (see _keyless)."""
    return _keyless(_files(fsspec.filesystem("file"), local_out, ".parquet"))


def test_default_run_on_s3_equals_a_local_run_byte_for_byte(s3, local_run, local_out, tmp_path, capsys):
    from flows.cli import main
    from flows.label import run_in_process

    fs, _ = s3
    out = f"s3://{BUCKET}/out-flow"
    summary = run_in_process(_s3_params(out))
    assert summary["triplets"] == 17 and summary["output"].startswith(f"{BUCKET}/out-flow/")
    remote = _keyless(_files(fs, out, ".parquet"))
    # every Parquet file (plan shards, each stage's batches, rejects, quarantine, triplets) at the same
    # relative path with the same bytes: the writer sets no wall-clock or path metadata
    assert sorted(remote) == sorted(local_run)
    assert sum("/triplets/" in p for p in remote) == 3
    for rel, blob in local_run.items():
        assert remote[rel] == blob, rel
    markers = _files(fs, out, ".done.json")
    assert len(markers) == N_UNITS
    assert all(json.loads(m)["storage_retries"] == 0 for m in markers.values())
    fs.invalidate_cache()
    assert not [p for p in fs.find(f"{BUCKET}/out-flow") if ".tmp-" in p]  # one PUT per file, no temporaries
    # the run's status and statistics are read from the store as well
    capsys.readouterr()
    assert main(["status", "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
    assert main(["stats", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["triplets"] == 17
    # file:// URIs for all four locations give the same bytes as well
    file_out = str(tmp_path / "file-out")
    run_in_process(_local_params(file_out, scheme="file://"))
    assert _files(fsspec.filesystem("file"), file_out, ".parquet") == _files(
        fsspec.filesystem("file"), local_out, ".parquet"
    )  # file:// and a plain path are one root: the same keys, the same bytes


def _cli(out: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "run", "--annotations", f"s3://{BUCKET}/in/detections.json",
        "--images", f"s3://{BUCKET}/in/images", "--captions", f"s3://{BUCKET}/in/captions.json", "--out", out,
        "--dataset", "sample", "--shard-size", "2", "--batch-size", "1", "--stage-threads", "1",
    ]  # fmt: skip


def _env(endpoint: str, tmp_path) -> dict:
    """A subprocess's environment: the loopback endpoint, and the session's Prefect test server (when it runs),
    so that no run pays for starting a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    env = s3_env(endpoint)
    env["PYTHONPATH"] = ROOT
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return env


def _markers(fs, out: str) -> list[str]:
    fs.invalidate_cache()
    return [p for p in fs.find(fs._strip_protocol(out)) if p.endswith(".done.json")]


@pytest.mark.slow
def test_sigkill_of_an_s3_run_then_rerun_gives_the_same_bytes(s3, local_run, tmp_path):
    fs, endpoint = s3
    out = f"s3://{BUCKET}/out-kill"
    env = _env(endpoint, tmp_path)
    # its own process group, so the kill takes the run's ephemeral Prefect server down with it
    proc = subprocess.Popen(
        _cli(out),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 240
    try:
        while len(_markers(fs, out)) < N_UNITS // 3:
            assert proc.poll() is None, (
                f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
            )
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(_markers(fs, out))
    assert 0 < killed_at < N_UNITS
    r = subprocess.run(_cli(out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 17 triplets" in r.stdout
    markers = _files(fs, out, ".done.json")
    assert len(markers) == N_UNITS
    # a unit killed mid-way left no record and was done once by the rerun; nothing was recorded twice
    assert all(json.loads(m)["attempts"] == 1 for m in markers.values())
    remote = _keyless(_files(fs, out, ".parquet"))
    assert sorted(remote) == sorted(local_run)
    for rel, blob in local_run.items():
        assert remote[rel] == blob, rel


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from flows.params import LabelParams
    from storage.atomic import ParquetBatchWriter
    from storage.ledger import Ledger
    from tasks.config import PipelineConfig, PlanConfig
    from tasks.run.pipeline import run_batch_stage
    from tasks.stages.plan.start import plan_run

    out, mode = sys.argv[1], sys.argv[2]
    b = "s3://{bucket}/in/"
    cfg = PipelineConfig(dataset="sample", plan=PlanConfig(shard_size=2, batch_size=1))
    ctx, _ = plan_run(b + "detections.json", b + "images", out, b + "captions.json", "sample", cfg)
    run_batch_stage(ctx, "verify", 0, 0)  # caption reads the images the verify stage decoded
    run_batch_stage(ctx, "verify", 0, 1)
    run_batch_stage(ctx, "caption", 0, 1)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "before-record":  # the data object is complete; the process dies before its ledger record
        Ledger.record_done = die
    else:  # the process dies in the middle of writing the data object
        real = ParquetBatchWriter.write
        ParquetBatchWriter.write = lambda self, t: (real(self, t), self._f.flush(), die())
    run_batch_stage(ctx, "caption", 0, 0)
    """
).format(bucket=BUCKET)


@pytest.mark.parametrize("mode", ["before-record", "mid-write"])
def test_a_writer_killed_before_its_ledger_record_leaves_the_unit_undone(s3, mode, tmp_path):
    """No half-written object is ever read as done: the ledger record is written only after the data object
    is complete, so a writer killed between the two (or while writing) leaves no record, and the unit is
    redone by the next worker, which takes the dead writer's lease over at once."""
    from tasks.run.pipeline import run_batch_stage
    from tasks.stages.plan.start import plan_run

    fs, endpoint = s3
    out = f"s3://{BUCKET}/out-writer-{mode}"
    r = subprocess.run(
        [sys.executable, "-c", _WRITER, out, mode], env=_env(endpoint, tmp_path), cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    b = f"s3://{BUCKET}/in/"
    ctx, _ = plan_run(b + "detections.json", b + "images", out, b + "captions.json", "sample", CFG)
    layout, ledger = ctx.layout, Ledger(ctx.layout)
    data = layout.stage_batch("caption", 0, 0)
    fs.invalidate_cache()
    assert ledger.is_done(Unit("caption", 0, 1)) and not ledger.is_done(Unit("caption", 0, 0))
    if mode == "before-record":
        with fs.open(data, "rb") as f:
            killed = f.read()
        assert pq.read_table(fs.open(data, "rb")).num_rows > 0  # complete, yet not done: no record
    else:
        assert not fs.exists(data)  # an upload that never completed leaves no object
    info = run_batch_stage(ctx, "caption", 0, 0)
    assert not info.get("skipped") and ledger.read(Unit("caption", 0, 0))["attempts"] == 1
    if mode == "before-record":
        assert fs.cat_file(data) == killed  # the redo wrote the same bytes
    assert not [p for p in fs.find(f"{BUCKET}/out-writer-{mode}") if ".tmp-" in p]


def test_images_read_from_s3_decode_as_from_local_disk(s3):
    from storage.records import ImageRecord
    from tasks.images import load_image

    det = json.loads((EXAMPLES / "sample_detections.json").read_text())
    for im in det["images"]:
        rec = ImageRecord(im["id"], im["file_name"], im["width"], im["height"], 0)
        remote, q = load_image(f"s3://{BUCKET}/in/images", rec)
        assert q is None, q
        local, _ = load_image(str(EXAMPLES / "images"), rec)
        assert remote.tobytes() == local.tobytes() and remote.size == (im["width"], im["height"])
    missing = ImageRecord(99, "nope.png", 10, 10, 0)
    _, q = load_image(f"s3://{BUCKET}/in/images", missing)
    assert q.reason == "missing_file" and f"s3://{BUCKET}/in/images/nope.png" in q.detail


def test_leases_on_s3_are_exclusive_between_holders(s3):
    """s3fs's exclusive create is a conditional PUT (If-None-Match: *) that the server enforces."""
    from storage.lease import Leases

    fs, _ = s3
    a = Leases(fs, f"{BUCKET}/leases", ttl=60, holder="a")
    b = Leases(fs, f"{BUCKET}/leases", ttl=60, holder="b")
    assert a.claim("u/1") and not b.claim("u/1") and a.claim("u/1")
    assert b.holder_of("u/1").holder == "a"
    a.release("u/1")
    assert b.claim("u/1") and not a.claim("u/1")


def test_aws_endpoint_url_alone_configures_s3fs(s3, monkeypatch):
    """The other documented knob: botocore reads AWS_ENDPOINT_URL (no fsspec setting needed)."""
    _, endpoint = s3
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert f"{BUCKET}/in/detections.json" in fs.ls(f"{BUCKET}/in")


def test_cli_refuses_a_missing_s3_annotations_file_in_one_line(s3, tmp_path):
    _, endpoint = s3
    cmd = _cli(f"s3://{BUCKET}/out-missing")
    cmd[cmd.index("--annotations") + 1] = f"s3://{BUCKET}/in/nope.json"
    r = subprocess.run(
        cmd, env=_env(endpoint, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "reltag run: error:" in lines[0] and "nope.json" in lines[0], r.stderr
