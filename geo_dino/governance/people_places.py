"""People and places: what a run's area of interest touches, for the run's deployment record.

:func:`people_and_places` answers by computation from bundled open layers what it can:

* the sensitive sites the screen hit (taken from the screening decision, :mod:`.screening`);
* urban areas (Natural Earth 1:50m), populated places (Natural Earth 1:50m) and international land borders
  (derived from Natural Earth 1:110m countries), from ``data/context/people_places.gpkg``, built by
  ``scripts/build_context_layers.py``;
* schools, health and religious sites and protected areas, from the sensitive-site registry
  ``data/registry/sensitive_sites.gpkg`` (the same file the screen uses);
* what the imagery's ground sample distance could resolve (people, vehicles);

and records, as declared by a named person, what no computation can answer: whether the imagery shows
faces, homes, workplaces or medical data. An undeclared answer is ``unknown`` and says ``not declared``.

Distances are metric and geodesic. The AOI and the candidate features (first found by a bounding-box read of
the GeoPackage's spatial index, widened generously by the search distance) are projected to an azimuthal
equidistant projection centred on the AOI's centroid (WGS84 ellipsoid); the nearest pair of points is found
there, and the distance reported is the geodesic distance (:class:`pyproj.Geod`, WGS84) between those two
points, taken back to lon/lat. A feature that intersects the AOI is at distance 0. Areas are geodesic
(:func:`geo_dino.inputs.aoi.geodesic_area_m2`). Features beyond ±180° of longitude from the AOI are read
through a second window and shifted by 360°, so an AOI next to the antimeridian sees both sides.

A missing, unreadable or tampered layer file (bytes that do not match its ``<file>.sha256``) raises
:class:`~geo_dino.errors.ScreeningError` naming the file: like the screen, this record fails closed rather
than reporting "nothing nearby" from a file it could not read.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geo_dino.errors import AOIError, ConfigError, ScreeningError

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_LAYERS = _REPO / "data" / "context" / "people_places.gpkg"
"""The bundled context layers (``urban_areas``, ``populated_places``, ``borders``)."""
DEFAULT_REGISTRY = _REPO / "data" / "registry" / "sensitive_sites.gpkg"
"""The bundled sensitive-site registry (layer ``sites``)."""

URBAN_LAYER = "urban_areas"
PLACES_LAYER = "populated_places"
BORDERS_LAYER = "borders"
REGISTRY_LAYER = "sites"

DECLARED_FIELDS: tuple[str, ...] = ("faces", "homes", "workplaces", "medical_data")
"""The questions only a person can answer about the imagery and the run."""
ANSWERS: tuple[str, ...] = ("yes", "no", "unknown")

PEOPLE_GSD_M = 1.0
VEHICLES_GSD_M = 5.0
RESOLUTION_RULE = (f"a person (about 0.5-1 m across) can be resolved at a ground sample distance of at most "
                   f"{PEOPLE_GSD_M:g} m, a vehicle (about 2 x 4.5 m) at most {VEHICLES_GSD_M:g} m: an object "
                   f"needs at least about one pixel")
BORDER_SEARCH_M = 250_000.0
"""How far the nearest border is looked for (at least ``border_distance_m``); beyond it, null."""
MAX_DISTANCE_M = 1_000_000.0

SCHOOLS_HEALTH_RELIGIOUS: tuple[str, ...] = ("education", "health", "religious")
PROTECTED = "protected_area"

DECIDED_SCREENING = "computed (screening)"
DECIDED_URBAN = "computed (Natural Earth 50m urban areas)"
DECIDED_PLACES = "computed (Natural Earth 50m populated places)"
DECIDED_BORDERS = "computed (borders shared by Natural Earth 110m countries)"
DECIDED_REGISTRY = "computed (sensitive-site registry)"
DECIDED_GSD = "computed (ground sample distance)"
NOT_DECLARED = "not declared"

_M_PER_DEG = 111_000.0  # metres per degree of latitude, rounded down; the window widens it further
_SEGMENT_DEG = 0.005  # densify lon/lat edges before projecting (about 550 m)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------------------ inputs


def _check_aoi(aoi: Any) -> Any:
    import numpy as np
    import shapely
    from shapely.geometry.base import BaseGeometry

    if not isinstance(aoi, BaseGeometry):
        raise AOIError(f"the AOI must be a shapely geometry in EPSG:4326 (lon, lat), not "
                       f"{type(aoi).__name__}")
    if aoi.is_empty:
        raise AOIError("the AOI is empty: an empty AOI touches nothing, so the record would say nothing is "
                       "near; give a polygon")
    xy = shapely.get_coordinates(aoi)
    if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
        raise AOIError("the AOI has coordinates outside lon [-180, 180] / lat [-90, 90] or not finite; "
                       "give it in EPSG:4326 as (lon, lat)")
    return aoi if aoi.is_valid else shapely.make_valid(aoi)


def _check_distance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_DISTANCE_M:
        raise ConfigError(f"{name} must be a number of metres in [0, {MAX_DISTANCE_M:g}], not {value!r}")
    return float(value)


def _check_gsd(gsd_m: Any) -> float | None:
    if gsd_m is None:
        return None
    if isinstance(gsd_m, bool) or not isinstance(gsd_m, (int, float)) or not math.isfinite(gsd_m) \
            or gsd_m <= 0:
        raise ConfigError(f"gsd_m must be a positive number of metres or None (unknown), not {gsd_m!r}")
    return float(gsd_m)


def _declared(declared: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    if declared is None:
        declared = {}
    if not isinstance(declared, Mapping):
        raise ConfigError(f"declared must be a mapping of {', '.join(DECLARED_FIELDS)} to "
                          f"{{answer, decided_by}}, not {type(declared).__name__}")
    unknown = sorted(str(k) for k in declared if k not in DECLARED_FIELDS)
    if unknown:
        raise ConfigError(f"declared.{unknown[0]}: unknown question; the declared questions are "
                          f"{', '.join(DECLARED_FIELDS)}")
    out: dict[str, dict[str, str]] = {}
    for name in DECLARED_FIELDS:
        entry = declared.get(name)
        if entry is None:
            out[name] = {"answer": "unknown", "decided_by": NOT_DECLARED}
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"declared.{name} must be a mapping {{answer: yes|no|unknown, decided_by: "
                              f"<who>}}, not {entry!r}")
        extra = sorted(str(k) for k in entry if k not in ("answer", "decided_by"))
        if extra:
            raise ConfigError(f"declared.{name}.{extra[0]}: unknown key (allowed: answer, decided_by)")
        answer = entry.get("answer")
        if not isinstance(answer, str) or answer.strip().lower() not in ANSWERS:
            raise ConfigError(f"declared.{name}.answer is {answer!r}; answer {', '.join(ANSWERS)}")
        who = entry.get("decided_by")
        if not isinstance(who, str) or not who.strip():
            raise ConfigError(f"declared.{name}.decided_by must name who decided (a non-empty string), not "
                              f"{who!r}")
        out[name] = {"answer": answer.strip().lower(), "decided_by": who.strip()}
    return out


def _sha256_file(path: Path, what: str) -> str:
    """The file's sha256, checked against a sibling ``<file>.sha256`` when there is one."""
    if not path.is_file():
        raise ScreeningError(f"{what} not found: {path}; the people-and-places record cannot be computed "
                             f"without it")
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ScreeningError(f"{what} {path} cannot be read ({exc}); fix its permissions") from None
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists():
        try:
            parts = sidecar.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            raise ScreeningError(f"checksum file {sidecar} cannot be read ({exc})") from None
        if not parts or not _HEX64.match(parts[0].lower()):
            raise ScreeningError(f"checksum file {sidecar} is malformed (expected '<64 hex>  {path.name}')")
        if parts[0].lower() != digest:
            raise ScreeningError(f"{what} {path} has sha256 {digest}, but {sidecar.name} says "
                                 f"{parts[0].lower()}: the file was changed or replaced. Restore it or "
                                 f"rebuild it")
    return digest


