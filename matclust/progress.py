"""Progress bars on stderr (rich), shown only on a terminal and never with --quiet."""

from __future__ import annotations

import sys


_terminated_by: int | None = None


def terminate(signum: int) -> None:
    """SIGTERM's handler: unwind now (exit 128 + signum), and again at the next progress
    step should Python drop this exception (it does when the signal lands in a weakref
    callback or a finalizer: "Exception ignored in ...", and the run would go on)."""
    global _terminated_by
    _terminated_by = signum
    raise SystemExit(128 + signum)


class RichProgress:
    """Implements the ``start(phase, total)`` / ``advance(n)`` protocol with a rich bar
    showing done / total and an ETA."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, phase: str, total: int) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self._progress.tasks[-1].total)
            self._task = self._progress.add_task(phase, total=total)

    def advance(self, n: int = 1) -> None:
        if _terminated_by is not None:
            raise SystemExit(128 + _terminated_by)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)
