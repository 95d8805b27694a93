"""Leases on units of work: create-if-absent files with an expiry, so that many workers share one run."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import posixpath
import re
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from storage import retry
from storage.atomic import _alive, _host, _tmp_name
from storage.retry import unwrap

#: A lease of unit `name` lives at `<lease_dir>/<name>.lease.json`.
LEASE_SUFFIX = ".lease.json"

#: fsspec implementations (by top-level package) whose `open(path, "xb")` is an atomic create-if-absent on
#: the store, with the first release that has it: s3fs sends PUT with `If-None-Match: *` (fsspec/s3fs#917;
#: files under one part, as leases are, only since fsspec/s3fs#974), adlfs uploads with overwrite=False
#: (fsspec/adlfs#491). Others (gcsfs, http, ...) raise NotImplementedError until checked and added here.
EXCLUSIVE_CREATE_SINCE = {"s3fs": "2025.7.0", "adlfs": "2024.12.0"}

_NAME_RE = re.compile(r"^[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$")

#: Serialises the lease operations of one process on a non-local filesystem. The memory filesystem's "xb"
#: checks, then creates: without this, two threads could both pass the check. On object stores it only
#: orders this process's own threads; the store's conditional PUT decides between processes.
_PROCESS_LOCK = threading.RLock()


class LeaseLost(RuntimeError):
    """A lease this holder relied on is gone, expired, or held by another holder."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """What a lease file says. A partial or unreadable file reads as holder "" (unknown), pid 0,
    held from its mtime until mtime + ttl."""

    holder: str  # "<host>:<pid>:<random>" of the claiming process/thread
    host: str
    pid: int
    claimed_at: float
    expires_at: float


def _pid_namespace() -> str:
    """The pid namespace of this process ("" where unknown): containers that share a host name (host
    networking) have their own pids, so a pid of another namespace says nothing about liveness here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_dead(pid: int) -> bool:
    """True iff no process `pid` runs on this host, or it is a zombie (killed, not yet reaped)."""
    if pid <= 0:
        return False
    if not _alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ')' (comm may contain spaces and parens)
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(m) for m in re.findall(r"\d+", v)[:3])


def _backend(fs: fsspec.AbstractFileSystem) -> str:
    """'local' (os.open with O_EXCL, flock) or 'xb' (fs.open(path, "xb")); raise where neither is atomic."""
    if isinstance(fs, LocalFileSystem):
        return "local"
    if isinstance(fs, MemoryFileSystem):
        return "xb"
    cls = type(fs)
    package = cls.__module__.split(".")[0]
    since = EXCLUSIVE_CREATE_SINCE.get(package)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if since is None:
        raise NotImplementedError(
            f"leases need an atomic create-if-absent, and {name} (protocol {fs.protocol!r}) is not known to "
            f"offer one through fs.open(path, 'xb'); supported: LocalFileSystem, MemoryFileSystem, "
            + ", ".join(f"{p}>={v}" for p, v in EXCLUSIVE_CREATE_SINCE.items())
        )
    try:
        have = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        have = "0"
    if _version_tuple(have) < _version_tuple(since):
        raise NotImplementedError(
            f"leases need an atomic create-if-absent: {name} from {package} {have} does not make "
            f"fs.open(path, 'xb') conditional for small files; upgrade to {package}>={since}"
        )
    return "xb"


