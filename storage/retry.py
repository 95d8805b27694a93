"""Retries of transient storage errors (throttling, connection resets, timeouts) with capped exponential backoff.

reltag does few kinds of storage operations: look (exists, info, size, listings), read a whole small file,
write a whole file (one PUT on object stores), rename, delete. Each is idempotent, so each is retried on
its own when it fails transiently; nothing else is retried (a missing file, a permission error, a full disk,
a bad request fail at once). Every retry is counted, per process and per thread (`counting`), so that a
unit's ledger record says how many retries it took.

s3fs retries some errors itself (a few attempts within one call) and raises the rest translated to builtin
exceptions (SlowDown, ServiceUnavailable -> OSError(EBUSY), InternalError -> OSError(EREMOTEIO),
RequestTimeout -> TimeoutError); this layer comes on top, with longer waits, and covers every fsspec backend.
"""

from __future__ import annotations

import contextlib
import errno
import io
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: errno values of OSErrors that go away by themselves: the store is busy, a connection broke or timed out.
#: Not here on purpose: ENOSPC (a full disk stays full for the seconds we wait), EIO (a local device error),
#: EACCES/EPERM, ENOENT, EEXIST, EINVAL.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in (
        "EAGAIN", "EBUSY", "ECONNABORTED", "ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETDOWN",
        "ENETRESET", "ENETUNREACH", "EPIPE", "EREMOTEIO", "ETIMEDOUT",
    )
    if hasattr(errno, n)
)  # fmt: skip

#: Error codes of S3-style ClientErrors (botocore) that mean "try again later".
TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
        "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
        "500", "502", "503", "504",
    }
)  # fmt: skip

#: Exception classes of the HTTP stacks under fsspec backends (botocore, aiohttp, fsspec, http.client), matched
#: by name so that storage/ imports none of them.
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
        "HTTPClientError", "ResponseParserError", "ServerDisconnectedError", "ClientConnectionError",
        "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "RemoteDisconnected",
    }
)  # fmt: skip


def is_transient(e: BaseException) -> bool:
    """True when `e` is worth retrying: throttling, a broken or refused connection, a timeout, a 5xx."""
    if isinstance(e, FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError):
        return False
    if isinstance(e, ConnectionError | TimeoutError):  # ConnectionResetError, BrokenPipeError, ...
        return True
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
        return True
    names = {c.__name__ for c in type(e).__mro__}
    if names & TRANSIENT_CLASS_NAMES:
        return True
    response = getattr(e, "response", None)
    if "ClientError" in names and isinstance(response, dict):
        err = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(err.get("Code", "")) in TRANSIENT_CODES or status in (429, 500, 502, 503, 504)
    cause = e.__cause__
    return cause is not None and cause is not e and is_transient(cause)


