"""Atomic writes: temporary name, close, rename. A reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

#: Parquet settings of every file reltag writes (zstd; statistics on; no wall-clock metadata, so reruns are byte-identical).
PARQUET_OPTS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


def _tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return posixpath.join(d, f".{b}.tmp-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb"):
    """Open a temporary sibling of `path`; on clean exit close it and rename it over `path`.

    On an exception the temporary file is removed and `path` is untouched.
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    f = fs.open(tmp, mode)
    try:
        yield f
        if hasattr(f, "flush"):
            f.flush()
        if hasattr(f, "fileno") and "b" in mode:
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError, NotImplementedError):
                pass  # not a local file: the object store's PUT is the durable step
        f.close()
        fs.mv(tmp, path)
    except BaseException:
        f.close()
        try:
            fs.rm(tmp)
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
        finally:
            self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.bytes = self.fs.size(self.path)
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
    with fs.open(path, "rb") as f:
        return json.loads(f.read())
