"""Atomic writes: temporary name, close, rename. A reader never sees a half-written file."""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import socket
import uuid
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from storage.retry import retrying, unwrap

#: Parquet settings of every file reltag writes (zstd; statistics on; no wall-clock metadata, so reruns are byte-identical).
PARQUET_OPTS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


#: `.<name>.tmp-<host>-<pid>-<random>`: the writer's host and process id say whether a leftover is stale.
_TMP_RE = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return posixpath.join(d, f".{b}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_stale_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Remove the temporary files under `root` that a killed writer left behind; return their paths.

    Only files written on this host by a process that no longer runs are removed, so a run writing
    beside this one (another process, another machine on a shared disk) keeps its temporaries. Object
    stores are skipped: an upload that never completed leaves no object there.
    """
    if not is_local(fs) or not fs.exists(root):
        return []
    host, removed = _host(), []
    for path in fs.find(root):
        m = _TMP_RE.match(posixpath.basename(path))
        if m and m["host"] == host and not _alive(int(m["pid"])):
            try:
                fs.rm(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


#: Protocols whose PUT makes an object appear whole or not at all (a multipart upload too, at its completion):
#: a file is written there in one upload to its final name, without a temporary object and a copy.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local(fs) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb"):
    """A file to write `path` through; `path` appears only complete, on clean exit, never half-written.

    Local disk: a temporary sibling, flushed, fsynced, closed and renamed over `path`. Object stores
    (ATOMIC_PUT_PROTOCOLS): the bytes are gathered in memory and uploaded in one PUT to `path` on exit,
    retried on transient errors (storage.retry); an upload that never completes leaves no object. Other
    filesystems: a temporary sibling, then a rename. On an exception `path` is untouched and no temporary is
    left (a killed writer's local temporaries are removed by sweep_stale_temporaries).
    """
    if "b" not in mode or "w" not in mode:
        raise ValueError(f"atomic_open writes bytes from the start ('wb'), not mode {mode!r} ({path})")
    if not is_local(fs) and set(_protocols(fs)) & ATOMIC_PUT_PROTOCOLS:
        buf = io.BytesIO()
        yield buf
        retrying(fs).pipe_file(path, buf.getvalue())
        return
    retrying(fs).makedirs(posixpath.dirname(path), exist_ok=True)
    raw = unwrap(fs)
    tmp = _tmp_name(path)
    f = raw.open(tmp, mode)
    try:
        yield f
        if hasattr(f, "flush"):
            f.flush()
        if hasattr(f, "fileno"):
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError, NotImplementedError, io.UnsupportedOperation):
                pass  # not a local file: the store's upload at close is the durable step
        f.close()
        if is_local(raw):
            raw.mv(tmp, path)
        else:
            retrying(fs).mv(tmp, path)
    except BaseException:
        f.close()
        try:
            raw.rm(tmp)
        except FileNotFoundError:
            pass
        raise


class ParquetBatchWriter:
    """Context manager that writes one Parquet file atomically with an explicit schema.

    Writing zero rows still writes a valid file. After closing, `rows` and `bytes` report what was written.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, schema: pa.Schema):
        self.fs, self.path, self.schema = fs, path, schema
        self.rows = 0
        self.bytes = 0

    def __enter__(self):
        self._cm = atomic_open(self.fs, self.path, "wb")
        self._f = self._cm.__enter__()
        self._w = pq.ParquetWriter(self._f, self.schema, **PARQUET_OPTS)
        return self

    def write(self, table: pa.Table) -> None:
        if table.schema != self.schema:
            table = table.cast(self.schema)  # raises with both schemas when they do not fit
        self._w.write_table(table)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb):
        try:
            self._w.close()
            size = self._f.tell()
        except BaseException as e:
            if not self._cm.__exit__(type(e), e, e.__traceback__):
                raise
            return False
        self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.bytes = size
        return False


def write_table(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, schema: pa.Schema
) -> tuple[int, int]:
    """Write `table` to `path` atomically; returns (rows, bytes)."""
    with ParquetBatchWriter(fs, path, schema) as w:
        w.write(table)
    return w.rows, w.bytes


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj) -> None:
    """Atomically write pretty, key-sorted JSON (stable bytes for the same object)."""
    blob = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    with atomic_open(fs, path, "wb") as f:
        f.write(blob)


def read_json(fs: fsspec.AbstractFileSystem, path: str):
    """The JSON document at `path`, read whole (retried on transient errors)."""
    return json.loads(retrying(fs).cat_file(path))
