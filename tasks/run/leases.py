"""Units claimed before they are computed: one lease holder per process, waiting on units others hold."""

from __future__ import annotations

import posixpath
import threading
import time

from storage.lease import Leases
from storage.ledger import Ledger, Unit

#: Seconds a unit's lease lives without renewal; the holder renews it every third of that while it works.
LEASE_TTL = 600.0
#: Seconds between looks at a unit another worker holds.
LEASE_POLL = 1.0
_LEASES: dict[tuple[str, str], Leases] = {}
_LEASES_LOCK = threading.Lock()


def leases(layout) -> Leases:
    """This process's lease holder for a plan folder (one holder per process: its threads share it)."""
    key = (layout.root, layout.path("_leases"))
    with _LEASES_LOCK:
        if key not in _LEASES:
            _LEASES[key] = Leases(layout.fs, layout.path("_leases"), ttl=LEASE_TTL)
        return _LEASES[key]


def lease_name(layout, unit: Unit) -> str:
    """`<stage>/<stage key>/shard-XXXXX/batch-XXXXX`: a unit's lease, shared by every run with that key."""
    return posixpath.join(unit.stage, layout.key(unit.stage), *unit.rel().split("/")[1:])


def claim_or_wait(layout, ledger: Ledger, unit: Unit) -> dict | None:
    """None when this worker now holds the unit's lease and must do it; the ledger record when the unit is
    done (by another worker, which this one waited for while it held the lease). A lease whose holder died
    (on this host: at once; elsewhere: when it expires) is taken over."""
    held = leases(layout)
    name = lease_name(layout, unit)
    waited = 0.0
    while True:
        if ledger.is_done(unit):
            return {**ledger.read(unit), "skipped": True, "waited_s": round(waited, 3)}
        if held.claim(name):
            if ledger.is_done(unit):  # finished between the look and the claim
                held.release(name)
                continue
            return None
        time.sleep(LEASE_POLL)
        waited += LEASE_POLL


def record_once(ledger: Ledger, unit: Unit, info: dict) -> dict:
    """Record a finished unit once. If another worker recorded it meanwhile (it took over a lease this
    worker held too long), its record stands: both wrote the same deterministic output."""
    if ledger.is_done(unit):
        return {**ledger.read(unit), "skipped": True, "duplicate_work": True}
    ledger.record_done(unit, info)
    return info
