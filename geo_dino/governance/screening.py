"""Sensitive-site screening: is an area of interest allowed to run, and what must be masked?

Three inputs, each fixed by a sha256 recorded in the decision:

* the **registry** (:func:`load_registry`): a GeoPackage/GeoJSON of sites in EPSG:4326 with a ``category``
  column, shipped as ``data/registry/sensitive_sites.gpkg`` and built by ``scripts/build_registry.py``;
* the **policy** (:func:`load_policy`): per category an action and a buffer in metres
  (``configs/screening_policy.yaml``);
* the **AOI** geometry in EPSG:4326.

:func:`screen` returns a :class:`Decision` and never raises for a refusal; :func:`enforce` turns a refusal
into :class:`~geo_dino.errors.RunRefused`. Anything that makes the screen unreliable (missing, empty,
corrupt or tampered registry or policy) raises :class:`~geo_dino.errors.ScreeningError`: the screen fails
closed.

Buffers are metric: each candidate site and the nearby part of the AOI are projected to an azimuthal
equidistant projection centred on the site (pyproj, lon/lat order as with ``always_xy=True``); distances
and buffers are computed there in metres, and buffered geometries are projected back to EPSG:4326.
Candidates are found first through the registry's spatial index with a bounding box generously widened by
the largest buffer, so only a handful of sites get the exact test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geo_dino.config import Approval
from geo_dino.errors import AOIError, ConfigError, RunRefused, ScreeningError

ACTIONS: tuple[str, ...] = ("allow", "record", "mask", "require_approval", "deny")
"""Actions ordered by severity. ``allow`` means nothing was hit; a policy may use the other four."""

POLICY_ACTIONS = ACTIONS[1:]
MAX_BUFFER_M = 100_000.0
MAX_POLICY_BYTES = 1_000_000
MAX_REGISTRY_BYTES = 256 * 1024 * 1024
REGISTRY_LAYER = "sites"
_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
_M_PER_DEG = 111_000.0  # metres per degree of latitude, rounded down; the prefilter widens it further
_QUAD_SEGS = 16
_SEGMENT_DEG = 0.005  # densify lon/lat edges before projecting (about 550 m)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _severity(action: str) -> int:
    return ACTIONS.index(action)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class PolicyRule:
    """What a hit on one category triggers, and within how many metres of the site."""

    action: str
    buffer_m: float


@dataclass(frozen=True)
class Policy:
    """A validated screening policy; ``sha256`` is the digest of the file's bytes."""

    version: int
    default: PolicyRule
    categories: dict[str, PolicyRule]
    sha256: str
    path: str = ""

    def rule(self, category: str) -> PolicyRule:
        """The rule for ``category``; the default rule for a category the policy does not list."""
        return self.categories.get(category, self.default)


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    action: Literal["record", "mask", "require_approval", "deny"]
    buffer_m: Annotated[float, Field(ge=0, le=MAX_BUFFER_M, allow_inf_nan=False)]


class _PolicyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1]
    default: _RuleModel
    categories: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], _RuleModel]