# ------------------------------------------------------------------------------------------------ geometry


def _windows(minx: float, miny: float, maxx: float, maxy: float) -> list[tuple[tuple[float, ...], float]]:
    """Bounding boxes covering a lon/lat rectangle that may run past ±180°, each with the longitude shift
    that brings the features read through it next to the AOI."""
    miny, maxy = max(miny, -90.0), min(maxy, 90.0)
    if maxx - minx >= 360.0:
        return [((-180.0, miny, 180.0, maxy), 0.0)]
    out: list[tuple[tuple[float, ...], float]] = [((max(minx, -180.0), miny, min(maxx, 180.0), maxy), 0.0)]
    if minx < -180.0:
        out.append(((minx + 360.0, miny, 180.0, maxy), -360.0))
    if maxx > 180.0:
        out.append(((-180.0, miny, maxx - 360.0, maxy), 360.0))
    return out


def _padded(aoi: Any, pad_m: float) -> tuple[float, float, float, float]:
    """The AOI's bounds widened by a generous ``pad_m`` metres (in degrees at its worst latitude)."""
    minx, miny, maxx, maxy = aoi.bounds
    dlat = pad_m / _M_PER_DEG * 1.25 + 1e-3
    lat_max = max(abs(miny - dlat), abs(maxy + dlat))
    if lat_max >= 89.0:
        dlon = 360.0
    else:
        dlon = min(360.0, pad_m / (_M_PER_DEG * math.cos(math.radians(lat_max))) * 1.25 + 1e-3)
    return minx - dlon, miny - dlat, maxx + dlon, maxy + dlat


