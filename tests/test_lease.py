"""Leases on units: exclusive claims among processes and threads, expiry and dead-pid takeover, keep-alive."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from storage.atomic import _host
from storage.lease import LEASE_SUFFIX, LeaseInfo, LeaseLost, Leases

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"caption/k{i % 3}/shard-00000/batch-{i:05d}" for i in range(12)]
#: Many units, claimed in the same order by every racer, so that claims collide often enough to catch a race.
RACE_NAMES = [f"caption/k{i % 3}/shard-{i // 50:05d}/batch-{i:05d}" for i in range(400)]


def _local(tmp_path, **kw) -> Leases:
    return Leases(fsspec.filesystem("file"), str(tmp_path / "leases"), **kw)


def _lease_file(tmp_path, name: str) -> Path:
    return tmp_path / "leases" / (name + LEASE_SUFFIX)


def _write_lease(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {"holder": "otherhost:4242:deadbeef", "host": "otherhost", "pid": 4242, "claimed_at": time.time()}
    d.update(fields)
    path.write_text(json.dumps(d))


def _race_worker(lease_dir, names, barrier, queue):
    leases = Leases(fsspec.filesystem("file"), lease_dir, ttl=60)
    barrier.wait()
    rows = [(n, leases.claim(n), leases.holder) for n in names]
    barrier.wait()  # stay alive until all have claimed: a dead holder's lease may be taken over at once
    queue.put(rows)


def _race_processes(lease_dir: str, names: list[str], n: int = 8) -> dict[str, list[str]]:
    ctx = mp.get_context(
        "spawn"
    )  # a forked child would inherit (and at exit run) the test session's Prefect threads and handlers
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(lease_dir, names, barrier, queue)) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    winners: dict[str, list[str]] = {name: [] for name in names}
    for rows in results:
        for name, won, holder in rows:
            if won:
                winners[name].append(holder)
    return winners


def test_exactly_one_of_eight_processes_claims_each_unit(tmp_path):
    winners = _race_processes(str(tmp_path / "leases"), RACE_NAMES)
    assert {n: len(w) for n, w in winners.items()} == {n: 1 for n in RACE_NAMES}
    reader = _local(tmp_path)
    for name, (holder,) in winners.items():
        assert reader.holder_of(name).holder == holder


def test_exactly_one_of_eight_processes_takes_over_a_stale_lease(tmp_path):
    for name in RACE_NAMES:
        _write_lease(_lease_file(tmp_path, name), expires_at=time.time() - 1)
    winners = _race_processes(str(tmp_path / "leases"), RACE_NAMES)
    assert {n: len(w) for n, w in winners.items()} == {n: 1 for n in RACE_NAMES}
    assert not [p for p in (tmp_path / "leases").rglob("*") if ".tmp-" in p.name or "takeover" in p.name]


def _race_threads(make, names: list[str], n: int = 8) -> dict[str, list[str]]:
    holders = [make(f"worker-{i}") for i in range(n)]
    barrier, out, lock = threading.Barrier(n), {name: [] for name in names}, threading.Lock()

    def run(leases: Leases):
        barrier.wait()
        for name in names:
            if leases.claim(name):
                with lock:
                    out[name].append(leases.holder)

    threads = [threading.Thread(target=run, args=(h,)) for h in holders]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that an unguarded check-then-create interleaves
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        sys.setswitchinterval(interval)
    return out


def test_exactly_one_of_eight_threads_with_distinct_holders_claims_each_unit(tmp_path):
    winners = _race_threads(lambda h: _local(tmp_path, ttl=60, holder=h), RACE_NAMES)
    assert {n: len(w) for n, w in winners.items()} == {n: 1 for n in RACE_NAMES}


def test_claim_is_reentrant_and_exclusive(tmp_path):
    a, b = _local(tmp_path, holder="a"), _local(tmp_path, holder="b")
    name = NAMES[0]
    assert a.claim(name)
    first = a.holder_of(name)
    assert a.claim(name)
    assert not b.claim(name)
    again = a.holder_of(name)
    assert (again.holder, again.host, again.pid) == ("a", _host(), os.getpid())
    assert again.claimed_at == first.claimed_at and again.expires_at >= first.expires_at
    assert json.loads(_lease_file(tmp_path, name).read_text())["holder"] == "a"


def test_default_holder_names_host_and_pid(tmp_path):
    leases = _local(tmp_path)
    host, pid, rnd = leases.holder.split(":")
    assert (host, int(pid), len(rnd)) == (_host(), os.getpid(), 8)
    assert leases.holder != _local(tmp_path).holder


def test_expired_lease_is_taken_over_and_its_old_holder_loses_it(tmp_path):
    a, b = _local(tmp_path, ttl=0.2, holder="a"), _local(tmp_path, ttl=0.2, holder="b")
    name = NAMES[1]
    assert a.claim(name)
    assert not b.claim(name)
    time.sleep(0.3)
    assert b.claim(name)
    assert b.holder_of(name).holder == "b"
    with pytest.raises(LeaseLost, match="held by b"):
        a.renew(name)
    a.release(name)
    assert b.holder_of(name).holder == "b"


def test_hand_written_lease_of_another_host_is_held_until_it_expires(tmp_path):
    name, leases = NAMES[2], _local(tmp_path, holder="me")
    _write_lease(
        _lease_file(tmp_path, name), expires_at=time.time() + 60
    )  # pid 4242 there: not ours to check
    assert not leases.claim(name)
    assert leases.holder_of(name) == LeaseInfo(
        holder="otherhost:4242:deadbeef",
        host="otherhost",
        pid=4242,
        claimed_at=leases.holder_of(name).claimed_at,
        expires_at=leases.holder_of(name).expires_at,
    )
    _write_lease(_lease_file(tmp_path, name), expires_at=time.time() - 0.01)
    assert leases.claim(name)


def test_renewing_an_expired_lease_raises_even_when_nobody_took_it(tmp_path):
    a = _local(tmp_path, ttl=0.1, holder="a")
    assert a.claim(NAMES[0])
    time.sleep(0.15)
    with pytest.raises(LeaseLost, match="expired"):
        a.renew(NAMES[0])
    assert a.claim(NAMES[0])  # still free to claim again


_CHILD = """
import sys, time, fsspec
from storage.lease import Leases
leases = Leases(fsspec.filesystem("file"), sys.argv[1], ttl=600)
assert leases.claim(sys.argv[2])
print(leases.holder, flush=True)
time.sleep(60)
"""


def test_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    name = NAMES[3]
    lease_dir = str(tmp_path / "leases")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, lease_dir, name], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        holder = child.stdout.readline().strip()
        assert holder.startswith(f"{_host()}:{child.pid}:")
        me = _local(tmp_path, ttl=600, holder="me")
        assert not me.claim(name)  # alive: its lease holds for 600 s
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert me.claim(name)
        assert me.holder_of(name).holder == "me"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_renew_by_a_non_holder_raises_and_release_by_a_non_holder_leaves_the_lease(tmp_path):
    a, b = _local(tmp_path, holder="a"), _local(tmp_path, holder="b")
    name = NAMES[4]
    with pytest.raises(LeaseLost, match="is gone"):
        b.renew(name)
    assert a.claim(name)
    with pytest.raises(LeaseLost, match="held by a .*not by b"):
        b.renew(name)
    assert issubclass(LeaseLost, RuntimeError)
    b.release(name)
    assert a.holder_of(name).holder == "a"
    a.renew(name)
    a.release(name)
    assert a.holder_of(name) is None
    a.release(name)  # gone: no error
    assert b.claim(name)


def test_keep_alive_renews_past_the_ttl_and_releases_at_exit(tmp_path):
    a, b = _local(tmp_path, ttl=0.6, holder="a"), _local(tmp_path, ttl=0.6, holder="b")
    name = NAMES[5]
    assert a.claim(name)
    t0, refused = time.time(), 0
    with a.keep_alive(name):
        while time.time() - t0 < 1.5:
            assert not b.claim(name)
            refused += 1
            time.sleep(0.05)
        assert a.holder_of(name).expires_at > t0 + 1.5  # renewed beyond the first expiry (t0 + 0.6)
    assert refused > 10
    assert a.holder_of(name) is None
    assert b.claim(name)


def test_keep_alive_lets_the_block_finish_then_raises_when_the_lease_was_lost(tmp_path):
    a = _local(tmp_path, ttl=0.3, holder="a")
    name, ran = NAMES[6], []
    assert a.claim(name)
    with pytest.raises(LeaseLost, match="lost while the block ran"):
        with a.keep_alive(name):
            _write_lease(_lease_file(tmp_path, name), expires_at=time.time() + 60)  # someone took it over
            time.sleep(0.25)
            ran.append(True)
    assert ran == [True]
    assert a.holder_of(name).holder == "otherhost:4242:deadbeef"  # not released by the loser


def test_keep_alive_without_the_lease_raises_at_entry(tmp_path):
    with pytest.raises(LeaseLost, match="is gone"):
        with _local(tmp_path).keep_alive(NAMES[7]):
            pytest.fail("the block must not run")


def test_truncated_lease_file_is_held_until_mtime_plus_ttl(tmp_path):
    name, leases = NAMES[8], _local(tmp_path, ttl=60, holder="me")
    path = _lease_file(tmp_path, name)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"holder": "otherhost:1:ab')
    assert not leases.claim(name)
    info = leases.holder_of(name)
    assert info.holder == "" and info.expires_at == pytest.approx(path.stat().st_mtime + 60)
    path.write_bytes(b"")
    assert not leases.claim(name)
    old = time.time() - 61
    os.utime(path, (old, old))
    assert leases.claim(name)
    assert leases.holder_of(name).holder == "me"


@pytest.mark.parametrize("bad", ["", "/abs/x", "a/../b", "a//b", "a/./b", "caption/sp ace"])
def test_bad_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="lease name"):
        _local(tmp_path).claim(bad)


def test_ttl_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="ttl must be > 0 seconds, got 0"):
        _local(tmp_path, ttl=0)


def test_memory_filesystem_claims_renews_takes_over_and_releases():
    fs = fsspec.filesystem("memory")
    root = f"memory://leases-{uuid.uuid4().hex}"
    a, b = Leases(fs, root, ttl=0.2, holder="a"), Leases(fs, root, ttl=0.2, holder="b")
    name = NAMES[0]
    assert a.claim(name) and a.claim(name)
    assert not b.claim(name)
    with pytest.raises(LeaseLost, match="held by a"):
        b.renew(name)
    a.renew(name)
    time.sleep(0.3)
    assert b.claim(name)  # expired: taken over through the takeover marker
    assert b.holder_of(name).holder == "b"
    assert fs.find(root) == [fs._strip_protocol(root) + "/" + name + LEASE_SUFFIX]  # no marker left
    b.release(name)
    assert b.holder_of(name) is None
    winners = _race_threads(lambda h: Leases(fs, root, ttl=60, holder=h), RACE_NAMES)
    assert {n: len(w) for n, w in winners.items()} == {n: 1 for n in RACE_NAMES}


def test_memory_filesystem_truncated_lease_is_held():
    fs = fsspec.filesystem("memory")
    root = f"/leases-{uuid.uuid4().hex}"
    fs.pipe_file(f"{root}/{NAMES[0]}{LEASE_SUFFIX}", b'{"hol')
    leases = Leases(fs, root, ttl=60)
    assert not leases.claim(NAMES[0])
    assert leases.holder_of(NAMES[0]).holder == ""


class _NoExclusiveFS(AbstractFileSystem):
    protocol = "noexcl"


def test_filesystem_without_exclusive_create_is_refused_by_name():
    with pytest.raises(NotImplementedError, match=r"_NoExclusiveFS \(protocol 'noexcl'\).*'xb'"):
        Leases(_NoExclusiveFS(), "/leases")


class _OldS3FS(AbstractFileSystem):
    protocol = "s3"


_OldS3FS.__module__ = "s3fs.core"


def test_object_store_without_conditional_small_puts_is_refused_with_the_version_to_upgrade_to(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    # the s3 extra installs a current s3fs: pretend an old one is installed
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "2025.3.0" if p == "s3fs" else real(p))
    with pytest.raises(
        NotImplementedError, match=r"s3fs 2025\.3\.0 does not make .*upgrade to s3fs>=2025\.7\.0"
    ):
        Leases(_OldS3FS(), "bucket/leases")
