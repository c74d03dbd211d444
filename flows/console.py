"""What a command-line run needs around a Prefect flow: user errors as one line, and an ephemeral server that
never outlives the command.

* Prefect logs a failed task or flow with its traceback on the console (twice: the task, then the flow).
  For the project's own errors (a refusal, a bad raster, a config mistake) that is noise before the reason,
  which the command prints as one line. :func:`quiet_user_errors` keeps those records off the *console*
  only: the API handler still sends them, traceback and all, to the server, so the UI and
  ``prefect flow-run logs`` keep them. ``geo-dino --debug`` leaves them on the console.
* In ephemeral mode Prefect starts a uvicorn server as a child process and stops it at exit. A command
  killed with SIGKILL (or SIGTERM, which skips ``atexit``) leaves that server running for ever.
  :func:`ephemeral_server` starts it with a watchdog beside it: the watchdog holds the read end of a pipe
  whose write end only this process holds, so the pipe closes however this process ends, and the watchdog
  then stops the server. With ``PREFECT_API_URL`` set (a real server) nothing is started.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from geo_dino.errors import GeoDinoError

#: the watchdog: read the server's pids (one per line) until EOF (the command has ended, however it ended),
#: then stop each (TERM, then KILL after 5 s)
_WATCHDOG = """
import os, signal, sys, time
pids = [int(line) for line in sys.stdin if line.strip()]
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
for _ in range(50):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    if not alive:
        sys.exit(0)
    time.sleep(0.1)
for pid in alive:
    os.kill(pid, signal.SIGKILL)
"""


def _error_names() -> set[str]:
    """The class names of the project's errors (GeoDinoError and every subclass)."""
    names, todo = set(), [GeoDinoError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class ConsoleFilter(logging.Filter):
    """Keeps off the console: records about the project's own errors (``errors``), i.e. records carrying one
    as ``exc_info`` and Prefect's state lines that name one (``Finished in state Failed('… RunRefused: …')``);
    and Prefect's "View at" links (``links``: a temporary server has no UI and stops with the command)."""

    def __init__(self, errors: bool = True, links: bool = False) -> None:
        super().__init__("geo_dino.console")
        self._named = re.compile(r"\b({})[:(]".format("|".join(sorted(map(re.escape, _error_names())))))
        self._errors, self._links = errors, links

    def filter(self, record: logging.LogRecord) -> bool:
        """False: keep the record off the console."""
        if self._links and record.getMessage().startswith("View at http"):
            return False
        if not self._errors:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GeoDinoError):
            return False
        if record.levelno >= logging.INFO and record.name.startswith("prefect"):
            return self._named.search(record.getMessage()) is None
        return True


def _console_handlers() -> list[logging.Handler]:
    """Every handler that writes to the terminal (Prefect's console handler, on root and its own loggers)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    found: list[logging.Handler] = []
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and h not in found:
                found.append(h)
    return found


@contextmanager
def quiet_user_errors(debug: bool = False, ephemeral: bool = False) -> Iterator[None]:
    """Keep Prefect's console free of tracebacks for the project's own errors (not with ``debug``) and, on a
    temporary server, of links to a UI that does not exist."""
    filt = ConsoleFilter(errors=not debug, links=ephemeral)
    handlers = _console_handlers()
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)


def _watched_server_class() -> type:
    """Prefect's temporary server, told to its watchdog the moment its process exists (before the wait for
    it to answer, so a command killed during that wait leaves nothing behind either)."""
    from prefect.server.api.server import SubprocessASGIServer

    class WatchedServer(SubprocessASGIServer):
        _instances: dict = {}
        watchdog: subprocess.Popen[bytes] | None = None

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            if self.watchdog is None or self.watchdog.poll() is not None:
                type(self).watchdog = subprocess.Popen(
                    [sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE,
                    start_new_session=True)  # a Ctrl-C to the terminal's group does not end it first
            proc = super()._run_uvicorn_command()
            if self.watchdog is None or self.watchdog.stdin is None:  # pragma: no cover - set just above
                raise RuntimeError("the temporary server's watchdog did not start")
            self.watchdog.stdin.write(f"{proc.pid}\n".encode())
            self.watchdog.stdin.flush()
            return proc

    return WatchedServer


_SERVER: dict[str, Any] = {}


def ephemeral_server() -> str | None:
    """Start (once per process) Prefect's temporary server with a watchdog that stops it when this process
    ends, however it ends (SIGKILL included). Its API URL, or None where ``PREFECT_API_URL`` names a server
    already (nothing is started then)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    if "server" not in _SERVER:
        _SERVER["server"] = _watched_server_class()()
    server = _SERVER["server"]
    server.start()
    return str(server.api_url)


@contextmanager
def flow_session(debug: bool = False) -> Iterator[str | None]:
    """Around a flow started from the command line: the server (see :func:`ephemeral_server`) and a console
    without tracebacks for the project's own errors. Yields the API URL of a server started here, or None."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = ephemeral_server()
    with quiet_user_errors(debug, ephemeral=url is not None):
        if url is None:
            yield None
            return
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
