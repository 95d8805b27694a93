"""Stages side by side within one shard: one worker per stage, handing batches down a board.

Each batch stage has one worker (a thread; under Prefect, one task run per stage and shard). A worker takes
the shard's batches in order; before batch b it waits until the upstream stage has finished batch b. So batch
b+1 is captioned (on the GPU) while batch b is parsed, matched and thresholded (on the CPU), each stage holds
at most one batch in flight, and a stage's batches are written in order.

Failures keep today's semantics: a unit that fails is recorded failed in the ledger (run_batch_stage), its
stage goes on with the next batch, the later stages of that batch do not run (`not_run`), and the shard is
not written; a rerun redoes only what is not done. Passing I/O errors are retried in place with backoff
(`worth_retrying`); nothing else is (a full disk, a missing file, a model bug, a bad input, out of memory).

Workers only ever wait on stages listed before them, so any number of threads >= 1 finishes: with one
thread the workers simply run one after another, stage by stage.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PENDING, DONE, FAILED, NOT_RUN = "pending", "done", "failed", "not_run"

#: Seconds between the tries of a unit that failed with an I/O error (three retries).
IO_RETRY_DELAYS: tuple[float, ...] = (2.0, 5.0, 15.0)

#: I/O errors that waiting does not cure: a full disk or quota, a read-only file system.
_LASTING_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, n))


def worth_retrying(e: BaseException) -> bool:
    """An I/O error that may go away by itself (a dropped connection, a busy store); not a missing file, a
    permission error or a full disk, nor any error that is not an OSError (a model bug, a bad input, OOM)."""
    if not isinstance(e, OSError):
        return False
    if isinstance(
        e, FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError | NotADirectoryError
    ):
        return False
    return e.errno not in _LASTING_ERRNOS


class BatchBoard:
    """The state of every (stage, batch) unit of one shard in this process, with waiting on upstream units."""

    def __init__(self, stages: Sequence[str], n_batches: int, done: set[tuple[str, int]] = frozenset()):
        self.stages = tuple(stages)
        self.n_batches = n_batches
        self._state = {
            (s, b): DONE if (s, b) in done else PENDING for s in self.stages for b in range(n_batches)
        }
        self._cond = threading.Condition()

    def state(self, stage: str, batch: int) -> str:
        with self._cond:
            return self._state[(stage, batch)]

    def upstream(self, stage: str) -> str | None:
        i = self.stages.index(stage)
        return self.stages[i - 1] if i else None

    def wait_input(self, stage: str, batch: int) -> bool:
        """Block until the upstream unit of (stage, batch) is final; True when it is done."""
        up = self.upstream(stage)
        if up is None:
            return True
        with self._cond:
            self._cond.wait_for(lambda: self._state[(up, batch)] != PENDING)
            return self._state[(up, batch)] == DONE

    def finish(self, stage: str, batch: int, state: str) -> None:
        if state not in (DONE, FAILED, NOT_RUN):
            raise ValueError(f"a unit finishes done, failed or not_run, not {state!r}")
        with self._cond:
            self._state[(stage, batch)] = state
            self._cond.notify_all()

    def abandon(self, stage: str) -> None:
        """Mark the stage's units that are still pending as not run (its worker stopped early), so that the
        stages below it never wait forever."""
        with self._cond:
            for b in range(self.n_batches):
                if self._state[(stage, b)] == PENDING:
                    self._state[(stage, b)] = NOT_RUN
            self._cond.notify_all()

    def units(self, state: str) -> list[tuple[str, int]]:
        with self._cond:
            return [
                (s, b) for b in range(self.n_batches) for s in self.stages if self._state[(s, b)] == state
            ]


@dataclass
class StageResult:
    """What one stage's worker did over a shard: units done now, failed (with the error), not run."""

    stage: str
    done: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    not_run: list[int] = field(default_factory=list)
    io_retries: int = 0


def run_stage(
    board: BatchBoard,
    stage: str,
    run_unit: Callable[[int], dict],
    on_unit: Callable[[int, dict], None] | None = None,
    retry_delays: Sequence[float] = IO_RETRY_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
) -> StageResult:
    """Work through every batch of `stage` on `board`, in order. `run_unit(batch)` does one unit (claims it,
    computes, writes, records); `on_unit(batch, info)` is told of each unit done (progress, logs)."""
    res = StageResult(stage)
    try:
        for b in range(board.n_batches):
            if board.state(stage, b) == DONE:
                continue
            if not board.wait_input(stage, b):
                board.finish(stage, b, NOT_RUN)
                res.not_run.append(b)
                continue
            try:
                info = _with_io_retries(lambda b=b: run_unit(b), retry_delays, sleep, res)
            except Exception as e:
                board.finish(stage, b, FAILED)
                res.failed.append((b, f"{type(e).__name__}: {e}"))
                continue
            board.finish(stage, b, DONE)
            res.done.append(b)
            if on_unit is not None:
                on_unit(b, info)
    finally:
        board.abandon(stage)  # on any way out (KeyboardInterrupt included), never leave a stage waited on
    return res


def _with_io_retries(fn, delays: Sequence[float], sleep, res: StageResult):
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == len(delays) or not worth_retrying(e):
                raise
            res.io_retries += 1
            sleep(delays[attempt])
    raise AssertionError("unreachable")