def _read_near(path: Path, layer: str, aoi: Any, pad_m: float, columns: list[str],
               where: str | None = None) -> Any:
    """The features of ``layer`` whose bounding boxes fall within ``pad_m`` of the AOI's bounds, as a
    GeoDataFrame in lon/lat continuous with the AOI (shifted by 360° across the antimeridian)."""
    import warnings

    import geopandas as gpd
    import pandas as pd
    import pyogrio
    import shapely

    frames = []
    window = _padded(aoi, pad_m)
    for bbox, shift in _windows(*window):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                gdf = pyogrio.read_dataframe(path, layer=layer, bbox=bbox, columns=columns, where=where)
        except Exception as exc:  # pyogrio/GDAL errors: a missing layer or column, corrupt content
            raise ScreeningError(f"{path}: layer {layer!r} cannot be read ({type(exc).__name__}: {exc}); "
                                 f"rebuild the file") from None
        if gdf.crs is not None and gdf.crs.to_epsg() != 4326:
            raise ScreeningError(f"{path}: layer {layer!r} is in {gdf.crs}, not EPSG:4326")
        if shift and len(gdf):
            gdf = gdf.set_geometry(shapely.transform(gdf.geometry.values, lambda xy, s=shift: xy + (s, 0.0)))
        frames.append(gdf)
    gdf = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    gdf = gpd.GeoDataFrame(gdf, geometry="geometry", crs="EPSG:4326")
    geoms = gdf.geometry.values
    keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    gdf = gdf[keep].reset_index(drop=True)
    if len(gdf):
        geoms = gdf.geometry.values
        bad = ~shapely.is_valid(geoms)
        if bad.any():
            gdf = gdf.set_geometry(shapely.make_valid(geoms))
    return gdf