@dataclass(frozen=True)
class RetryPolicy:
    """attempts: tries in all (1 = no retry); the k-th retry waits min(cap, base * factor**k) seconds, times a
    random factor in [1 - jitter, 1] so that workers throttled together do not come back together."""

    attempts: int = 6
    base: float = 0.2
    factor: float = 2.0
    cap: float = 10.0
    jitter: float = 0.5

    def __post_init__(self):
        if self.attempts < 1 or self.base < 0 or self.factor < 1 or self.cap < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(
                f"RetryPolicy needs attempts >= 1, base >= 0, factor >= 1, cap >= 0, 0 <= jitter <= 1: {self}"
            )

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (0 = the first retry)."""
        d = min(self.cap, self.base * self.factor**retry)
        return d * (1.0 - self.jitter * (rng or random).random())


#: The policy of every storage operation: 6 tries over about 0.2 + 0.4 + 0.8 + 1.6 + 3.2 = 6.2 s at most.
POLICY = RetryPolicy()

_lock = threading.Lock()
_total = {"retries": 0}
_local = threading.local()


def total_retries() -> int:
    """Retries of storage operations in this process so far."""
    return _total["retries"]


class RetryCount:
    """Retries counted by `counting()` in one thread."""

    def __init__(self):
        self.retries = 0
        self.by_op: dict[str, int] = {}


@contextlib.contextmanager
def counting():
    """Count the retries this thread makes while the block runs (nested blocks count into each one open)."""
    c = RetryCount()
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(c)
    try:
        yield c
    finally:
        stack.remove(c)


def _count(op: str) -> None:
    with _lock:
        _total["retries"] += 1
    for c in getattr(_local, "stack", ()):
        c.retries += 1
        c.by_op[op] = c.by_op.get(op, 0) + 1


def call(
    op: str,
    fn: Callable,
    *args,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs,
):
    """`fn(*args, **kwargs)`, retried while it raises a transient error (is_transient), up to the policy's
    attempts; the last error is raised with a note of how many tries it took. `op` names the operation in
    the counts and the note."""
    p = policy or POLICY
    for k in range(p.attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            if k + 1 == p.attempts:
                e.add_note(f"storage: {op} failed {p.attempts} times with transient errors; giving up")
                raise
            _count(op)
            sleep(p.delay(k))
    raise AssertionError("unreachable")


class RetryingFileSystem:
    """An fsspec filesystem whose idempotent operations are retried on transient errors (see `call`).

    Wraps: exists, isfile, isdir, info, size, ls, find, glob, cat_file, pipe_file, rm_file, rm, mv, makedirs,
    and `open` for reading (the whole file is read under retry and served from memory: reltag reads its own
    small outputs through this, never the multi-GB inputs). Writing `open` modes and everything else pass
    through unretried (an exclusive create, "xb", is not idempotent). `fs` is the wrapped filesystem.

    `exists` differs from fsspec's on purpose: fsspec's AbstractFileSystem.exists answers False on *any*
    error, so a throttled HEAD of a ledger record would read as "not done"; here only FileNotFoundError means
    absent, a transient error is retried and any other error raised. It also drops the path from the
    listing cache first (s3fs answers exists from a cached listing of the folder, which goes stale when
    another worker writes there).
    """

    def __init__(self, fs, policy: RetryPolicy | None = None):
        self.fs = fs
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def __repr__(self) -> str:
        return f"RetryingFileSystem({self.fs!r})"

    def _call(self, op, *args, **kwargs):
        return call(op, getattr(self.fs, op), *args, policy=self.policy, **kwargs)

    def _fresh(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def exists(self, path, **kwargs) -> bool:
        def look():
            self._fresh(path)
            try:
                self.fs.info(path, **kwargs)
            except FileNotFoundError:
                return False
            return True

        return call("exists", look, policy=self.policy)

    def isfile(self, path) -> bool:
        def look():
            self._fresh(path)
            try:
                return self.fs.info(path).get("type") == "file"
            except FileNotFoundError:
                return False

        return call("isfile", look, policy=self.policy)

    def info(self, path, **kwargs):
        self._fresh(path)
        return self._call("info", path, **kwargs)

    def size(self, path):
        self._fresh(path)
        return self._call("size", path)

    def isdir(self, path):
        return self._call("isdir", path)

    def ls(self, path, **kwargs):
        return self._call("ls", path, **kwargs)

    def find(self, path, **kwargs):
        return self._call("find", path, **kwargs)

    def glob(self, path, **kwargs):
        return self._call("glob", path, **kwargs)

    def cat_file(self, path, **kwargs):
        return self._call("cat_file", path, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        return self._call("pipe_file", path, value, **kwargs)

    def makedirs(self, path, exist_ok=False):
        return self._call("makedirs", path, exist_ok=exist_ok)

    def rm_file(self, path):
        return self._call("rm_file", path)

    def rm(self, path, **kwargs):
        return self._call("rm", path, **kwargs)

    def mv(self, src, dst, **kwargs):
        """Rename; a retry after a try that did move (the error came after the copy and the delete) finds the
        source gone and the destination there, and counts as done."""
        tries = [0]

        def move():
            tries[0] += 1
            try:
                return self.fs.mv(src, dst, **kwargs)
            except FileNotFoundError:
                if tries[0] > 1 and self.fs.exists(dst):
                    return None
                raise

        return call("mv", move, policy=self.policy)

    def open(self, path, mode="rb", **kwargs):
        if mode in ("rb", "r"):
            blob = self.cat_file(path)
            return (
                io.BytesIO(blob)
                if mode == "rb"
                else io.StringIO(blob.decode(kwargs.get("encoding") or "utf-8"))
            )
        return self.fs.open(path, mode, **kwargs)


def retrying(fs, policy: RetryPolicy | None = None) -> RetryingFileSystem:
    """`fs` wrapped in RetryingFileSystem (once: an already wrapped filesystem is returned as it is)."""
    return fs if isinstance(fs, RetryingFileSystem) else RetryingFileSystem(fs, policy)


def unwrap(fs):
    """The filesystem under a RetryingFileSystem (or `fs` itself)."""
    return fs.fs if isinstance(fs, RetryingFileSystem) else fs
