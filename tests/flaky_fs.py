"""An in-memory object store that fails every third request for a while, as a throttled or flaky S3 does."""

from __future__ import annotations

import contextlib
import threading

from fsspec.implementations.memory import MemoryFileSystem


class FlakyMemoryFileSystem(MemoryFileSystem):
    """MemoryFileSystem (its own store) whose requests fail with ConnectionResetError: every `every`-th request
    while `budget` failures are left; then it is healthy. `failures` counts the failures it injected.

    A request is a call of info, ls, cat_file, pipe_file, open, rm_file or cp_file from outside the store (the
    calls the memory store makes inside one are part of that request; a composite operation such as find or
    mv makes several). Register it with `fsspec.register_implementation` to use "flakymem://" URLs.
    """

    protocol = ("flakymem", "memory")  # "memory": an object store whose PUT is atomic (storage/atomic.py)
    store: dict = {}
    pseudo_dirs = [""]
    every = 3
    budget = 0
    failures = 0
    requests = 0
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix("flakymem://")
        return super()._strip_protocol(path)

    @classmethod
    def fail_every(cls, every: int, budget: int) -> None:
        with cls._lock:
            cls.every, cls.budget, cls.failures, cls.requests = every, budget, 0, 0

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.fail_every(3, 0)

    _depth = threading.local()

    def _request(self, what: str, path) -> None:
        cls = type(self)
        if getattr(cls._depth, "n", 0) > 1:
            return  # a call the memory store makes inside another (its "xb" open looks with info): one request
        with cls._lock:
            cls.requests += 1
            fail = cls.budget > 0 and cls.requests % cls.every == 0
            if fail:
                cls.budget -= 1
                cls.failures += 1
        if fail:
            raise ConnectionResetError(f"injected: connection reset by peer during {what} {path}")

    def exists(self, path, **kwargs):
        """As s3fs's: only "not found" is False; any other error is raised (fsspec's default swallows all)."""
        try:
            self.info(path, **kwargs)
        except FileNotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def _call(self, what: str, path):
        d = type(self)._depth
        d.n = getattr(d, "n", 0) + 1
        try:
            self._request(what, path)
            yield
        finally:
            d.n -= 1

    def info(self, path, **kwargs):
        with self._call("info", path):
            return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        with self._call("ls", path):
            return super().ls(path, detail=detail, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        with self._call("cat_file", path):
            return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        with self._call("pipe_file", path):
            return super().pipe_file(path, value, mode=mode, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        with self._call("open", path):
            return super()._open(path, mode=mode, **kwargs)

    def rm_file(self, path):
        with self._call("rm_file", path):
            return super().rm_file(path)

    def cp_file(self, path1, path2, **kwargs):
        with self._call("cp_file", path1):
            return super().cp_file(path1, path2, **kwargs)
