"""Storage: explicit schemas, atomic writers, the ledger."""

from __future__ import annotations

import dataclasses

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import records as r
from storage import schemas
from storage.atomic import (
    ParquetBatchWriter,
    _host,
    _tmp_name,
    sweep_stale_temporaries,
    write_json,
    write_table,
)
from storage.layout import RunLayout
from storage.ledger import Ledger, Unit


def test_every_schema_matches_its_record_type():
    for cls, schema in schemas.SCHEMAS.items():
        assert [f.name for f in dataclasses.fields(cls)] == schema.names, cls.__name__


def test_records_round_trip_through_arrow():
    im = r.ImageRecord(7, "a.jpg", 10, 20, 0, [r.Box(1, 3, "cup", 1.5, 2.0, 3.0, 4.0)])
    assert schemas.from_table(schemas.to_table([im], r.ImageRecord), r.ImageRecord) == [im]
    t = r.Triplet(
        1,
        2,
        3,
        4,
        5,
        "a",
        "b",
        [0.0, 0.0, 1.0, 1.0],
        [1.0, 1.0, 2.0, 2.0],
        "on",
        "on",
        0.5,
        1.0,
        0.5,
        1.0,
        1,
        [0, 3],
        2,
        "greedy_overlap",
        "k",
    )
    assert schemas.from_table(schemas.to_table([t], r.Triplet), r.Triplet) == [t]


def test_zero_rows_still_write_a_valid_file(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "x" / "empty.parquet")
    rows, nbytes = write_table(fs, path, schemas.to_table([], r.Triplet), schemas.TRIPLETS)
    assert rows == 0 and nbytes > 0
    assert pq.read_table(path).schema.equals(schemas.TRIPLETS)


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "out.parquet")
    write_table(fs, path, schemas.to_table([], r.Quarantined), schemas.QUARANTINE)
    before = (tmp_path / "out.parquet").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with ParquetBatchWriter(fs, path, schemas.QUARANTINE) as w:
            w.write(schemas.to_table([r.Quarantined("plan", 1, "image 1", "x", "y")], r.Quarantined))
            raise RuntimeError("boom")
    assert (tmp_path / "out.parquet").read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_writer_rejects_a_table_of_another_schema(tmp_path):
    fs = fsspec.filesystem("file")
    with pytest.raises((pa.ArrowInvalid, ValueError, KeyError)):
        with ParquetBatchWriter(fs, str(tmp_path / "t.parquet"), schemas.TRIPLETS) as w:
            w.write(pa.table({"nope": [1]}))
    assert not (tmp_path / "t.parquet").exists()


def test_same_rows_give_byte_identical_files(tmp_path):
    fs = fsspec.filesystem("file")
    rows = [r.Quarantined("plan", i, f"image {i}", "missing_size", "d") for i in range(100)]
    write_table(fs, str(tmp_path / "a.parquet"), schemas.to_table(rows, r.Quarantined), schemas.QUARANTINE)
    write_table(fs, str(tmp_path / "b.parquet"), schemas.to_table(rows, r.Quarantined), schemas.QUARANTINE)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_ledger_records_once_and_tracks_failures(tmp_path):
    layout = RunLayout(str(tmp_path), "ds", "key")
    led = Ledger(layout)
    u = Unit("parse", 3, 12)
    assert not led.is_done(u)
    led.record_failed(u, "ValueError: x")
    led.record_failed(u, "ValueError: y")
    assert led.snapshot() == {"done": set(), "failed": {"parse/shard-00003/batch-00012"}}
    led.record_done(u, {"rows": 5})
    assert led.read(u)["attempts"] == 3 and led.read(u)["rows"] == 5
    assert led.snapshot() == {"done": {"parse/shard-00003/batch-00012"}, "failed": set()}
    with pytest.raises(RuntimeError, match="already recorded as done"):
        led.record_done(u, {"rows": 5})


def test_ledger_ignores_temporaries_of_interrupted_writes(tmp_path):
    layout = RunLayout(str(tmp_path), "ds", "key")
    led = Ledger(layout)
    led.record_done(Unit("write", 0), {})
    d = tmp_path / "ds" / "key" / "_ledger" / "caption" / "shard-00000"
    d.mkdir(parents=True)
    (d / ".batch-00000.done.json.tmp-abc").write_text("{")
    assert led.snapshot()["done"] == {"write/shard-00000/shard"}


