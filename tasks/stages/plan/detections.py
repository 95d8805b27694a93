"""Plan stage, reading: stream and validate a COCO / Objects365 detection JSON, quarantine bad records."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator

import fsspec
import ijson

from storage import schemas
from storage.atomic import ParquetBatchWriter
from storage.records import Quarantined


def file_checksum(path: str, block: int = 8 << 20) -> tuple[str, int]:
    """sha256 hex digest and size in bytes of a local or fsspec file."""
    h = hashlib.sha256()
    n = 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class _NonFinite:
    """A binary file wrapper that quotes the bare tokens NaN, Infinity and -Infinity outside JSON strings.

    Python's json.dump writes them for non-finite floats; yajl (ijson's C backend) rejects them. Quoted, they
    reach the record checks as strings and the record holding one is quarantined with its values, instead
    of the whole file failing. String state is tracked across reads (escapes included); a chunk without
    backslashes or tokens costs one count of its quotes.
    """

    _TOKEN = re.compile(rb'"|-?Infinity|NaN')
    _BODY = re.compile(rb'(?s)(?:[^"\\]|\\.)*')  # string body up to its closing quote (escapes consumed)
    _HOLD = 9  # len(b"-Infinity"): bytes held back so that no token is cut between two reads

    def __init__(self, f, block: int = 1 << 16):
        self._f, self._block = f, block
        self._in_str, self._carry, self._eof = False, b"", False
        self.pos = 0  # input bytes consumed, for error messages

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson reads 0 bytes to learn whether the file is binary
            return b""
        while True:
            if self._eof and not self._carry:
                return b""
            raw = b"" if self._eof else self._f.read(max(n, self._block) if n and n > 0 else self._block)
            self.pos += len(raw)
            if not raw:
                self._eof = True
            buf = self._carry + raw
            limit = len(buf) if self._eof else max(0, len(buf) - self._HOLD)
            out, done = self._scan(buf, limit)
            self._carry = buf[done:]
            if self._eof and self._carry and done == 0:  # a dangling backslash at the very end: pass it on
                out, self._carry = out + self._carry, b""
            if out or (self._eof and not self._carry):
                return out

    def _scan(self, buf: bytes, limit: int) -> tuple[bytes, int]:
        if b"\\" not in buf and b"NaN" not in buf and b"Infinity" not in buf:
            if buf.count(b'"', 0, limit) % 2:
                self._in_str = not self._in_str
            return buf[:limit], limit
        parts, start, pos = [], 0, 0
        while pos < limit:
            if self._in_str:
                pos = self._BODY.match(buf, pos).end()
                if pos >= len(buf) or buf[pos] != 0x22:  # ran out inside the string (or on a final backslash)
                    break
                self._in_str, pos = False, pos + 1
                continue
            m = self._TOKEN.search(buf, pos)
            if m is None or m.start() >= limit:
                pos = limit
                break
            if m.group() == b'"':
                self._in_str, pos = True, m.end()
            else:
                parts += [buf[start : m.start()], b'"', m.group(), b'"']
                start = pos = m.end()
        parts.append(buf[start:pos])
        return b"".join(parts), pos


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _items(path: str, prefix: str) -> Iterator:
    with fsspec.open(path, "rb") as f:
        src = _NonFinite(f)
        try:
            yield from ijson.items(src, prefix, use_float=True)
        except ijson.common.JSONError as e:
            raise ValueError(
                f"annotations file {path} is not valid JSON (while reading '{prefix}', near byte {src.pos}): "
                f"{_first_line(e)}"
            ) from e


def check_top_level(path: str) -> None:
    """A detection file is one JSON object: refuse an empty file, a list, or anything else, in one line."""
    with fsspec.open(path, "rb") as f:
        head = f.read(4096)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise ValueError(
            f"annotations file {path} is empty (expected a COCO / Objects365 detection JSON object)"
        )
    if text[:1] != b"{":
        what = {b"[": "a JSON list", b'"': "a JSON string"}.get(
            text[:1], f"not JSON (starts with {text[:16]!r})"
        )
        raise ValueError(
            f"annotations file {path} is {what}, not an object with 'images', 'annotations' and 'categories'"
        )


def _values(obj) -> str | None:
    """A record's values as JSON for its quarantine row (at most 2000 characters)."""
    try:
        text = json.dumps(obj, default=repr)
    except (TypeError, ValueError):
        text = json.dumps(repr(obj))
    return text if len(text) <= 2000 else text[:1997] + "..."


class _Quarantine:
    """Quarantine rows of the plan stage, flushed to one Parquet file as they accumulate."""

    def __init__(self, fs, path):
        self.rows: list[Quarantined] = []
        self.total = 0
        self.reasons: Counter = Counter()
        self._w = ParquetBatchWriter(fs, path, schemas.QUARANTINE).__enter__()

    def add(self, image_id, record, reason, detail, values=None):
        self.rows.append(Quarantined("plan", image_id, record, reason, detail, values))
        self.reasons[reason] += 1
        self.total += 1
        if len(self.rows) >= 10000:
            self.flush()

    def flush(self):
        if self.rows:
            self._w.write(schemas.to_table(self.rows, Quarantined))
            self.rows = []

    def close(self, exc=None):
        self.flush()
        self._w.__exit__(type(exc) if exc else None, exc, None)


def read_categories(path: str) -> list[dict]:
    """The `categories` list, validated: integer ids, unique, non-empty names."""
    check_top_level(path)
    found = list(_items(path, "categories"))
    if not found:
        raise ValueError(
            f"annotations file {path} has no 'categories' key (not a COCO / Objects365 detection file?)"
        )
    if not isinstance(found[0], list):
        raise ValueError(f"annotations file {path}: 'categories' is a {type(found[0]).__name__}, not a list")
    cats = []
    seen = set()
    for c in found[0]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise ValueError(
                f"annotations file {path}: category {c!r:.200} needs an integer 'id' and a string 'name'"
            )
        if c["id"] in seen:
            raise ValueError(f"annotations file {path}: category id {c['id']} appears twice")
        seen.add(c["id"])
        cats.append({"id": c["id"], "name": c["name"]})
    if not cats:
        raise ValueError(f"annotations file {path} has no 'categories'")
    return sorted(cats, key=lambda c: c["id"])
