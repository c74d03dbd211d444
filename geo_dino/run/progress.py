"""A run's progress as events, in this process: stage lines and tile counts, for whoever listens.

The stages announce themselves (:func:`stage`: ``screening``, ``planning``, ``fitting label-free heads``,
``inference``, ``writing outputs``, ``done``) and the chunks count their tiles batch by batch
(:func:`advance`, or :func:`tiles` with the count so far). Listeners (the command line's progress bar,
``run.log``, a flow's progress artifact) register with :func:`listening` for as long as they want events.

Emitting is cheap: no I/O, a lock and a dict update, and nothing at all while nobody listens (a Dask
worker's process, a test without a listener). The counts are kept per run folder in this process only, so a
chunk that runs in another process (a Dask worker) counts there, unheard; the process that waits for it then
reports the chunk's tiles when it finishes (:func:`advance` with the chunk's tile count).

A listener that raises does not stop the run: its error is logged (``geo_dino.run.progress``) and the
event goes on to the others. Listeners are called one event at a time, in the order the events happened
(across threads too), from the thread that emitted the event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: the stage names the pipeline announces, in order (``stage`` accepts others)
STAGES = ("screening", "planning", "fitting label-free heads", "inference", "writing outputs", "done")


@dataclass(frozen=True)
class Event:
    """One progress event of the run in ``run_dir``.

    ``kind`` ``stage``: the run entered stage ``name`` (``message`` says more). ``kind`` ``tiles``: ``done``
    of ``total`` tiles are finished (``total`` 0: not known yet). ``at``: ``time.monotonic()`` when emitted.
    """

    kind: Literal["stage", "tiles"]
    run_dir: Path
    at: float
    name: str = ""
    message: str = ""
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or None while the total is unknown."""
        return min(1.0, self.done / self.total) if self.total > 0 else None


Listener = Callable[[Event], None]


@dataclass
class _Count:
    done: int = 0
    total: int = 0
    stage: str = ""


class _Bus:
    """The listeners and each run's counts; one lock serialises registration, counting and delivery."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.listeners: list[Listener] = []
        self.counts: dict[Path, _Count] = {}

    def deliver(self, event: Event) -> None:
        for fn in list(self.listeners):
            try:
                fn(event)
            except Exception:  # a display or a log that fails must not fail the run
                log.warning("progress listener %r failed on %s", fn, event, exc_info=True)


_BUS = _Bus()


def _key(run_dir: Path | str) -> Path:
    return Path(run_dir).absolute()


@contextmanager
def listening(fn: Listener) -> Iterator[Listener]:
    """Call ``fn(event)`` for every event of every run in this process until the block ends. The counts of a
    run are kept while at least one listener is registered (forgotten when the last one leaves)."""
    with _BUS.lock:
        _BUS.listeners.append(fn)
    try:
        yield fn
    finally:
        with _BUS.lock:
            _BUS.listeners.remove(fn)
            if not _BUS.listeners:
                _BUS.counts.clear()


def active() -> bool:
    """Whether anyone listens (events are dropped otherwise): skip work done only to report progress."""
    with _BUS.lock:
        return bool(_BUS.listeners)


def stage(run_dir: Path | str, name: str, message: str = "") -> None:
    """The run in ``run_dir`` enters stage ``name``. Announcing the stage a run is already in does nothing,
    so a stage that is announced from more than one place (a chunk of many, a flow and its stage function)
    gives one event."""
    with _BUS.lock:
        if not _BUS.listeners:
            return
        count = _BUS.counts.setdefault(_key(run_dir), _Count())
        if count.stage == name:
            return
        count.stage = name
        _BUS.deliver(Event("stage", _key(run_dir), time.monotonic(), name=name, message=message))


def tiles(run_dir: Path | str, done: int, total: int | None = None) -> None:
    """``done`` tiles of the run in ``run_dir`` are finished (of ``total``, when given: it is remembered).
    ``done`` is the count so far, not an increment (that is :func:`advance`)."""
    with _BUS.lock:
        if not _BUS.listeners:
            return
        count = _BUS.counts.setdefault(_key(run_dir), _Count())
        _set(count, done, total)
        _BUS.deliver(Event("tiles", _key(run_dir), time.monotonic(), done=count.done, total=count.total))


def advance(run_dir: Path | str, n: int, total: int | None = None) -> None:
    """``n`` more tiles of the run in ``run_dir`` are finished (of ``total``, when given). The count never
    passes a known total (a chunk run again after a failure counts its tiles again)."""
    with _BUS.lock:
        if not _BUS.listeners:
            return
        count = _BUS.counts.setdefault(_key(run_dir), _Count())
        _set(count, count.done + int(n), total)
        _BUS.deliver(Event("tiles", _key(run_dir), time.monotonic(), done=count.done, total=count.total))


def _set(count: _Count, done: int, total: int | None) -> None:
    if total is not None:
        count.total = max(0, int(total))
    count.done = max(0, int(done))
    if count.total:
        count.done = min(count.done, count.total)


def tiles_done(run_dir: Path | str) -> tuple[int, int]:
    """``(done, total)`` as counted so far in this process for the run in ``run_dir`` (``(0, 0)`` when
    nothing was counted, or nobody listens)."""
    with _BUS.lock:
        count = _BUS.counts.get(_key(run_dir))
        return (count.done, count.total) if count else (0, 0)


def rate_origin(first: Event | None, event: Event) -> Event | None:
    """Where a tiles rate counts from once ``event`` is seen: the "inference" stage restarts it at the tiles
    done so far (a resumed run's earlier tiles are not this run's speed); else the first tiles event."""
    if event.kind == "stage":
        if event.name == "inference":
            return Event("tiles", event.run_dir, event.at, done=tiles_done(event.run_dir)[0])
        return first
    return first or event


def rate(first: Event | None, last: Event) -> float | None:
    """Tiles per second between two tile events (None when no time passed, no tile finished or there is no
    first event)."""
    if first is None:
        return None
    dt = last.at - first.at
    dn = last.done - first.done
    return dn / dt if dt > 0 and dn > 0 else None
