"""A run's own log file, ``run.log`` in its run folder: what happened, when (UTC), in one place.

:func:`run_log` attaches a file handler to the ``geo_dino`` logger and to Prefect's flow-run and task-run
loggers (``prefect.flow_runs``, ``prefect.task_runs``: the lines of ``get_run_logger()``), so those lines
land in the file as they reach the loggers (their levels decide, e.g. ``PREFECT_LOGGING_LEVEL``). It also
writes the run's progress (:mod:`geo_dino.run.progress`): every stage, and the tiles done at most every
:data:`TILES_EVERY_S` seconds (and when the last tile is done).

Logging never fails the run: a full disk or a folder that went away loses log lines, silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from geo_dino.files import RUN_LOG
from geo_dino.run import progress

#: the loggers whose records go to ``run.log``
LOGGERS = ("geo_dino", "prefect.flow_runs", "prefect.task_runs")
#: the format of a line
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: at most one tiles line per this many seconds (the last tile's line aside)
TILES_EVERY_S = 10.0
#: the logger name of the progress lines
PROGRESS_LOGGER = "geo_dino.progress"


class UTCFormatter(logging.Formatter):
    """Times as UTC ISO 8601 with milliseconds: ``2026-05-01T12:00:00.123Z``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's time in UTC, ISO 8601."""
        t = datetime.fromtimestamp(record.created, UTC)
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class QuietFileHandler(logging.FileHandler):
    """A file handler that drops a line it cannot write (a full disk, a removed folder) without a word:
    logging's default prints a traceback to stderr for every such line."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record; opening the file (on the first record) may fail too, quietly as well."""
        try:
            super().emit(record)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Flush what can be flushed."""
        try:
            super().flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Close the file; what it still held and could not write is lost."""
        try:
            super().close()
        except (OSError, ValueError):
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        """Drop the record."""


class _ProgressLines:
    """Writes the progress events of one run to its handler: stages, and the tiles at most every
    ``every_s`` seconds."""

    def __init__(self, run_dir: Path, handler: logging.Handler, every_s: float) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.handler = handler
        self.every_s = every_s
        self.first: progress.Event | None = None
        self.last_line = float("-inf")
        self.lock = threading.Lock()

    def write(self, msg: str) -> None:
        rec = logging.LogRecord(PROGRESS_LOGGER, logging.INFO, __file__, 0, msg, None, None)
        self.handler.handle(rec)

    def __call__(self, event: progress.Event) -> None:
        if event.run_dir != self.run_dir:
            return
        with self.lock:
            self.first = progress.rate_origin(self.first, event)
            if event.kind == "stage":
                self.write(f"stage {event.name}" + (f": {event.message}" if event.message else ""))
                return
            finished = event.total > 0 and event.done >= event.total
            if not finished and event.at - self.last_line < self.every_s:
                return
            self.last_line = event.at
            self.write(tiles_line(event, progress.rate(self.first, event)))


def tiles_line(event: progress.Event, rate: float | None) -> str:
    """``tiles 120/484 (24.8 %), 12.3 tiles/s`` (the rate when known; ``?`` for an unknown total)."""
    total = str(event.total) if event.total else "?"
    pct = f" ({100 * event.fraction:.1f} %)" if event.fraction is not None else ""
    return f"tiles {event.done}/{total}{pct}" + (f", {rate:.1f} tiles/s" if rate else "")


@contextmanager
def run_log(run_dir: Path, every_s: float = TILES_EVERY_S) -> Iterator[logging.Handler]:
    """Append the run's log lines to ``run_dir / run.log`` until the block ends (see the module's text);
    yields the handler."""
    run_dir = Path(run_dir)
    handler = QuietFileHandler(run_dir / RUN_LOG, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(UTCFormatter(FORMAT))
    loggers = [logging.getLogger(name) for name in LOGGERS]
    lines = _ProgressLines(run_dir, handler, every_s)
    lines.write(f"run {run_dir.name}: log opened")
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with progress.listening(lines):
            yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
