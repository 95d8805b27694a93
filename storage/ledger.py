"""The ledger of finished work: one marker file per (stage, shard, batch), written after the output is durable."""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

from storage.atomic import read_json, write_json
from storage.layout import RunLayout, batch_name, shard_name


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit of work: a stage over one batch of one shard (batch None: a whole-shard stage such as write)."""

    stage: str
    shard: int
    batch: int | None = None

    def rel(self) -> str:
        b = "shard" if self.batch is None else batch_name(self.batch)
        return posixpath.join(self.stage, shard_name(self.shard), b)


class Ledger:
    """Marker files under `<plan>/_ledger/<stage>/<stage key>/`. A unit is done iff its `.done.json` exists.

    Units are named `stage/shard-00000/batch-00000` (Unit.rel); on storage each lives under its stage's key,
    so runs that share a stage's key share its finished units.

    The output of a unit is written first (temporary name, close, rename); only then is its marker written,
    itself atomically. A crash between the two leaves no marker, so the unit is simply redone.
    """

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.fs = layout.fs
        self.dir = layout.ledger_dir

    def _path(self, unit: Unit, kind: str) -> str:
        b = "shard" if unit.batch is None else batch_name(unit.batch)
        key = self.layout.key(unit.stage)
        return posixpath.join(self.dir, unit.stage, key, shard_name(unit.shard), f"{b}.{kind}.json")

    def is_done(self, unit: Unit) -> bool:
        return self.fs.exists(self._path(unit, "done"))

    def record_done(self, unit: Unit, info: dict) -> None:
        """Record a finished unit. Refuses to record a unit twice (that would mean duplicated work)."""
        path = self._path(unit, "done")
        if self.fs.exists(path):
            raise RuntimeError(
                f"ledger: {unit.rel()} is already recorded as done; refusing to record it twice"
            )
        failed = self._path(unit, "failed")
        attempts = 1
        if self.fs.exists(failed):
            attempts += int(read_json(self.fs, failed).get("attempts", 1))
        write_json(
            self.fs, path, {"unit": unit.rel(), "finished_at": time.time(), "attempts": attempts, **info}
        )
        if self.fs.exists(failed):
            self.fs.rm(failed)

    def record_failed(self, unit: Unit, error: str) -> None:
        failed = self._path(unit, "failed")
        attempts = 1
        if self.fs.exists(failed):
            attempts += int(read_json(self.fs, failed).get("attempts", 1))
        write_json(
            self.fs,
            failed,
            {"unit": unit.rel(), "failed_at": time.time(), "attempts": attempts, "error": error},
        )

    def read(self, unit: Unit) -> dict:
        return read_json(self.fs, self._path(unit, "done"))

    def snapshot(self) -> dict[str, set[str]]:
        """{'done': {rel, ...}, 'failed': {rel, ...}} of this run's stage keys, from one listing of the ledger."""
        out: dict[str, set[str]] = {"done": set(), "failed": set()}
        if not self.fs.exists(self.dir):
            return out
        prefix = self.dir.rstrip("/") + "/"
        for p in self.fs.find(self.dir):
            rel = p[len(prefix) :] if p.startswith(prefix) else p
            if posixpath.basename(rel).startswith("."):
                continue  # a temporary file of an interrupted write
            parts = rel.split("/")
            if len(parts) != 4 or parts[1] != self.layout.key(parts[0]):
                continue  # another run's key for this stage (or a stray file)
            unit = f"{parts[0]}/{parts[2]}/{parts[3]}"
            for kind in ("done", "failed"):
                if unit.endswith(f".{kind}.json"):
                    out[kind].add(unit[: -len(f".{kind}.json")])
        out["failed"] -= out["done"]
        return out


def unwritten(shards: list[int], snap: dict[str, set[str]], write_stage: str) -> list[int]:
    """The shards whose `write_stage` unit is not done in a ledger snapshot: what a shard being written means."""
    return [sh for sh in shards if Unit(write_stage, sh).rel() not in snap["done"]]


def run_gaps(layout: RunLayout, shards: list[int], snap: dict[str, set[str]], write_stage: str) -> list[str]:
    """What a run lacks to count as finished, one phrase per gap (empty: finished): the one rule, used by the CLI,
    the flows and the pre-training readers. A run is finished when every shard's `write_stage` unit is done in the
    ledger AND its statistics (stats/<run_key>/run.json, written last) exist. Failed units do not decide it; they
    are named when the run is not finished, to explain it.

    Args:
        layout: the run's layout.
        shards: the plan's shard numbers.
        snap: a ledger snapshot (Ledger.snapshot()).
        write_stage: the shard-level stage whose unit says a shard is written (the registry's last stage).
    """
    todo = unwritten(shards, snap, write_stage)
    out = []
    if todo:
        out.append(f"{len(todo)} of {len(shards)} shards have no '{write_stage}' record {todo[:10]}")
    if not layout.fs.exists(layout.run_stats):
        out.append(f"the run statistics {layout.run_stats} are not written")
    if out and snap["failed"]:
        out.append(f"{len(snap['failed'])} failed units {sorted(snap['failed'])[:5]}")
    return out
