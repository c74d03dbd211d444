"""Files: a run folder's file names, the one atomic-write helper, a file's sha256, and paths kept inside.

Every file the package writes goes through :func:`atomic_write` (or its text/JSON/array forms): the bytes
go to a hidden temporary file beside the target, then ``os.replace`` puts it in place, so a reader (a resumed
run, another task, QGIS) sees the old file or the new one, never half of one. A failed write leaves no
temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geo_dino.errors import OutputError

# The names of the files in a run folder; no other module spells them (see geo_dino.run.folder).
CONFIG = "config.resolved.json"
PLAN = "plan.json"
RECORD = "provenance.json"
SCREENING = "screening.json"
TILE_INDEX = "tiles.gpkg"
QGIS_PROJECT = "run.qgs"
WORK = "work"
HEADS = "work/heads.npz"  # the label-free heads (PCA, k-means) fitted by fit_heads
LABEL_FREE_MODEL = "label_free_heads.npz"  # the same, beside the outputs of a finished run (STAC mlm:model)
CHANGE_MODEL = "work/change.npz"  # the label-free change scores fitted by fit_heads
FEATURE_CACHE = "work/features"  # patch features of the fit tiles, reused by the first chunk
INTERMEDIATES = "work/outputs.zarr"  # the outputs' intermediates, filled by the chunk tasks
SUBMITTED_AOI = "aoi.geojson"  # the AOI of a run submitted by content (geo-dino submit, the inbox, run_many)
RUN_LOG = "run.log"  # the run's log: stage lines, tile counts, the flow's and tasks' log lines
SPACE_RESERVE = "work/.space_reserve"  # disk space held back for the record of a run that fills the disk


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_sibling(dst: Path, suffix: str = "") -> Path:
    """A hidden temporary name beside ``dst``; refuses a symlink there and removes a stale file."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{suffix}")
    if tmp.is_symlink():
        raise OutputError(f"refusing to write {tmp}: it is a symlink")
    tmp.unlink(missing_ok=True)
    return tmp


def atomic_write(path: Path | str, write: Callable[[Path], object], *, suffix: str | None = None,
                 fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it to ``path``; return it.

    ``suffix`` (default: ``path``'s own) keeps the extension that writers such as ``np.savez`` or GDAL drivers
    look at. ``fsync`` flushes the file to disk before the rename (records that must survive a power cut).
    """
    path = Path(path)
    tmp = tmp_sibling(path, path.suffix if suffix is None else suffix)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDWR)  # writable: Windows' fsync (_commit) refuses a read-only descriptor
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path | str, text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: Path | str, obj: object, *, fsync: bool = False) -> Path:
    """Write ``obj`` to ``path`` as indented, key-sorted JSON (``str`` for the rest), atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str), fsync=fsync)


def save_npz(path: Path | str, arrays: dict[str, Any]) -> Path:
    """Write ``arrays`` to ``path`` (``.npz``) atomically; return ``path``."""
    import numpy as np

    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def safe_output_path(run_dir: Path, name: str) -> Path:
    """``run_dir / name``, refusing names that are absolute, contain ``..``, or pass through a symlink.

    Raises :class:`OutputError` when the result would resolve outside ``run_dir``.
    """
    run_dir = Path(run_dir)
    rel = Path(name)
    if not str(name) or rel.is_absolute() or rel.anchor:
        raise OutputError(f"output name {name!r} must be a relative path inside the run folder {run_dir}")
    if ".." in rel.parts:
        raise OutputError(f"output name {name!r} must not contain '..'")
    root = run_dir.resolve()
    candidate = run_dir / rel
    # No component under the run folder may be a symlink (resolve() would follow it silently).
    probe = run_dir
    for part in rel.parts:
        probe = probe / part
        if probe.is_symlink():
            raise OutputError(f"output path {candidate} passes through the symlink {probe}; "
                              "write outputs to plain files inside the run folder")
    resolved = candidate.resolve()
    if resolved == root:
        raise OutputError(f"output name {name!r} names the run folder itself, not a file inside it")
    if not resolved.is_relative_to(root):
        raise OutputError(f"output path {candidate} resolves to {resolved}, outside the run folder {root}")
    return resolved


def check_inside(run_dir: Path, dst: Path) -> Path:
    """Resolved ``dst`` if it is a non-symlink path inside ``run_dir``; :class:`OutputError` otherwise."""
    dst = Path(dst)
    if dst.is_symlink():
        raise OutputError(f"refusing to write {dst}: it is a symlink")
    root = Path(run_dir).resolve()
    resolved = dst.resolve()
    if not resolved.is_relative_to(root):
        raise OutputError(f"refusing to write {dst}: it resolves to {resolved}, "
                          f"outside the run folder {root}")
    return resolved


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder``, across processes: writers that read-modify-write one file take turns
    (two GeoPackage layers written at once, two chunk tasks writing feature-cube rows of one Zarr chunk).

    POSIX: ``flock`` on the folder itself (no lock file). Windows, which has no ``fcntl`` and cannot open a
    folder as a file: ``msvcrt.locking`` on a lock file named after the folder in the temporary directory, so
    the run folder holds the same files on every system.
    """
    if sys.platform == "win32":
        import errno
        import hashlib
        import msvcrt
        import tempfile

        key = hashlib.sha256(os.path.normcase(str(Path(folder).resolve())).encode()).hexdigest()[:32]
        fd = os.open(Path(tempfile.gettempdir()) / f"geo_dino-{key}.lock", os.O_RDWR | os.O_CREAT)
        try:
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # tries for ten seconds, then raises EDEADLK
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
            try:
                yield
            finally:
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
    else:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
