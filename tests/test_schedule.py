"""tasks.run.schedule: one worker per stage, batches handed down a board (no Prefect here)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.run.schedule import DONE, FAILED, NOT_RUN, BatchBoard, run_stage

STAGES = ("caption", "parse", "match")


def _run_all(board, unit, threads):
    log, lock = [], threading.Lock()

    def run_unit(stage):
        def f(b):
            with lock:
                log.append(("start", stage, b))
            unit(stage, b)
            with lock:
                log.append(("end", stage, b))
            return {"items": 1}

        return f

    with ThreadPoolExecutor(threads) as ex:
        futs = [ex.submit(run_stage, board, s, run_unit(s), None, (0.0, 0.0)) for s in STAGES]
        results = [f.result(timeout=30) for f in futs]
    return log, results


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_unit_runs_once_after_its_input_and_in_batch_order(threads):
    board = BatchBoard(STAGES, 4)
    log, results = _run_all(board, lambda s, b: time.sleep(0.01), threads)
    starts = [(s, b) for kind, s, b in log if kind == "start"]
    assert sorted(starts) == sorted((s, b) for s in STAGES for b in range(4))  # each once
    pos = {(kind, s, b): i for i, (kind, s, b) in enumerate(log)}
    for s in STAGES:
        for b in range(4):
            i = STAGES.index(s)
            if i:
                assert pos[("start", s, b)] > pos[("end", STAGES[i - 1], b)]
            if b:
                assert pos[("start", s, b)] > pos[("end", s, b - 1)]
    assert board.units(DONE) == [(s, b) for b in range(4) for s in STAGES]
    assert [r.done for r in results] == [[0, 1, 2, 3]] * 3


def test_with_threads_the_next_batch_is_captioned_while_the_previous_is_parsed():
    board = BatchBoard(STAGES, 3)
    log, _ = _run_all(board, lambda s, b: time.sleep(0.05), 3)
    pos = {(kind, s, b): i for i, (kind, s, b) in enumerate(log)}
    assert pos[("start", "caption", 1)] < pos[("end", "parse", 0)]


def test_a_failed_unit_stops_its_batch_below_it_and_nothing_else():
    board = BatchBoard(STAGES, 3)

    def unit(s, b):
        if (s, b) == ("parse", 1):
            raise ValueError("bad batch")

    log, results = _run_all(board, unit, 3)
    assert board.units(FAILED) == [("parse", 1)]
    assert board.units(NOT_RUN) == [("match", 1)]
    assert results[1].failed == [(1, "ValueError: bad batch")]
    assert results[1].done == [0, 2] and results[2].done == [0, 2] and results[2].not_run == [1]


def test_units_already_done_are_skipped_and_others_still_wait_for_them():
    board = BatchBoard(STAGES, 2, done={("caption", 0), ("caption", 1), ("parse", 0)})
    log, _ = _run_all(board, lambda s, b: None, 2)
    assert sorted((s, b) for kind, s, b in log if kind == "start") == [
        ("match", 0),
        ("match", 1),
        ("parse", 1),
    ]
    assert board.units(DONE) == [(s, b) for b in range(2) for s in STAGES]


def test_io_errors_are_retried_in_place_and_other_errors_are_not():
    board = BatchBoard(("caption",), 2)
    calls, slept = [], []

    def run_unit(b):
        calls.append(b)
        if b == 0 and calls.count(0) < 3:
            raise ConnectionResetError("reset by peer")
        if b == 1:
            raise RuntimeError("model bug")
        return {}

    res = run_stage(board, "caption", run_unit, retry_delays=(2.0, 5.0, 15.0), sleep=slept.append)
    assert calls == [0, 0, 0, 1]  # two I/O retries for batch 0; the model bug is not retried
    assert slept == [2.0, 5.0] and res.io_retries == 2
    assert res.done == [0] and res.failed == [(1, "RuntimeError: model bug")]


def _raises(error):
    def unit(b):
        raise error

    return unit


def test_io_errors_past_the_last_retry_fail_the_unit():
    board = BatchBoard(("caption",), 1)
    res = run_stage(board, "caption", _raises(TimeoutError("timed out")), sleep=lambda s: None)
    assert res.failed == [(0, "TimeoutError: timed out")] and res.io_retries == 3


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        FileNotFoundError(2, "No such file"),
        PermissionError(13, "denied"),
    ],
)
def test_a_full_disk_a_missing_file_or_a_permission_error_is_not_retried(error):
    board = BatchBoard(("caption",), 1)
    res = run_stage(board, "caption", _raises(error), sleep=lambda s: None)
    assert res.io_retries == 0 and len(res.failed) == 1


def test_a_worker_that_dies_leaves_nothing_waiting_forever():
    board = BatchBoard(STAGES[:2], 3)

    def dies(b):
        if b == 1:
            raise KeyboardInterrupt  # not an Exception: the worker stops, the board must not hang parse

    with ThreadPoolExecutor(2) as ex:
        f0 = ex.submit(run_stage, board, "caption", dies)
        f1 = ex.submit(run_stage, board, "parse", lambda b: {})
        with pytest.raises(KeyboardInterrupt):
            f0.result(timeout=10)
        res = f1.result(timeout=10)
    assert board.state("caption", 1) == NOT_RUN and board.state("caption", 2) == NOT_RUN
    assert res.done == [0] and res.not_run == [1, 2]


def test_finish_refuses_an_unknown_state():
    with pytest.raises(ValueError, match="not 'pending'"):
        BatchBoard(STAGES, 1).finish("caption", 0, "pending")