class _Metric:
    """Geodesic distances from the AOI: nearest points in an azimuthal equidistant projection centred on the
    AOI, distance measured along the ellipsoid between them."""

    def __init__(self, aoi: Any) -> None:
        import shapely
        from pyproj import Geod, Transformer

        c = aoi.centroid
        tr = Transformer.from_pipeline(f"+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad "
                                       f"+step +proj=aeqd +lat_0={c.y:.9f} +lon_0={c.x:.9f} +ellps=WGS84")
        self._tr = tr
        self._geod = Geod(ellps="WGS84")
        self.aoi = aoi
        shapely.prepare(aoi)
        self.aoi_m = self.project(aoi)

    def project(self, geom: Any) -> Any:
        """``geom`` (lon/lat) densified and projected to metres around the AOI."""
        import numpy as np
        import shapely

        def fwd(xy: Any) -> Any:
            x, y = self._tr.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        return shapely.transform(shapely.segmentize(geom, _SEGMENT_DEG), fwd)

    def distance_m(self, geom: Any, clip: tuple[float, float, float, float] | None = None) -> float:
        """Geodesic distance (m) from the AOI to ``geom`` (lon/lat, continuous with the AOI); 0 if they meet.

        ``clip`` (a lon/lat box) cuts a long line or large polygon down to the part that matters first.
        """
        import numpy as np
        import shapely

        if self.aoi.intersects(geom):
            return 0.0
        part = shapely.clip_by_rect(geom, *clip) if clip is not None else geom
        if part.is_empty:
            return math.inf
        a, b = shapely.shortest_line(self.aoi_m, self.project(part)).coords
        (lon1, lon2), (lat1, lat2) = self._tr.transform([a[0], b[0]], [a[1], b[1]], direction="INVERSE")
        d = float(self._geod.inv(lon1, lat1, lon2, lat2)[2])
        return d if np.isfinite(d) else math.inf


