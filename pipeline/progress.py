"""Live progress lines for the long CLI commands (training iterations, ingest pieces), drawn by rich on stderr.

One rule for every command: draw only for a person at a terminal (stderr is a tty and neither ``--quiet``
nor ``--json``); on a pipe print nothing, so logs and scripts see just the result lines. Each display is a
context manager: an error or Ctrl-C stops it, which ends the line and shows the cursor again. It starts on
the first update, so a command with nothing to do (a no-op ingest, a refused run) draws nothing at all.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text


def wanted(quiet: bool = False) -> bool:
    """Whether to draw: not when asked for quiet (``--quiet``/``--json``), nor when stderr is not a terminal."""
    return not quiet and sys.stderr.isatty()


class _Live:
    """A one-task rich display, started on the first update and stopped (line kept, cursor back) on exit."""

    def __init__(self, enabled: bool, columns: tuple[ProgressColumn, ...]) -> None:
        self.enabled, self.columns = enabled, columns
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def _update(self, total: float, completed: float, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._progress = Progress(*self.columns, console=Console(stderr=True), refresh_per_second=5)
            self._progress.start()
            self._task = self._progress.add_task("", total=total, completed=completed, **fields)
        else:
            assert self._task is not None
            self._progress.update(self._task, total=total, completed=completed, **fields)

    def close(self) -> None:
        """Draw the last state and give the terminal back; safe to call twice."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TrainProgress(_Live):
    """``on_iteration`` callback of train()/resume(): ``iter t/max_iter``, loss, ‖g‖, lr and elapsed seconds."""

    def __init__(self, enabled: bool, max_iter: int) -> None:
        super().__init__(enabled, (
            TextColumn("iter {task.completed:>6.0f}/{task.total:.0f}"), BarColumn(bar_width=24),
            TextColumn("loss {task.fields[loss]:.10g}  ‖g‖ {task.fields[grad_norm]:.3e}  "
                       "lr {task.fields[lr]:.3g}  {task.fields[elapsed]:.1f}s")))
        self.max_iter = max_iter

    def __call__(self, t: int, rec: dict[str, Any]) -> None:
        self._update(self.max_iter, t, loss=float(rec["loss"]), grad_norm=float(rec["grad_norm"]),
                     lr=float(rec["lr"]), elapsed=float(rec["elapsed"]))


class _SinceStart(ProgressColumn):
    """Read rate and elapsed time since the command began, not since the line first showed (the first piece):
    with one sample rich's own speed is unknown and its clock would start at zero."""

    def __init__(self, t0: float) -> None:
        super().__init__()
        self.t0 = t0

    def render(self, task: Task) -> Text:
        seconds = max(time.monotonic() - self.t0, 1e-9)
        rate = task.speed or task.completed / seconds
        return Text(f"{decimal(int(rate))}/s  {timedelta(seconds=int(seconds))}", style="progress.elapsed")


class IngestProgress(_Live):
    """``on_piece`` callback of ingest(): pieces parsed of all, bytes read of all, the read rate, elapsed.

    The line ends with the last piece: what follows (the last writes, hashing, the commit, a local cluster's
    shutdown) is short and may log, which must not land inside a live line.
    """

    def __init__(self, enabled: bool) -> None:
        # the clock starts with the command: made right where it begins, in its `with`
        super().__init__(enabled, (TextColumn("ingest {task.fields[done]}/{task.fields[pieces]} pieces"),
                                   BarColumn(bar_width=24), DownloadColumn(), _SinceStart(time.monotonic())))

    def __call__(self, done: int, total: int, bytes_done: int, bytes_total: int) -> None:
        self._update(bytes_total, bytes_done, done=done, pieces=total)
        if done == total:
            self.close()
