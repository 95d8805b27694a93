"""Live progress of a run in the terminal (rich): one bar per stage, in images/s."""

from __future__ import annotations

import contextlib
import sys

_active = None


class StageProgress:
    """Bars for every batch stage; the flow calls `advance(stage, n_images)` after each unit."""

    def __init__(self, total_images: int, stages: tuple[str, ...]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.tasks = {s: self.progress.add_task(s, total=total_images, rate="") for s in stages}

    def advance(self, stage: str, n: int, seconds: float | None = None) -> None:
        rate = f"{n / seconds:,.1f} images/s" if seconds else "skipped (done)"
        self.progress.update(self.tasks[stage], advance=n, rate=rate)


@contextlib.contextmanager
def show_progress(total_images: int, stages: tuple[str, ...]):
    """Show bars while the block runs, when stdout is a terminal (logs carry the same numbers otherwise)."""
    global _active
    if not sys.stdout.isatty():
        yield None
        return
    p = StageProgress(total_images, stages)
    _active = p
    try:
        with p.progress:
            yield p
    finally:
        _active = None


def advance(stage: str, n: int, seconds: float | None = None) -> None:
    if _active is not None:
        _active.advance(stage, n, seconds)