def _policy_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (allowed: version, default, categories; a rule has action and buffer_m)"
        elif err["type"] == "literal_error" and key.endswith("action"):
            msg = f"unknown action {err.get('input')!r}; use one of {', '.join(POLICY_ACTIONS)}"
        lines.append(f"  {key}: {msg}")
    return (f"screening policy {path} is invalid, so the screen cannot run (fix the file; see "
            f"configs/screening_policy.yaml):\n" + "\n".join(lines))


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a YAML screening policy.

    Raises :class:`ScreeningError` naming the offending key when the file is missing, unreadable, not YAML,
    or breaks the schema (unknown key, unknown action, negative/non-finite/over-100 km buffer, bad version).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ScreeningError(f"screening policy not found: {p}; set screening.policy to an existing file "
                             f"(the project ships configs/screening_policy.yaml)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ScreeningError(f"screening policy {p} cannot be read ({exc}); fix its permissions") from None
    if len(data) > MAX_POLICY_BYTES:
        raise ScreeningError(f"screening policy {p} is {len(data)} bytes, over the {MAX_POLICY_BYTES} limit; "
                             f"a policy is a short YAML file")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ScreeningError(f"screening policy {p} is not valid UTF-8 YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ScreeningError(f"screening policy {p} must be a mapping with keys version, default, categories")
    try:
        model = _PolicyModel.model_validate(doc)
    except ValidationError as exc:
        raise ScreeningError(_policy_errors(p, exc)) from None
    return Policy(
        version=model.version,
        default=PolicyRule(model.default.action, float(model.default.buffer_m)),
        categories={k: PolicyRule(v.action, float(v.buffer_m)) for k, v in sorted(model.categories.items())},
        sha256=_sha256_bytes(data),
        path=str(p.resolve()),
    )


# ------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registry:
    """A loaded, verified site registry. :meth:`frame` gives its GeoDataFrame (EPSG:4326; do not modify)."""

    path: str
    sha256: str
    n_sites: int
    categories: tuple[str, ...]
    gdf: Any = field(default=None, compare=False, repr=False)

    def frame(self) -> Any:
        """The sites as a GeoDataFrame with ``site_id``, ``name``, ``category`` and geometry, in EPSG:4326."""
        return self.gdf


def _read_sidecar(sidecar: Path, registry: Path) -> str:
    try:
        text = sidecar.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScreeningError(f"registry checksum file {sidecar} cannot be read ({exc}); rebuild the registry "
                             f"with scripts/build_registry.py") from None
    parts = text.split()
    if not parts or not _HEX64.match(parts[0].lower()) or len(parts) > 2 \
            or (len(parts) == 2 and parts[1].lstrip("*") != registry.name):
        raise ScreeningError(f"registry checksum file {sidecar} is malformed (expected '<64 hex>  "
                             f"{registry.name}'); rebuild the registry with scripts/build_registry.py")
    return parts[0].lower()


def load_registry(path: str | os.PathLike[str], expected_sha256: str | None = None) -> Registry:
    """Load and verify a sensitive-site registry; fail closed on anything doubtful.

    The file's bytes are hashed and parsed from the same buffer. Raises :class:`ScreeningError` when the file
    is missing, too large, not a GeoPackage/GeoJSON (or its content does not match its extension), corrupt,
    has no ``category`` column, has zero sites, has sites with no geometry or category, has no CRS, when its
    sha256 differs from ``expected_sha256`` or from a sibling ``<file>.sha256``, or when neither vouches for
    it (no sidecar and no ``expected_sha256``). A registry in another CRS
    is reprojected to EPSG:4326; invalid polygons are repaired with ``make_valid``.
    """
    import numpy as np
    import pyogrio
    import shapely

    p = Path(path)
    if not p.is_file():
        raise ScreeningError(f"sensitive-site registry not found: {p}; the screen cannot run without it. "
                             f"Set screening.registry, or rebuild it with scripts/build_registry.py")
    driver = _DRIVERS.get(p.suffix.lower())
    if driver is None:
        raise ScreeningError(f"registry {p}: unsupported file type {p.suffix!r}; use a GeoPackage (.gpkg) "
                             f"or GeoJSON (.geojson)")
    size = p.stat().st_size
    if size > MAX_REGISTRY_BYTES:
        raise ScreeningError(f"registry {p} is {size} bytes, over the {MAX_REGISTRY_BYTES} limit")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ScreeningError(f"registry {p} cannot be read ({exc}); fix its permissions") from None
    digest = _sha256_bytes(data)

    if expected_sha256 is not None:
        want = expected_sha256.strip().lower()
        if not _HEX64.match(want):
            raise ScreeningError(f"screening.registry_sha256 {expected_sha256!r} is not a 64-digit hex "
                                 f"sha256; copy it from {p.name}.sha256")
        if want != digest:
            raise ScreeningError(f"registry {p} has sha256 {digest}, not the expected {want}: the file "
                                 f"was changed or replaced. Restore it, or update screening.registry_sha256 "
                                 f"after review")
    sidecar = p.with_name(p.name + ".sha256")
    if not sidecar.exists() and expected_sha256 is None:  # fail closed: nothing vouches for these bytes
        raise ScreeningError(f"registry {p} has no {sidecar.name} beside it and the config pins no "
                             f"screening.registry_sha256, so its integrity cannot be checked. Restore the "
                             f"sidecar, or set screening.registry_sha256: {digest} after reviewing the file")
    if sidecar.exists():
        want = _read_sidecar(sidecar, p)
        if want != digest:
            raise ScreeningError(f"registry {p} has sha256 {digest}, but {sidecar.name} says {want}: the "
                                 f"file was changed or replaced. Restore it or rebuild it with "
                                 f"scripts/build_registry.py")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "non conformant file extension" of /vsimem/
            info_driver = pyogrio.read_info(data)["driver"]
            layers = [str(name) for name, _ in pyogrio.list_layers(data)]
            if info_driver != driver:
                raise ScreeningError(f"registry {p} is a {info_driver} file, not the {driver} its extension "
                                     f"says; use a GeoPackage or GeoJSON with the matching extension")
            if driver == "GPKG":
                if REGISTRY_LAYER in layers:
                    layer = REGISTRY_LAYER
                elif len(layers) == 1:
                    layer = layers[0]
                else:
                    raise ScreeningError(f"registry {p} has layers {layers} and none named "
                                         f"{REGISTRY_LAYER!r}; name the sites layer {REGISTRY_LAYER!r}")
            else:
                layer = None
            gdf = pyogrio.read_dataframe(data, layer=layer)
    except ScreeningError:
        raise
    except Exception as exc:  # pyogrio/GDAL errors: corrupt or unreadable content
        raise ScreeningError(f"registry {p} cannot be read as {driver} ({type(exc).__name__}: {exc}); "
                             f"rebuild it with scripts/build_registry.py") from None

    if "category" not in gdf.columns:
        raise ScreeningError(f"registry {p} has no 'category' column (columns: {list(gdf.columns)}); every "
                             f"site needs a category that the policy maps to an action")
    if len(gdf) == 0:
        raise ScreeningError(f"registry {p} has zero sites: an empty registry would let every AOI pass. "
                             f"Rebuild it with scripts/build_registry.py")
    if gdf.crs is None:
        raise ScreeningError(f"registry {p} has no CRS; write it with EPSG:4326")
    if gdf.crs.to_epsg() != 4326:
        try:
            gdf = gdf.to_crs("EPSG:4326")
        except Exception as exc:
            raise ScreeningError(f"registry {p}: cannot reproject from {gdf.crs} to EPSG:4326 ({exc}); "
                                 f"write it in EPSG:4326") from None

    geoms = gdf.geometry.values
    bad = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    if bad.any():
        raise ScreeningError(f"registry {p}: {int(bad.sum())} site(s) have no geometry (an empty geometry "
                             f"never intersects, so it would be skipped silently); drop or fix them")
    xy = shapely.get_coordinates(geoms)
    if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180 + 1e-9).any() \
            or (np.abs(xy[:, 1]) > 90 + 1e-9).any():
        raise ScreeningError(f"registry {p}: coordinates outside lon [-180, 180] / lat [-90, 90] or not "
                             f"finite (swapped axes or a wrong CRS?); fix the file")
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        gdf = gdf.set_geometry(shapely.make_valid(geoms))

    cats = gdf["category"]
    if cats.isna().any() or not all(isinstance(c, str) and c.strip() for c in cats):
        raise ScreeningError(f"registry {p}: some sites have no category; every site needs one")
    gdf = gdf.copy()
    gdf["category"] = [c.strip() for c in cats]
    if "site_id" not in gdf.columns:
        gdf["site_id"] = [f"{p.stem}:{i}" for i in range(len(gdf))]
    gdf["site_id"] = gdf["site_id"].astype(str)
    if "name" not in gdf.columns:
        gdf["name"] = ""
    gdf["name"] = gdf["name"].fillna("").astype(str)
    gdf = gdf.reset_index(drop=True)
    _ = gdf.sindex  # build the spatial index once, now
    return Registry(path=str(p.resolve()), sha256=digest, n_sites=len(gdf),
                    categories=tuple(sorted(set(gdf["category"]))), gdf=gdf)


# ------------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class SiteHit:
    """One site within its policy buffer of the AOI. ``distance_m`` is 0 when the AOI touches the site."""

    site_id: str
    name: str
    category: str
    action: str
    buffer_m: float
    distance_m: float


@dataclass(frozen=True)
class Decision:
    """The outcome of a screen. ``masked`` holds the buffered EPSG:4326 geometries of the ``mask`` hits."""

    action: str
    allowed: bool
    hits: tuple[SiteHit, ...]
    approval: dict | None
    registry: dict
    policy: dict
    aoi_sha256: str
    decided_at: str
    reason: str
    masked: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)
    # every hit site's own geometry (EPSG:4326, unbuffered), whatever its action: the map of what was hit
    sites: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    def mask_geometry(self, crs: Any) -> Any:
        """Union of the buffered sites whose action is ``mask``, in ``crs`` (always_xy); None when none.

        Raises :class:`ScreeningError` when the mask cannot be expressed in ``crs`` (non-finite coordinates),
        since a mask that silently fails would leave sensitive pixels in the outputs.
        """
        if not self.masked:
            return None
        import numpy as np
        import shapely
        from pyproj import CRS, Transformer

        union = shapely.union_all([g for _, g in self.masked])
        target = CRS.from_user_input(crs)
        if target.to_epsg() == 4326:
            return union
        tr = Transformer.from_crs("EPSG:4326", target, always_xy=True)
        out = shapely.transform(shapely.segmentize(union, _SEGMENT_DEG), _xy_func(tr))
        if not np.isfinite(shapely.get_coordinates(out)).all():
            raise ScreeningError(f"the screening mask cannot be projected to {target.to_string()} (sites "
                                 f"{[s for s, _ in self.masked][:5]} fall outside its valid area); use an "
                                 f"output CRS that covers the AOI")
        return shapely.make_valid(out) if not out.is_valid else out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, with ``mask_4326``: a GeoJSON FeatureCollection of the masked, buffered sites,
        and ``sites_4326``: one of every site hit (its own geometry, with the hit's fields)."""
        import shapely

        by_id = {h.site_id: h for h in self.hits}
        features = [{"type": "Feature",
                     "properties": {"site_id": sid, "category": by_id[sid].category,
                                    "buffer_m": by_id[sid].buffer_m},
                     "geometry": json.loads(shapely.to_geojson(g))} for sid, g in self.masked]
        sites = [{"type": "Feature", "properties": asdict(by_id[sid]),
                  "geometry": json.loads(shapely.to_geojson(g))} for sid, g in self.sites if sid in by_id]
        return {
            "action": self.action,
            "allowed": self.allowed,
            "reason": self.reason,
            "hits": [asdict(h) for h in self.hits],
            "approval": dict(self.approval) if self.approval else None,
            "registry": dict(self.registry),
            "policy": dict(self.policy),
            "aoi_sha256": self.aoi_sha256,
            "decided_at": self.decided_at,
            "mask_4326": {"type": "FeatureCollection", "features": features},
            "sites_4326": {"type": "FeatureCollection", "features": sites},
        }


def _xy_func(tr: Any, inverse: bool = False) -> Any:
    """A coordinate function for :func:`shapely.transform` applying the pyproj transformer ``tr``."""
    import numpy as np

    direction = "INVERSE" if inverse else "FORWARD"

    def f(xy: Any) -> Any:
        x, y = tr.transform(xy[:, 0], xy[:, 1], direction=direction)
        return np.column_stack([x, y])

    return f


def _deg_pad(buffer_m: float, lat_lo: float, lat_hi: float) -> tuple[float, float]:
    """Generous (dlon, dlat) in degrees covering ``buffer_m`` metres between the two latitudes."""
    dlat = buffer_m / _M_PER_DEG * 1.25 + 1e-3
    lat_max = max(abs(lat_lo - dlat), abs(lat_hi + dlat))
    if lat_max >= 89.0:
        return 360.0, dlat
    dlon = buffer_m / (_M_PER_DEG * math.cos(math.radians(lat_max))) * 1.25 + 1e-3
    return (360.0 if dlon >= 180.0 else dlon), dlat


def _windows(minx: float, miny: float, maxx: float, maxy: float) -> list[tuple[Any, float]]:
    """Boxes covering a lon/lat rectangle that may run past ±180°, each with the shift that brings it back."""
    from shapely.geometry import box

    miny, maxy = max(miny, -90.0), min(maxy, 90.0)
    if maxx - minx >= 360.0:
        return [(box(-180.0, miny, 180.0, maxy), 0.0)]
    out = [(box(max(minx, -180.0), miny, min(maxx, 180.0), maxy), 0.0)]
    if minx < -180.0:
        out.append((box(minx + 360.0, miny, 180.0, maxy), -360.0))
    if maxx > 180.0:
        out.append((box(-180.0, miny, maxx - 360.0, maxy), 360.0))
    return out


def _aeqd(site: Any) -> tuple[Any, Any]:
    """(forward, inverse) lon/lat ↔ metres functions of an azimuthal equidistant projection centred on a site.

    Built from an explicit PROJ pipeline (degrees in, lon/lat order, WGS84 ellipsoid): the same numbers as
    ``Transformer.from_crs("EPSG:4326", "+proj=aeqd ...", always_xy=True)`` at a hundredth of the set-up cost.
    """
    from pyproj import Transformer

    c = site if site.geom_type == "Point" else site.centroid
    tr = Transformer.from_pipeline(f"+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad "
                                   f"+step +proj=aeqd +lat_0={c.y:.9f} +lon_0={c.x:.9f} +ellps=WGS84")
    return _xy_func(tr), _xy_func(tr, inverse=True)


def _project(geom: Any, tr: Any, site_id: str) -> Any:
    import numpy as np
    import shapely

    out = shapely.transform(shapely.segmentize(geom, _SEGMENT_DEG), tr)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise ScreeningError(f"the geometry near site {site_id} cannot be projected for the metric test; "
                             f"check the site's geometry in the registry")
    return out


def _aoi_near(aoi: Any, site: Any, buffer_m: float) -> Any:
    """The AOI's part in a generous lon/lat window around the site (shifted across ±180°), or None."""
    import shapely

    sx0, sy0, sx1, sy1 = site.bounds
    pdlon, pdlat = _deg_pad(buffer_m, sy0, sy1)
    pieces = []
    for win, shift in _windows(sx0 - pdlon, sy0 - pdlat, sx1 + pdlon, sy1 + pdlat):
        part = shapely.intersection(aoi, win)
        if not part.is_empty:
            pieces.append(shapely.transform(part, lambda xy, s=shift: xy + (s, 0.0)) if shift else part)
    return shapely.union_all(pieces) if pieces else None


def _buffer_back(site: Any, site_m: Any, buffer_m: float, inv: Any) -> Any:
    """The site buffered by ``buffer_m`` metres in its local projection, back in EPSG:4326."""
    import numpy as np
    import shapely

    if buffer_m <= 0:
        return site
    # circumscribed polygon: its chords never cut inside the true buffer circle
    r = buffer_m / math.cos(math.pi / (4 * _QUAD_SEGS))
    out = shapely.transform(site_m.buffer(r, quad_segs=_QUAD_SEGS), inv)
    x0, _, x1, _ = out.bounds
    if x1 - x0 > 180.0:  # crosses the antimeridian: keep it continuous (longitudes beyond 180)
        out = shapely.transform(out, lambda xy: np.column_stack(
            [np.where(xy[:, 0] < 0, xy[:, 0] + 360.0, xy[:, 0]), xy[:, 1]]))
    return out if out.is_valid else shapely.make_valid(out)


def _check_aoi(aoi: Any) -> Any:
    import numpy as np
    import shapely
    from shapely.geometry import shape
    from shapely.geometry.base import BaseGeometry

    if isinstance(aoi, dict):
        try:
            aoi = shape(aoi)
        except Exception as exc:
            raise AOIError(f"the AOI to screen is not a GeoJSON geometry ({exc})") from None
    if not isinstance(aoi, BaseGeometry):
        raise AOIError(f"the AOI to screen must be a shapely geometry in EPSG:4326, not {type(aoi).__name__}")
    if aoi.is_empty:
        raise AOIError("the AOI to screen is empty: an empty AOI intersects nothing and would pass any "
                       "screen; "
                       "give a polygon")
    xy = shapely.get_coordinates(aoi)
    if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
        raise AOIError("the AOI to screen has coordinates outside lon [-180, 180] / lat [-90, 90] or not "
                       "finite; give it in EPSG:4326 as (lon, lat)")
    return aoi if aoi.is_valid else shapely.make_valid(aoi)


def _approval(approval: Approval | dict | None) -> Approval | None:
    if approval is None or isinstance(approval, Approval):
        return approval
    try:
        return Approval.model_validate(approval)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'approval'}: {e['msg']}"
                         for e in exc.errors())
        raise ConfigError(f"screening.approval is invalid ({msgs}); give approver (a name) and reason "
                          f"(a sentence)") from None