class Leases:
    """Leases of units under `lease_dir`, held by `holder` (default "<host>:<pid>:<random>").

    A lease is a small JSON file (holder, host, pid, claimed_at, expires_at) created only if absent. It is
    live until `expires_at`, which its holder pushes forward with `renew` (or `keep_alive`). A lease is
    stale, and another holder may take it over, once it has expired, or at once when its holder ran on
    this host (same pid namespace) and that process is gone (a worker killed with -9).

    Local filesystem: every operation on a lease runs under `flock` of `<dir>/.leases.lock` (dir: the
    lease's folder), creation is `os.open(O_CREAT | O_EXCL)`, renewal a temporary file renamed over the
    lease; operations and takeovers are race-free between processes and threads, also on a shared disk
    whose locks span hosts (NFSv4).

    Other filesystems: creation is `fs.open(path, "xb")` where that is a conditional PUT (see
    EXCLUSIVE_CREATE_SINCE); a takeover first creates, again if absent, a marker named after the hash of
    the stale lease's bytes, so of several claimers that judged the same lease stale exactly one goes on; it
    checks the bytes again, deletes the lease and creates its own. Without compare-and-swap one window
    remains, at the moment of expiry only: a holder whose `renew` read its lease just before `expires_at`
    and writes just after, while a claimer takes the lease over between that read and write, overwrites the
    new lease (the same applies to `release`, which removes only unexpired leases). Both holders notice
    at their next renewal (ttl/3 under keep_alive) through LeaseLost; a healthy holder renews 2/3 ttl
    before expiry and never meets it. Clocks of the hosts must agree to well within the ttl.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        lease_dir: str,
        ttl: float = 600.0,
        holder: str | None = None,
    ):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
        fs = unwrap(fs)  # lease operations are retried here, each in the way that is safe for it
        self.fs = fs
        self.backend = _backend(fs)
        self.lease_dir = fs._strip_protocol(lease_dir).rstrip("/") or "/"
        self.ttl = float(ttl)
        self.host = _host()
        self.pid = os.getpid()
        self.holder = holder or f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._pidns = _pid_namespace()

    # -- public API ---------------------------------------------------------------------------------

    def claim(self, name: str) -> bool:
        """Claim unit `name`; True iff this holder now holds it (also when it held it already)."""
        path = self._path(name)
        with self._mutex(path):
            now = time.time()
            if self._create(path, self._blob(now, now)):
                return True
            cur = self._read(path)
            if cur is None:  # released between our attempt and the read
                return self._create(path, self._blob(now, now))
            info, blob, pidns = cur
            if info.holder == self.holder:  # re-entrant: extend, keep the original claim time
                self._overwrite(path, self._blob(info.claimed_at, now))
                return True
            if not self._stale(info, pidns, now):
                return False
            return self._take_over(path, blob, now)

    def renew(self, name: str) -> None:
        """Push the expiry of a lease this holder holds to now + ttl.

        Raises LeaseLost if the lease is gone, held by another holder, or already expired (an expired lease
        may be taken over at any moment, so its holder must not assume it still has it).
        """
        path = self._path(name)
        with self._mutex(path):
            now = time.time()
            cur = self._read(path)
            if cur is None:
                raise LeaseLost(
                    f"lease {name} of {self.holder} is gone (released, or taken over and released)"
                )
            info = cur[0]
            if info.holder != self.holder:
                raise LeaseLost(
                    f"lease {name} is held by {info.holder or 'an unknown holder (partial file)'} since "
                    f"{info.claimed_at:.3f}, not by {self.holder}"
                )
            if now > info.expires_at:
                raise LeaseLost(
                    f"lease {name} of {self.holder} expired {now - info.expires_at:.3f} s ago "
                    f"(ttl {self.ttl} s); another worker may be taking it over"
                )
            self._overwrite(path, self._blob(info.claimed_at, now))

    def release(self, name: str) -> None:
        """Remove the lease if this holder holds it; nothing if it is gone or someone else's.

        An expired lease is left in place (it is stale already, and removing it could race a takeover).
        """
        path = self._path(name)
        with self._mutex(path):
            cur = self._read(path)
            if cur is None or cur[0].holder != self.holder or time.time() > cur[0].expires_at:
                return
            self._remove(path)

    def holder_of(self, name: str) -> LeaseInfo | None:
        """The lease of `name` as its file says (expired or not), or None when there is none."""
        path = self._path(name)
        with self._mutex(path):
            cur = self._read(path)
        return None if cur is None else cur[0]

    def keep_alive(self, name: str) -> contextlib.AbstractContextManager:
        """Renew `name` every ttl/3 in a background thread while the block runs, then release it.

        Entering renews once (LeaseLost at once if this holder does not hold it). The block runs on if a
        renewal fails; leaving it then raises LeaseLost (or, when the block raised, notes it on that error).
        An I/O error while renewing is retried at the next tick until the lease would have expired.
        """
        return _KeepAlive(self, name)

    # -- lease files --------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        if not _NAME_RE.match(name) or any(p in (".", "..") for p in name.split("/")):
            raise ValueError(
                f"lease name {name!r} must be relative, '/'-separated parts of [A-Za-z0-9._=-], without . or .."
            )
        return posixpath.join(self.lease_dir, name + LEASE_SUFFIX)

    def _blob(self, claimed_at: float, now: float) -> bytes:
        d = {
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "pidns": self._pidns,
            "claimed_at": claimed_at,
            "expires_at": now + self.ttl,
        }
        return (json.dumps(d, sort_keys=True) + "\n").encode()

    def _parse(self, blob: bytes, path: str) -> tuple[LeaseInfo, str]:
        try:
            d = json.loads(blob)
            info = LeaseInfo(
                holder=str(d["holder"]),
                host=str(d["host"]),
                pid=int(d["pid"]),
                claimed_at=float(d["claimed_at"]),
                expires_at=float(d["expires_at"]),
            )
            return info, str(d.get("pidns", ""))
        except (ValueError, KeyError, TypeError):
            # Partial (a claimer died while writing, or is writing now) or foreign: held by someone unknown
            # until mtime + ttl, never free.
            mtime = self._mtime(path)
            return LeaseInfo(holder="", host="", pid=0, claimed_at=mtime, expires_at=mtime + self.ttl), ""

    def _stale(self, info: LeaseInfo, pidns: str, now: float) -> bool:
        if now > info.expires_at:
            return True
        # Dead holder on this host: only when both pid namespaces are known and equal (a pid of another
        # container that shares this host name says nothing here).
        return (
            info.host == self.host
            and bool(pidns)
            and pidns == self._pidns
            and info.pid != self.pid
            and _pid_dead(info.pid)
        )

    # -- storage primitives: local filesystem -------------------------------------------------------

    @contextlib.contextmanager
    def _mutex(self, path: str):
        if self.backend != "local":
            with _PROCESS_LOCK:
                yield
            return
        d = posixpath.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd = os.open(posixpath.join(d, ".leases.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock: per open file description, so threads of one process exclude each other too;
            # the kernel drops it when its holder dies (kill -9 included).
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create(self, path: str, blob: bytes) -> bool:
        """Create `path` holding `blob` iff it does not exist; False when it exists."""
        if self.backend == "local":
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(path)  # ours, under the flock: a partial lease would block the unit for a ttl
                raise
            os.close(fd)
            return True
        tries = 0

        def attempt() -> bool:
            nonlocal tries
            tries += 1
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(blob)
            except FileExistsError:
                if tries == 1:
                    return False
                # a retry after a transient error: the first PUT may have landed before its answer was lost
                return retry.call("cat_file", self.fs.cat_file, path) == blob
            except OSError as e:
                if retry.is_transient(e):
                    raise  # retried by retry.call below; a retry that meets the object reads it back (above)
                # Some stores report the failed precondition (HTTP 412) as a plain OSError, and a retried PUT
                # can fail on the object its own first attempt created: decide by what is there now.
                try:
                    there = retry.call("cat_file", self.fs.cat_file, path)
                except FileNotFoundError:
                    raise e from None  # nothing there: a real failure of the PUT (retried when transient)
                return there == blob
            return True

        return retry.call("create", attempt)

    def _read(self, path: str) -> tuple[LeaseInfo, bytes, str] | None:
        try:
            if self.backend == "local":
                with open(path, "rb") as f:
                    blob = f.read()
            else:
                blob = retry.call("cat_file", self.fs.cat_file, path)
        except FileNotFoundError:
            return None
        info, pidns = self._parse(blob, path)
        return info, blob, pidns

    def _mtime(self, path: str) -> float:
        try:
            if self.backend == "local":
                return os.stat(path).st_mtime
            meta = retry.call("info", self.fs.info, path)
        except FileNotFoundError:
            return time.time()
        for key in ("mtime", "LastModified", "last_modified", "created"):
            v = meta.get(key)
            if v is None:
                continue
            if hasattr(v, "timestamp"):
                return float(v.timestamp())
            with contextlib.suppress(TypeError, ValueError):
                return float(v)
        return time.time()  # unknown: held for a full ttl from now (never read as free)

    def _overwrite(self, path: str, blob: bytes) -> None:
        """Replace the lease of this holder (the caller checked under the mutex that it is this holder's)."""
        if self.backend == "local":
            tmp = _tmp_name(
                path
            )  # storage.atomic's temporary name: sweep_stale_temporaries removes leftovers
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return

        def put() -> None:
            with self.fs.open(path, "wb") as f:  # one PUT on object stores: never a partial object
                f.write(blob)

        retry.call("overwrite", put)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.backend == "local":
                os.unlink(path)
            else:
                retry.call("rm_file", self.fs.rm_file, path)

    def _take_over(self, path: str, stale_blob: bytes, now: float) -> bool:
        """Replace the stale lease whose bytes are `stale_blob`; True iff this holder now holds it."""
        if self.backend == "local":
            # Under the flock nobody else reads or writes this lease between our read and this unlink.
            self._remove(path)
            return self._create(path, self._blob(now, now))
        # Object store: exactly one claimer creates the marker of these stale bytes. A marker older than a
        # ttl belongs to a claimer that died mid-takeover; the next generation's marker is then free.
        digest = hashlib.sha256(stale_blob).hexdigest()[:16]
        for gen in range(100):
            marker = f"{path}.takeover-{digest}-{gen}"
            if self._create(marker, self._blob(now, now)):
                break
            m = self._read(marker)
            if m is None or now - m[0].claimed_at < self.ttl:
                return False  # another claimer is taking it over now (or just did)
        else:
            return False
        try:
            cur = self._read(path)
            if cur is None or cur[1] != stale_blob:
                return False  # renewed, released or replaced since we judged it stale
            self._remove(path)
        finally:
            self._remove(marker)
        return self._create(path, self._blob(now, now))


class _KeepAlive:
    def __init__(self, leases: Leases, name: str):
        self.leases, self.name = leases, name
        self._stop = threading.Event()
        self._lost: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _KeepAlive:
        self.leases.renew(self.name)
        self._valid_until = time.time() + self.leases.ttl
        self._thread = threading.Thread(target=self._loop, name=f"lease-keep-alive:{self.name}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.leases.ttl / 3):
            t = time.time()
            try:
                self.leases.renew(self.name)
                self._valid_until = t + self.leases.ttl
            except LeaseLost as e:
                self._lost = e
                return
            except Exception as e:  # I/O: try again at the next tick while the lease is still ours
                if time.time() > self._valid_until:
                    self._lost = e
                    return

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        if self._lost is None:
            try:
                self.leases.release(self.name)
            except Exception as e:
                if exc is None:
                    raise
                exc.add_note(f"releasing lease {self.name} failed as well: {e!r}")
            return False
        msg = f"lease {self.name} of {self.leases.holder} was lost while the block ran: {self._lost}"
        if exc is not None:
            exc.add_note(msg)
            return False
        raise LeaseLost(msg) from self._lost
