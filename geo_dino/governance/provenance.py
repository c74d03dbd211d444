"""Provenance: what ran, on what, with which software — as a JSON sidecar and as GeoTIFF tags.

A :class:`ProvenanceRecord` is a small builder around a plain dict, written atomically to
``<run_dir>/provenance.json``. Its sections (``backbone``, ``config``, ``aoi``, ``screening``, ``software``,
``git``, ``inputs``, ``outputs``, ...) are filled by the stages that know them; :func:`geotiff_tags` flattens
the key fields into tags carried by every output raster.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from geo_dino.files import RECORD, sha256_file

SCHEMA = "geo_dino.provenance/1"

#: Distributions whose versions go into every record (key in the record -> distribution name).
_DISTRIBUTIONS: dict[str, str] = {
    "torch": "torch", "timm": "timm", "numpy": "numpy", "rasterio": "rasterio", "shapely": "shapely",
    "geopandas": "geopandas", "pyproj": "pyproj", "xarray": "xarray", "dask": "dask", "prefect": "prefect",
    "pydantic": "pydantic", "rio_cogeo": "rio-cogeo", "safetensors": "safetensors", "zarr": "zarr",
    "distributed": "distributed", "prefect_dask": "prefect-dask",
}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions of Python, the platform, geo_dino, the main libraries, GDAL, PROJ and GEOS (missing: None).

    Library versions come from ``importlib.metadata`` (nothing heavy such as Prefect or torch is imported);
    GDAL, PROJ and GEOS are asked of rasterio, pyproj and shapely.
    """
    import geo_dino

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "geo_dino": _dist_version("geo-dino") or geo_dino.__version__,
    }
    versions.update({key: _dist_version(dist) for key, dist in _DISTRIBUTIONS.items()})
    try:
        import rasterio

        versions["GDAL"] = rasterio.__gdal_version__
    except ImportError:
        versions["GDAL"] = None
    try:
        import pyproj

        versions["PROJ"] = pyproj.proj_version_str
    except ImportError:
        versions["PROJ"] = None
    try:
        import shapely

        versions["GEOS"] = shapely.geos_version_string
    except ImportError:
        versions["GEOS"] = None
    return versions