def _site_label(h: SiteHit) -> str:
    return (f"{h.name or h.site_id} ({h.category}, {h.site_id}): {h.distance_m:.0f} m from the AOI, "
            f"policy {h.action} within {h.buffer_m:.0f} m")


def _list_sites(hits: list[SiteHit], limit: int = 20) -> str:
    lines = [f"  - {_site_label(h)}" for h in hits[:limit]]
    if len(hits) > limit:
        lines.append(f"  ... and {len(hits) - limit} more")
    return "\n".join(lines)


def screen(aoi_geometry_4326: Any, registry: Registry, policy: Policy, *,
           approval: Approval | dict | None = None, aoi_sha256: str = "") -> Decision:
    """Screen an AOI (shapely geometry or GeoJSON geometry mapping, EPSG:4326 lon/lat) against the registry.

    A site hits when its metric distance to the AOI is at most its category's ``buffer_m``. The decision's
    action is the most severe action among the hits (``allow`` when none). ``deny`` is never allowed;
    ``require_approval`` is allowed only with an ``approval``, which is then recorded with a UTC timestamp.
    Never raises for a refusal (see :func:`enforce`). ``aoi_sha256`` defaults to the sha256 of the AOI's WKB.
    """
    import numpy as np
    import shapely

    gdf = registry.frame()
    if gdf is None or registry.n_sites == 0:
        raise ScreeningError("the registry holds no sites (load it with load_registry); the screen cannot "
                             "run")
    aoi = _check_aoi(aoi_geometry_4326)
    appr = _approval(approval)
    if not aoi_sha256:
        aoi_sha256 = _sha256_bytes(shapely.to_wkb(aoi, hex=False, output_dimension=2))

    # 1. prefilter: bounding box widened by the largest buffer any registry category can get
    max_buf = max(policy.rule(c).buffer_m for c in registry.categories)
    minx, miny, maxx, maxy = aoi.bounds
    dlon, dlat = _deg_pad(max_buf, miny, maxy)
    boxes = [b for b, _ in _windows(minx - dlon, miny - dlat, maxx + dlon, maxy + dlat)]
    idx = np.unique(gdf.sindex.query(np.asarray(boxes, dtype=object), predicate="intersects")[1])

    # 2. exact metric test on each candidate, in an azimuthal equidistant projection centred on the site
    hits: list[SiteHit] = []
    masked: list[tuple[str, Any]] = []
    sites: list[tuple[str, Any]] = []
    geoms = gdf.geometry.values
    shapely.prepare(aoi)
    touching = shapely.intersects(aoi, geoms[idx]) if len(idx) else np.zeros(0, dtype=bool)
    for i, touches in zip(idx, touching, strict=True):
        site = geoms[i]
        cat = gdf["category"].iat[i]
        rule = policy.rule(cat)
        fwd = inv = site_m = None
        if touches:
            dist = 0.0
        else:
            near = _aoi_near(aoi, site, rule.buffer_m)
            if near is None:
                continue
            fwd, inv = _aeqd(site)
            site_m = _project(site, fwd, gdf["site_id"].iat[i])
            near_m = _project(near, fwd, gdf["site_id"].iat[i])
            dist = 0.0 if site_m.intersects(near_m) else float(site_m.distance(near_m))
            if dist > rule.buffer_m + 1e-6:
                continue
        hit = SiteHit(site_id=str(gdf["site_id"].iat[i]), name=str(gdf["name"].iat[i]), category=cat,
                      action=rule.action, buffer_m=rule.buffer_m, distance_m=round(dist, 3))
        hits.append(hit)
        sites.append((hit.site_id, site))
        if rule.action == "mask":
            if site_m is None:
                fwd, inv = _aeqd(site)
                site_m = _project(site, fwd, hit.site_id)
            masked.append((hit.site_id, _buffer_back(site, site_m, rule.buffer_m, inv)))

    hits.sort(key=lambda h: (-_severity(h.action), h.distance_m, h.site_id))
    action = hits[0].action if hits else "allow"
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    approval_rec = None
    if action == "deny":
        allowed = False
    elif action == "require_approval":
        allowed = appr is not None
        if appr is not None:
            approval_rec = {"approver": appr.approver, "reason": appr.reason, "approved_at": now}
    else:
        allowed = True
    return Decision(
        action=action, allowed=allowed, hits=tuple(hits), approval=approval_rec,
        registry={"path": registry.path, "sha256": registry.sha256, "n_sites": registry.n_sites},
        policy={"path": policy.path, "sha256": policy.sha256, "version": policy.version},
        aoi_sha256=aoi_sha256, decided_at=now,
        reason=_reason(action, hits, registry.n_sites, approval_rec),
        masked=tuple(sorted(masked, key=lambda m: m[0])),
        sites=tuple(sorted(sites, key=lambda m: m[0])),
    )


