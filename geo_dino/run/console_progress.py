"""A run's progress on the terminal (the command line's stderr): one line per stage and a bar for the tiles.

On a terminal: a ``rich`` progress bar (description, bar, ``M/N tiles``, tiles/s, elapsed, remaining) with
the stage lines printed above it; log lines of handlers that print through a ``rich`` console to the same
terminal (Prefect's console handler) go through the bar's console meanwhile, so they do not tear the bar.
Elsewhere (a pipe, a file, a test capturing the output): plain lines, a stage line each and a tiles line at
each further tenth of the tiles at most (and the last one, ``N/N tiles``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from geo_dino.run import progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, Task, TaskID
    from rich.text import Text


def _clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` / ``7s``."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else (f"{m}:{s:02d}" if m else f"{s}s")


class PlainDisplay:
    """Plain lines for a stream that is not a terminal: ``inference: 484 tiles in 31 chunks`` per stage and
    ``120/484 tiles (24 %), 12.3 tiles/s, 29s left`` at most once per tenth of the tiles."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.first: progress.Event | None = None
        self.tenth = -1

    def line(self, text: str) -> None:
        """Write one line; a stream that went away loses it."""
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __call__(self, event: progress.Event) -> None:
        """Show ``event``."""
        with self.lock:
            self.first = progress.rate_origin(self.first, event)
            if event.kind == "stage":
                self.line(f"{event.name}: {event.message}" if event.message else event.name)
                return
            frac = event.fraction
            if frac is None:
                return
            tenth = int(frac * 10)
            if tenth <= self.tenth:
                return
            self.tenth = tenth
            rate = progress.rate(self.first, event)
            text = f"{event.done}/{event.total} tiles ({100 * frac:.0f} %)"
            if rate:
                text += f", {rate:.1f} tiles/s"
                if event.done < event.total:
                    text += f", {_clock((event.total - event.done) / rate)} left"
                elif self.first is not None:
                    text += f", done in {_clock(event.at - self.first.at)}"
            self.line(text)

    def close(self) -> None:
        """Nothing to stop."""


def _speed_column() -> Any:
    """A ``rich`` column: the task's speed as ``12.3 tiles/s``."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TilesPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("? tiles/s" if speed is None else f"{speed:.1f} tiles/s", style="progress.data.speed")

    return TilesPerSecond()


class RichDisplay:
    """A ``rich`` progress bar for the tiles on a terminal, the stage lines above it."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.bar: Progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("tiles"), _speed_column(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.task: TaskID | None = None
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.swapped: list[tuple[logging.Handler, Any]] = []

    def __call__(self, event: progress.Event) -> None:
        """Show ``event``."""
        with self.lock:
            if event.kind == "stage":
                from rich.text import Text

                if event.name != "inference":  # the bar stays where it ended; the next lines below it
                    self._stop()
                self.console.print(Text.assemble((f"{_clock(event.at - self.started):>7} ", "dim"),
                                                 (event.name, "bold"),
                                                 f": {event.message}" if event.message else ""))
                return
            if self.task is None:
                self._start()
                self.task = self.bar.add_task("inference", total=event.total or None, completed=event.done)
            self.bar.update(self.task, completed=event.done, total=event.total or None)

    def _start(self) -> None:
        """Start the bar, and send the log lines of ``rich`` consoles on this terminal through its console."""
        self.bar.start()
        for handler in _handlers():
            other = getattr(handler, "console", None)
            if other is not None and other is not self.console and _same_terminal(other, self.console):
                self.swapped.append((handler, other))
                handler.console = self.console  # type: ignore[attr-defined]

    def _stop(self) -> None:
        """Stop the bar (left on screen as it ended) and give the log handlers their consoles back."""
        if self.task is not None:
            self.bar.stop()
            self.bar.remove_task(self.task)
            self.task = None
        for handler, other in self.swapped:
            handler.console = other  # type: ignore[attr-defined]
        self.swapped.clear()

    def close(self) -> None:
        """Stop the bar, if it still runs."""
        with self.lock:
            self._stop()


def _handlers() -> list[logging.Handler]:
    """Every handler of the root logger and of every named logger."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    found: list[logging.Handler] = []
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if h not in found:
                found.append(h)
    return found


def _same_terminal(a: Any, b: Console) -> bool:
    """Whether ``a`` is a ``rich`` console that writes to the terminal ``b`` writes to."""
    from rich.console import Console

    if not isinstance(a, Console):
        return False
    try:
        return bool(a.is_terminal) and a.file.fileno() == b.file.fileno()
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def console_progress(stream: TextIO | None = None, console: Console | None = None) -> Iterator[None]:
    """Show the progress of the runs in this process on ``stream`` (stderr) until the block ends: the bar on
    a terminal, plain lines elsewhere. ``console``: a ``rich`` console to draw the bar on instead (tests)."""
    stream = stream if stream is not None else sys.stderr
    display: PlainDisplay | RichDisplay
    if console is not None:
        display = RichDisplay(console)
    elif _isatty(stream):
        from rich.console import Console as RichConsole

        display = RichDisplay(RichConsole(file=stream))
    else:
        display = PlainDisplay(stream)
    try:
        with progress.listening(display):
            yield
    finally:
        display.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