def _name(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


# ------------------------------------------------------------------------------------------------ answers


def _sensitive_sites(screening: Mapping[str, Any] | None) -> dict[str, Any]:
    if screening is None:
        return {"sites": None, "count": None, "action": None, "reason": None, "decided_by": "not screened"}
    if not isinstance(screening, Mapping) or not isinstance(screening.get("hits"), list):
        raise ScreeningError("the screening decision has no 'hits' list; pass Decision.to_dict() of "
                             "geo_dino.governance.screening.screen")
    sites: list[dict[str, Any]] = []
    for i, hit in enumerate(screening["hits"]):
        missing = [k for k in ("name", "category", "action", "distance_m") if not isinstance(hit, Mapping)
                   or k not in hit]
        if missing:
            raise ScreeningError(f"the screening decision's hits[{i}] has no {missing[0]!r}; pass "
                                 f"Decision.to_dict()")
        sites.append({"site_id": _name(hit.get("site_id")), "name": _name(hit["name"]),
                      "category": str(hit["category"]), "action": str(hit["action"]),
                      "distance_m": round(float(hit["distance_m"]), 1)})
    return {"sites": sites, "count": len(sites), "action": screening.get("action"),
            "reason": screening.get("reason"), "decided_by": DECIDED_SCREENING}


def _urban(metric: _Metric, layers: Path, near_m: float) -> dict[str, Any]:
    import shapely

    from geo_dino.inputs.aoi import geodesic_area_m2

    gdf = _read_near(layers, URBAN_LAYER, metric.aoi, near_m, ["area_sqkm"])
    geoms = gdf.geometry.values
    touching = [g for g in geoms if metric.aoi.intersects(g)]
    within = sum(1 for g in geoms if metric.distance_m(g) <= near_m)
    area = 0.0
    if touching:
        area = geodesic_area_m2(shapely.intersection(metric.aoi, shapely.union_all(touching)))
    aoi_area = geodesic_area_m2(metric.aoi)
    return {"overlaps": area > 0.0, "area_m2": round(area, 1),
            "fraction_of_aoi": round(area / aoi_area, 6) if aoi_area > 0 else 0.0,
            "n_overlapping": len(touching), "within_m": near_m, "n_within": within,
            "decided_by": DECIDED_URBAN}


#: a populated place at least this big inside the AOI makes it urban, whatever the urban-area polygons say
#: (Natural Earth's 1:50m urban areas leave out many island and smaller cities, Nassau among them)
CITY_POPULATION = 50_000


def _urban_or_city(urban: dict[str, Any], places: dict[str, Any]) -> dict[str, Any]:
    """The urban answer: an urban-area polygon overlaps the AOI, or a city of ``CITY_POPULATION`` or more
    lies inside it."""
    cities = [p for p in places["places"]
              if p["distance_m"] == 0.0 and (p["population"] or 0) >= CITY_POPULATION]
    return urban | {"cities_inside": [{"name": p["name"], "population": p["population"]} for p in cities],
                    "city_population": CITY_POPULATION, "urban": bool(urban["overlaps"] or cities),
                    "decided_by": f"{urban['decided_by']}; and Natural Earth 50m populated places of "
                                  f"{CITY_POPULATION:,} or more inside the AOI"}


def _places(metric: _Metric, layers: Path, near_m: float) -> dict[str, Any]:
    gdf = _read_near(layers, PLACES_LAYER, metric.aoi, near_m, ["name", "country", "pop_max"])
    found: list[dict[str, Any]] = []
    for name, country, pop, geom in zip(gdf["name"], gdf["country"], gdf["pop_max"], gdf.geometry,
                                        strict=True):
        d = metric.distance_m(geom)
        if d <= near_m:
            population = None if pop is None or (isinstance(pop, float) and math.isnan(pop)) or pop < 0 \
                else int(pop)
            found.append({"name": _name(name), "country": _name(country), "population": population,
                          "distance_m": round(d, 1)})
    found.sort(key=lambda p: (p["distance_m"], -(p["population"] or 0), p["name"]))
    return {"places": found, "count": len(found), "within_m": near_m, "decided_by": DECIDED_PLACES}


def _borders(metric: _Metric, layers: Path, border_distance_m: float) -> dict[str, Any]:
    search = max(BORDER_SEARCH_M, border_distance_m)
    gdf = _read_near(layers, BORDERS_LAYER, metric.aoi, search, ["country_a", "country_b"])
    clip = _padded(metric.aoi, search)
    near: list[dict[str, Any]] = []
    crosses = False
    nearest: float | None = None
    for a, b, geom in zip(gdf["country_a"], gdf["country_b"], gdf.geometry, strict=True):
        d = metric.distance_m(geom, clip=clip)
        if d == 0.0:
            crosses = True
        if d > search:
            continue
        nearest = d if nearest is None else min(nearest, d)
        if d <= border_distance_m:
            near.append({"countries": [_name(a), _name(b)], "distance_m": round(d, 1)})
    near.sort(key=lambda r: (r["distance_m"], r["countries"]))
    return {"within_m": border_distance_m, "search_m": search,
            "nearest_border_m": None if nearest is None else round(nearest, 1),
            "within": nearest is not None and nearest <= border_distance_m, "crosses": crosses,
            "borders": near, "decided_by": DECIDED_BORDERS}


def _registry_sites(metric: _Metric, registry: Path, near_m: float) -> tuple[dict[str, Any], dict[str, Any]]:
    cats = (*SCHOOLS_HEALTH_RELIGIOUS, PROTECTED)
    where = "category IN (" + ", ".join(f"'{c}'" for c in cats) + ")"
    gdf = _read_near(registry, REGISTRY_LAYER, metric.aoi, near_m, ["site_id", "name", "category"],
                     where=where)
    shr: list[dict[str, Any]] = []
    protected: list[dict[str, Any]] = []
    for sid, name, cat, geom in zip(gdf["site_id"], gdf["name"], gdf["category"], gdf.geometry, strict=True):
        d = metric.distance_m(geom)
        if d > near_m:
            continue
        rec = {"site_id": _name(sid), "name": _name(name), "category": str(cat), "distance_m": round(d, 1)}
        (protected if cat == PROTECTED else shr).append(rec)
    for lst in (shr, protected):
        lst.sort(key=lambda r: (r["distance_m"], r["category"], r["site_id"]))
    counts = {c: sum(1 for r in shr if r["category"] == c) for c in SCHOOLS_HEALTH_RELIGIOUS}
    return ({"sites": shr, "counts": counts, "count": len(shr), "within_m": near_m,
             "decided_by": DECIDED_REGISTRY},
            {"sites": protected, "count": len(protected),
             "overlaps": any(r["distance_m"] == 0.0 for r in protected), "within_m": near_m,
             "decided_by": DECIDED_REGISTRY})


def _resolution(gsd_m: float | None) -> dict[str, Any]:
    def yes_no(limit: float) -> str:
        if gsd_m is None:
            return "unknown"
        return "yes" if gsd_m <= limit else "no"

    return {"gsd_m": gsd_m, "could_resolve_people": yes_no(PEOPLE_GSD_M),
            "could_resolve_vehicles": yes_no(VEHICLES_GSD_M), "rule": RESOLUTION_RULE,
            "decided_by": DECIDED_GSD if gsd_m is not None else "gsd not given"}


def people_and_places(aoi_4326: Any, *, gsd_m: float | None, screening: Mapping[str, Any] | None,
                      declared: Mapping[str, Any] | None = None, layers: Path = DEFAULT_LAYERS,
                      registry: Path = DEFAULT_REGISTRY, border_distance_m: float = 25_000,
                      near_m: float = 5_000) -> dict[str, Any]:
    """What the AOI touches (people and places), as a JSON-serialisable dict for the deployment record.

    ``aoi_4326`` is a shapely (multi)polygon in lon/lat. ``gsd_m`` is the imagery's ground sample distance in
    metres (None: unknown). ``screening`` is the screen's decision as ``Decision.to_dict()`` (None: not
    screened). ``declared`` maps any of ``faces``, ``homes``, ``workplaces``, ``medical_data`` to
    ``{"answer": "yes"|"no"|"unknown", "decided_by": "<who>"}``. ``layers`` is the context GeoPackage,
    ``registry`` the sensitive-site registry; ``near_m`` is how near a place or site must be to count,
    ``border_distance_m`` how near an international border.

    Keys: ``sensitive_sites_hit``, ``urban_areas``, ``populated_places``, ``schools_health_religious``,
    ``international_borders``, ``protected_areas``, ``resolution``, ``declared``, ``aoi`` (geodesic area
    and bounds), ``method`` (how distances were measured) and ``sources`` (files and their sha256). Every
    answer carries a ``decided_by``: ``computed (...)`` or the person who declared it.

    Raises :class:`~geo_dino.errors.ConfigError` for a declared answer outside yes/no/unknown (naming the
    field), a declared answer without its ``decided_by``, an unknown question, a bad ``gsd_m`` or distance;
    :class:`~geo_dino.errors.AOIError` for an empty or out-of-range AOI; and
    :class:`~geo_dino.errors.ScreeningError` naming the file when a layer file is missing, unreadable or
    does not match its ``.sha256``, or when ``screening`` is not a decision dict.
    """
    from geo_dino.inputs.aoi import geodesic_area_m2

    declared_out = _declared(declared)
    gsd = _check_gsd(gsd_m)
    near = _check_distance("near_m", near_m)
    border = _check_distance("border_distance_m", border_distance_m)
    aoi = _check_aoi(aoi_4326)
    sites_hit = _sensitive_sites(screening)
    layers, registry = Path(layers), Path(registry)
    layers_sha = _sha256_file(layers, "people-and-places layers")
    registry_sha = _sha256_file(registry, "sensitive-site registry")

    metric = _Metric(aoi)
    shr, protected = _registry_sites(metric, registry, near)
    places = _places(metric, layers, near)
    minx, miny, maxx, maxy = aoi.bounds
    return {
        "sensitive_sites_hit": sites_hit,
        "urban_areas": _urban_or_city(_urban(metric, layers, near), places),
        "populated_places": places,
        "schools_health_religious": shr,
        "international_borders": _borders(metric, layers, border),
        "protected_areas": protected,
        "resolution": _resolution(gsd),
        "declared": declared_out,
        "aoi": {"area_m2": round(geodesic_area_m2(aoi), 1),
                "bounds": [round(minx, 7), round(miny, 7), round(maxx, 7), round(maxy, 7)]},
        "method": ("geodesic (WGS84): nearest points found in an azimuthal equidistant projection centred on "
                   "the AOI, distance measured along the ellipsoid between them; 0 when touching; geodesic "
                   "areas"),
        "sources": {"layers": {"path": str(layers), "sha256": layers_sha},
                    "registry": {"path": str(registry), "sha256": registry_sha}},
    }