def _reason(action: str, hits: list[SiteHit], n_sites: int, approval: dict | None) -> str:
    if not hits:
        return f"No site of the registry's {n_sites} lies within its policy buffer of the AOI."
    top = [h for h in hits if h.action == action]
    names = ", ".join(f"{h.name or h.site_id} ({h.category})" for h in top[:5])
    more = f" and {len(top) - 5} more" if len(top) > 5 else ""
    head = (f"{len(hits)} sensitive site(s) within their buffers; most severe action '{action}' from "
            f"{names}{more}")
    tail = {
        "deny": "the run is refused, and no approval can override a deny.",
        "require_approval": (f"approved by {approval['approver']}: {approval['reason']}." if approval
                             else "the run needs a named approval."),
        "mask": "their buffered areas become nodata in the outputs.",
        "record": "recorded only.",
    }[action]
    return f"{head}: {tail}"


def enforce(decision: Decision) -> None:
    """Raise :class:`RunRefused` (carrying the decision) unless ``decision.allowed``."""
    if decision.allowed:
        return
    top = [h for h in decision.hits if h.action == decision.action]
    if decision.action == "deny":
        msg = (f"run refused by the screening policy: the AOI comes within the deny buffer of "
               f"{len(top)} site(s):\n{_list_sites(top)}\n"
               f"A deny cannot be approved. Move or shrink the AOI to keep clear of these sites by their "
               f"buffers (the other hits are in screening.json).")
    elif decision.action == "require_approval":
        msg = (f"run needs approval: the AOI comes within the buffer of {len(top)} site(s) whose policy is "
               f"require_approval:\n{_list_sites(top)}\n"
               f"To approve, name the approver and the reason: add `screening.approval: {{approver: NAME, "
               f"reason: TEXT}}` to the run config, or pass `--approve-by NAME --approve-reason TEXT` on the "
               f"CLI. The approval is recorded in screening.json and the provenance.")
    else:
        msg = f"run refused by the screen: {decision.reason}"
    raise RunRefused(msg, decision)


def write_decision(decision: Decision, run_dir: Path) -> Path:
    """Write ``run_dir/screening.json`` atomically (temporary file, fsync, ``os.replace``); return it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from geo_dino.files import SCREENING, write_text_atomic

    out = run_dir / SCREENING
    text = json.dumps(decision.to_dict(), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(out, text + "\n", fsync=True)
    return out