def _git(repo_dir: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    # a copy for the child; os.environ untouched
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                              timeout=10, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def git_info(repo_dir: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha or None, "dirty": bool}`` of the git work tree at ``repo_dir``; None if not in one.

    ``repo_dir`` defaults to the folder holding the ``geo_dino`` package. ``commit`` is None in a repository
    without commits; ``dirty`` is True when tracked files differ from HEAD or nothing is committed yet.
    """
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[2]
    inside = _git(repo_dir, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != "true":
        return None
    head = _git(repo_dir, "rev-parse", "--verify", "-q", "HEAD")
    commit = (head.stdout.strip() if head is not None and head.returncode == 0 and head.stdout.strip()
              else None)
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    dirty = commit is None or status is None or status.returncode != 0 or bool(status.stdout.strip())
    return {"commit": commit, "dirty": dirty}


def git_commit(repo_dir: Path | None = None) -> str | None:
    """The HEAD commit of the work tree at ``repo_dir`` (see :func:`git_info`), or None."""
    info = git_info(repo_dir)
    return info["commit"] if info else None


def _metres_per_unit(crs: Any) -> float | None:
    for axis in crs.axis_info:
        if axis.unit_name and axis.unit_conversion_factor:
            return float(axis.unit_conversion_factor)
    return None


def raster_input_record(path: Path | str) -> dict[str, Any]:
    """Describe an input raster: path, sha256, size, driver, CRS, transform, shape, dtypes, nodata, GSD.

    ``crs`` is ``"EPSG:n"`` when pyproj finds a code, WKT otherwise. ``gsd`` gives ``x``/``y`` pixel sizes in
    CRS units plus ``x_m``/``y_m`` in metres (for a geographic CRS, geodesic lengths of one pixel at the
    raster's centre).
    """
    import rasterio
    from pyproj import CRS, Geod

    path = Path(path)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(path) as src:
        crs_s: str | None = None
        gsd: dict[str, Any] = {"x": abs(src.transform.a), "y": abs(src.transform.e), "x_m": None, "y_m": None}
        if src.crs is not None:
            crs = CRS.from_user_input(src.crs.to_wkt())
            epsg = crs.to_epsg()
            crs_s = f"EPSG:{epsg}" if epsg else crs.to_wkt()
            if crs.is_geographic:
                crs_geod = crs.get_geod()
                geod = Geod(ellps="WGS84") if crs_geod is None else crs_geod
                cx, cy = src.transform @ (src.width / 2, src.height / 2)
                _, _, dx = geod.inv(cx - gsd["x"] / 2, cy, cx + gsd["x"] / 2, cy)
                _, _, dy = geod.inv(cx, cy - gsd["y"] / 2, cx, cy + gsd["y"] / 2)
                gsd.update(x_m=abs(dx), y_m=abs(dy), at=[cx, cy])
            else:
                factor = _metres_per_unit(crs)
                if factor:
                    gsd.update(x_m=gsd["x"] * factor, y_m=gsd["y"] * factor)
        return {
            "path": str(path),
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
            "driver": src.driver,
            "crs": crs_s,
            "transform": [float(v) for v in tuple(src.transform)[:6]],
            "width": src.width,
            "height": src.height,
            "count": src.count,
            "dtypes": list(src.dtypes),
            "nodata": src.nodata,
            "gsd": gsd,
            "acquired": acquisition_date(path, src.tags()),
        }


#: dataset tags that carry an acquisition time, in the order they are trusted
_DATE_TAGS = ("ACQUISITION_DATE", "ACQUISITIONDATE", "DATE_ACQUIRED", "SENSING_TIME", "acquisition_date",
              "TIFFTAG_DATETIME")


def acquisition_date(path: Path, tags: dict[str, str]) -> dict[str, Any] | None:
    """When a raster was acquired, as far as its tags or its file name say: ``{"start", "end", "source"}``
    (ISO dates; a year alone spans the year), or None. ``TIFFTAG_DATETIME`` is the file's own time, often its
    processing time: trusted last."""
    import re
    from datetime import date

    def day(y: str, m: str, d: str) -> str | None:
        try:
            return date(int(y), int(m), int(d)).isoformat()
        except ValueError:
            return None

    for tag in _DATE_TAGS:
        value = tags.get(tag)
        m = re.match(r"\s*(\d{4})[-:/](\d{2})[-:/](\d{2})", value or "")
        if m and (iso := day(*m.groups())):
            return {"start": iso, "end": iso, "source": f"tag {tag}"}
    name = Path(path).stem
    m = re.search(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)", name)
    if m and 1972 <= int(m.group(1)) <= 2100 and (iso := day(*m.groups())):
        return {"start": iso, "end": iso, "source": "file name"}
    m = re.search(r"(?<!\d)(19[7-9]\d|20\d\d)(?!\d)", name)
    if m:
        return {"start": f"{m.group(1)}-01-01", "end": f"{m.group(1)}-12-31", "source": "file name (year)"}
    return None


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by strings (``"nan"``, ``"inf"``) so the record is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class ProvenanceRecord:
    """A run's provenance record: a plain dict of sections, read from and written to ``provenance.json``.

    :meth:`create` starts one (``schema``, ``created_at`` in UTC ISO 8601, ``run_id``, ``timings``);
    :meth:`open` reads the one a run has written so far. Sections are set with :meth:`set` or merged with
    :meth:`update` (``timings`` are added to, not replaced); :meth:`write` saves it atomically as strict JSON
    (non-finite floats become ``"nan"``/``"inf"``). Every stage of a run and of head training writes its
    sections this way (:func:`geo_dino.run.folder.update_record`).
    """

    FIXED = ("schema", "created_at", "run_id")  # set once, at creation

    def __init__(self, path: Path, data: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] = dict(data or {})

    @classmethod
    def create(cls, run_dir: Path, run_id: str, *, schema: str = SCHEMA) -> ProvenanceRecord:
        """A new record for the run in ``run_dir`` (not written until :meth:`write`)."""
        return cls(Path(run_dir) / RECORD,
                   {"schema": schema, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "run_id": run_id, "timings": {}})

    @classmethod
    def open(cls, path: Path) -> ProvenanceRecord:
        """The record at ``path`` as written so far (empty if there is none yet)."""
        path = Path(path)
        return cls(path, json.loads(path.read_text()) if path.exists() else {})

    def set(self, section: str, value: Any) -> None:
        """Set (replace) one top-level section."""
        if section in self.FIXED and section in self._data:
            raise KeyError(f"provenance section {section!r} is fixed at creation")
        self._data[section] = value

    def update(self, **sections: Any) -> None:
        """Set several sections; ``timings`` is merged into the timings recorded so far."""
        for key, value in sections.items():
            if key == "timings":
                self._data.setdefault("timings", {}).update(value)
            else:
                self.set(key, value)

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Record wall-clock seconds of the ``with`` block under ``timings[stage]`` (added up if repeated)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings = self._data.setdefault("timings", {})
            timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - t0, 6)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the record."""
        return copy.deepcopy(self._data)

    def write(self) -> Path:
        """Write the record atomically as strict, indented, key-sorted JSON; return its path."""
        from geo_dino.files import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_json_safe(self._data), indent=2, sort_keys=True, default=str, allow_nan=False)
        return write_text_atomic(self.path, text + "\n")


def _first(section: Any, *keys: str, default: str = "unknown") -> str:
    if not isinstance(section, dict):
        return default
    for key in keys:
        value = section.get(key)
        if value not in (None, ""):
            return str(value)
    return default


def geotiff_tags(record: dict[str, Any]) -> dict[str, str]:
    """The record's key fields as flat ``GEO_DINO_*`` GeoTIFF tags (all strings; ``"unknown"`` if missing).

    The checkpoint hash is ``"random-init"`` when a ``backbone`` section exists without one.
    """
    backbone = record.get("backbone")
    git = record.get("git")
    commit = _first(git, "commit")
    if isinstance(git, dict) and git.get("dirty") and commit != "unknown":
        commit += "-dirty"
    return {
        "GEO_DINO_RUN_ID": str(record.get("run_id") or "unknown"),
        "GEO_DINO_BACKBONE": _first(backbone, "arch", "name"),
        "GEO_DINO_CHECKPOINT_SHA256": _first(
            backbone, "checkpoint_sha256", "sha256",
            default="random-init" if isinstance(backbone, dict) else "unknown"),
        "GEO_DINO_LICENCE": _first(backbone, "licence", "license"),
        "GEO_DINO_CONFIG_SHA256": _first(record.get("config"), "sha256"),
        "GEO_DINO_AOI_SHA256": _first(record.get("aoi"), "sha256"),
        "GEO_DINO_SCREENING": _first(record.get("screening"), "action", "decision", "outcome", "status"),
        "GEO_DINO_GIT_COMMIT": commit,
        "GEO_DINO_VERSION": _first(record.get("software"), "geo_dino"),
        "GEO_DINO_EVALUATION": _evaluation_tag(record),
        "GEO_DINO_DEPLOYMENT_RECORD": "deployment_record.json (six parts; deployment_record.md for people)",
    }


def _evaluation_tag(record: dict[str, Any]) -> str:
    """Part 4 of the deployment record in one line: a trained head's own test, or unvalidated."""
    head = record.get("supervised_head")
    if not isinstance(head, dict):
        return "unvalidated: label-free outputs, no labelled test"
    test = (head.get("metrics") or {}).get("test") or {}
    miou = test.get("miou")
    return (f"trained head: test mIoU {miou:.3f} on {test.get('pixels')} held-out pixels (the provider's own "
            "test)" if isinstance(miou, (int, float)) else "trained head without test metrics")