def test_sweep_removes_only_temporaries_of_dead_writers_on_this_host(tmp_path):
    import os
    import subprocess
    import sys

    fs = fsspec.filesystem("file")
    d = tmp_path / "run" / "parses" / "shard-00000"
    d.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # exited: its temporaries are stale (as after a kill -9)
    mine = _tmp_name(str(d / "batch-00000.parquet"))  # a live writer: this process
    stale = str(d / f".batch-00000.parquet.tmp-{_host()}-{dead_pid}-0123abcd")
    other_host = str(d / f".batch-00000.parquet.tmp-elsewhere.example-{dead_pid}-0123abcd")  # shared disk
    for path in (mine, stale, other_host, str(d / "batch-00001.parquet"), str(d / ".hidden")):
        open(path, "w").close()
    assert sweep_stale_temporaries(fs, str(tmp_path / "run")) == [stale]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        os.path.basename(p) for p in (mine, other_host, "batch-00001.parquet", ".hidden")
    )
    assert sweep_stale_temporaries(fs, str(tmp_path / "missing")) == []
    assert (
        sweep_stale_temporaries(fsspec.filesystem("memory"), "/run") == []
    )  # object stores: nothing to sweep


def test_write_json_is_stable(tmp_path):
    fs = fsspec.filesystem("file")
    write_json(fs, str(tmp_path / "a.json"), {"b": 1, "a": [1, 2]})
    write_json(fs, str(tmp_path / "b.json"), {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


# -- object stores and retries (storage/atomic.py, storage/retry.py) ----------------------------------------------


def test_object_store_writes_one_object_and_a_failed_write_leaves_none():
    from tests.flaky_fs import FlakyMemoryFileSystem

    FlakyMemoryFileSystem.reset()
    fs = FlakyMemoryFileSystem()
    table = schemas.to_table([r.Quarantined("plan", 1, "image 1", "x", "y")], r.Quarantined)
    rows, nbytes = write_table(fs, "/b/q.parquet", table, schemas.QUARANTINE)
    assert fs.find("/b") == ["/b/q.parquet"] and nbytes == len(fs.cat_file("/b/q.parquet")) and rows == 1
    with pytest.raises(RuntimeError, match="boom"):
        with ParquetBatchWriter(fs, "/b/r.parquet", schemas.QUARANTINE) as w:
            w.write(table)
            raise RuntimeError("boom")
    assert fs.find("/b") == ["/b/q.parquet"]  # nothing uploaded, no temporary object


class _ClientError(Exception):
    """Shaped like botocore's ClientError (matched by class name and response, not imported)."""

    def __init__(self, code: str, status: int):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


_ClientError.__name__ = "ClientError"


class EndpointConnectionError(Exception):
    pass


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (BrokenPipeError(), True),
        (TimeoutError("read timed out"), True),
        (OSError(16, "Please reduce your request rate."), True),  # s3fs: SlowDown -> OSError(EBUSY)
        (OSError(121, "We encountered an internal error."), True),  # s3fs: InternalError -> EREMOTEIO
        (_ClientError("SlowDown", 503), True),
        (_ClientError("ThrottlingException", 400), True),
        (_ClientError("AccessDenied", 403), False),
        (_ClientError("NoSuchKey", 404), False),
        (EndpointConnectionError("Could not connect"), True),
        (OSError(28, "No space left on device"), False),  # a full disk stays full
        (OSError(5, "Input/output error"), False),
        (FileNotFoundError(2, "gone"), False),
        (PermissionError(13, "denied"), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    from storage.retry import is_transient

    assert is_transient(error) is transient


def test_transient_cause_makes_a_wrapper_transient():
    from storage.retry import is_transient

    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)


def test_backoff_doubles_up_to_the_cap_with_jitter_below():
    import random

    from storage.retry import RetryPolicy

    p = RetryPolicy(attempts=6, base=0.2, factor=2.0, cap=1.0, jitter=0.0)
    assert [p.delay(k) for k in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    j = RetryPolicy(base=0.2, factor=2.0, cap=1.0, jitter=0.5)
    rng = random.Random(0)
    for k, full in enumerate([0.2, 0.4, 0.8, 1.0]):
        assert full / 2 <= j.delay(k, rng) <= full
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)


def test_call_retries_transient_errors_counts_them_and_gives_up_with_a_note():
    from storage import retry

    p = retry.RetryPolicy(attempts=4, base=1.0, factor=2.0, cap=10.0, jitter=0.0)
    waits, tries = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    before = retry.total_retries()
    with retry.counting() as c:
        assert retry.call("cat_file", flaky, policy=p, sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0] and c.retries == 2 and c.by_op == {"cat_file": 2}
    assert retry.total_retries() - before == 2

    def never():
        raise TimeoutError("timed out")

    waits.clear()
    with pytest.raises(TimeoutError) as e:
        retry.call("info", never, policy=p, sleep=waits.append)
    assert waits == [1.0, 2.0, 4.0] and "failed 4 times" in e.value.__notes__[0]

    def denied():
        tries.append(1)
        raise PermissionError("denied")

    tries.clear()
    with pytest.raises(PermissionError):
        retry.call("info", denied, policy=p, sleep=waits.append)
    assert len(tries) == 1  # a permanent error is not retried


def test_retrying_exists_does_not_read_a_transient_error_as_absent():
    """fsspec's AbstractFileSystem.exists answers False on any error: a throttled HEAD of a ledger record
    would read as 'not done'. The retrying filesystem retries it and answers True."""
    from storage.retry import RetryingFileSystem, RetryPolicy
    from tests.flaky_fs import FlakyMemoryFileSystem

    FlakyMemoryFileSystem.reset()
    fs = FlakyMemoryFileSystem()
    fs.pipe_file("/b/done.json", b"{}")
    fs.fail_every(1, budget=1)  # the next request fails
    assert fsspec.AbstractFileSystem.exists(fs, "/b/done.json") is False  # what fsspec's default would say
    fs.fail_every(1, budget=1)
    wrapped = RetryingFileSystem(fs, RetryPolicy(base=0.0))
    assert wrapped.exists("/b/done.json") is True and fs.failures == 1
    assert wrapped.exists("/b/missing.json") is False
    fs.fail_every(1, budget=1)
    assert wrapped.open("/b/done.json", "rb").read() == b"{}"  # reads retried too
    FlakyMemoryFileSystem.reset()


def test_ledger_on_a_flaky_store_records_each_unit_once():
    from storage import retry
    from tests.flaky_fs import FlakyMemoryFileSystem

    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    FlakyMemoryFileSystem.reset()
    fast = retry.RetryPolicy(base=0.0)
    old, retry.POLICY = retry.POLICY, fast
    try:
        FlakyMemoryFileSystem.fail_every(2, budget=6)
        ledger = Ledger(RunLayout("flakymem://bucket/out", "d", "k"))
        for b in range(4):
            ledger.record_done(Unit("caption", 0, b), {"rows": b})
        assert FlakyMemoryFileSystem.failures == 6  # every other request failed, six times
        assert sorted(ledger.snapshot()["done"]) == [f"caption/shard-00000/batch-0000{b}" for b in range(4)]
        assert [ledger.read(Unit("caption", 0, b))["rows"] for b in range(4)] == [0, 1, 2, 3]
    finally:
        retry.POLICY = old
        FlakyMemoryFileSystem.reset()


def test_run_gaps_is_finished_only_with_every_shard_written_and_the_run_statistics(tmp_path):
    from storage.atomic import write_json
    from storage.ledger import Ledger, Unit, run_gaps

    layout = RunLayout(str(tmp_path), "d", "rk", "pk")
    ledger = Ledger(layout)
    ledger.record_done(Unit("write", 0), {})
    ledger.record_failed(Unit("tag", 1, 0), "boom")
    assert run_gaps(layout, [0, 1], ledger.snapshot(), "write") == [
        "1 of 2 shards have no 'write' record [1]",
        f"the run statistics {layout.run_stats} are not written",
        "1 failed units ['tag/shard-00001/batch-00000']",
    ]
    ledger.record_done(Unit("write", 1), {})
    assert run_gaps(layout, [0, 1], ledger.snapshot(), "write") == [
        f"the run statistics {layout.run_stats} are not written",
        "1 failed units ['tag/shard-00001/batch-00000']",
    ]
    write_json(layout.fs, layout.run_stats, {"triplets": 0})
    assert run_gaps(layout, [0, 1], ledger.snapshot(), "write") == []  # a failure left behind decides nothing
    assert run_gaps(layout, [0, 1, 2], ledger.snapshot(), "write") == [
        "1 of 3 shards have no 'write' record [2]",
        "1 failed units ['tag/shard-00001/batch-00000']",
    ]
