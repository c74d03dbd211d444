"""Areas of interest: RFC 7946 GeoJSON in, one valid lon/lat (multi)polygon out.

An AOI decides what is read and what the sensitive-site screen looks at, so every input is treated as
hostile (see ``USER-NEEDS.md``, *Hostile input*). :func:`load_aoi` refuses, with an
:class:`~geo_dino.errors.AOIError` that says what is wrong and what to do:

* a missing file, one larger than ``AOIOptions.max_bytes`` (checked before reading), non-UTF-8 text, invalid
  JSON, ``NaN``/``Infinity`` literals, nesting deeper than ``AOIOptions.max_depth``;
* anything but ``Polygon``, ``MultiPolygon``, ``Feature`` of those, or a non-empty ``FeatureCollection`` of
  those;
* a ``crs`` member (RFC 7946 removed it: coordinates are always WGS84 lon/lat);
* positions that are not 2 or 3 finite numbers, longitudes outside [-180, 180], latitudes outside [-90, 90]
  (with a hint when the values look projected or the axes look swapped);
* rings with fewer than 4 positions or not closed (never auto-closed), more than ``AOIOptions.max_vertices``
  positions in all;
* invalid polygons (self-intersections ...) unless ``AOIOptions.repair`` is set, in which case
  :func:`shapely.make_valid` repairs them and the relative area change is recorded;
* empty results or results of zero area (an empty AOI intersects nothing, so a screen would pass silently).

Rings that cross the antimeridian without being split (a jump of more than 180° between consecutive
longitudes) are unwrapped and split at ±180° into a ``MultiPolygon`` whose parts lie within [-180, 180].
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import shapely
from shapely.affinity import translate
from shapely.geometry import MultiPolygon, Polygon, box, mapping
from shapely.geometry.base import BaseGeometry

from geo_dino.config import AOIOptions
from geo_dino.errors import AOIError

__all__ = ["AOI", "geodesic_area_m2", "load_aoi", "validate_geojson"]

PolygonalGeometry: TypeAlias = Polygon | MultiPolygon

_POLYGONAL = ("Polygon", "MultiPolygon")
_GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                   "GeometryCollection")
_ACCEPTED = ("Polygon, MultiPolygon, a Feature with a Polygon/MultiPolygon geometry, or a FeatureCollection "
             "of those")
# edge length (degrees) before reprojection, so long edges follow the projection's curvature
_DENSIFY_DEG = 0.01


@dataclass(frozen=True)
class AOI:
    """A validated area of interest in EPSG:4326 (lon/lat order).

    ``n_vertices`` counts the positions of the submitted GeoJSON (closing positions included), i.e. the number
    checked against ``AOIOptions.max_vertices``. ``area_change`` is ``abs(new - old) / old`` over the
    polygons that were repaired (planar, in degrees²); ``math.inf`` when the repaired input enclosed no net
    area (e.g. a symmetric bow-tie whose lobes cancel), ``None`` when nothing was repaired.
    """

    geometry: PolygonalGeometry
    sha256: str
    source: str
    n_vertices: int
    repaired: bool
    area_change: float | None
    crs: str = "EPSG:4326"

    def to_crs(self, crs: str) -> BaseGeometry:
        """The AOI reprojected to ``crs`` (anything :meth:`pyproj.CRS.from_user_input` accepts).

        Edges are densified to ~0.01° first so they stay correctly curved after projection. Raises
        :class:`AOIError` when the result is empty or not finite (e.g. outside the CRS's area of use).
        """
        transformer = _transformer(str(crs))
        dense = shapely.segmentize(self.geometry, _DENSIFY_DEG)

        def fwd(xy: np.ndarray) -> np.ndarray:
            x, y = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
            return np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])

        try:
            out = shapely.transform(dense, fwd)
        except Exception as exc:  # pyproj raises ProjError subclasses, shapely GEOSException
            raise AOIError(f"could not reproject the AOI ({self.source}) to {crs}: {exc}; choose a CRS whose "
                           f"area of use covers the AOI") from None
        coords = shapely.get_coordinates(out)
        if out.is_empty or coords.size == 0 or not np.isfinite(coords).all():
            raise AOIError(f"the AOI ({self.source}, bounds {self.bounds()}) does not project to finite "
                           f"coordinates in {crs}; it is probably outside that CRS's area of use — pick a "
                           f"CRS (e.g. the raster's UTM zone) that covers the AOI")
        if not out.is_valid:  # projection can fold a ring near the edge of the area of use
            out = _polygonal(shapely.make_valid(out))
        if out.is_empty or out.area <= 0:
            raise AOIError(f"the AOI ({self.source}) becomes empty when reprojected to {crs}; pick a CRS "
                           f"whose area of use covers the AOI")
        return out

    def bounds(self) -> tuple[float, float, float, float]:
        """``(min_lon, min_lat, max_lon, max_lat)``; a split antimeridian AOI spans -180..180."""
        min_lon, min_lat, max_lon, max_lat = (float(v) for v in self.geometry.bounds)
        return min_lon, min_lat, max_lon, max_lat

    def area_m2(self) -> float:
        """Geodesic area on the WGS84 ellipsoid, in square metres."""
        return geodesic_area_m2(self.geometry)

    def to_record(self) -> dict[str, Any]:
        """A small JSON-able summary for provenance."""
        change: float | str | None = self.area_change
        if self.area_change is not None and not math.isfinite(self.area_change):
            change = "inf"
        return {
            "sha256": self.sha256,
            "source": self.source,
            "crs": self.crs,
            "n_vertices": self.n_vertices,
            "bounds": list(self.bounds()),
            "area_m2": self.area_m2(),
            "repaired": self.repaired,
            "area_change": change,
            "geometry": json.loads(json.dumps(mapping(self.geometry))),
        }


def geodesic_area_m2(geom: BaseGeometry) -> float:
    """Geodesic area (m²) of a lon/lat polygonal geometry on the WGS84 ellipsoid, orientation-independent.

    GeoJSON edges are straight lines in lon/lat (RFC 7946 §3.1.1), not geodesics, so edges are densified to
    ~0.01° first; otherwise a long east-west edge would be measured along the great circle.
    """
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    total = 0.0
    dense = shapely.segmentize(geom, _DENSIFY_DEG)
    for poly in getattr(dense, "geoms", [dense]):
        if poly.is_empty or not isinstance(poly, Polygon):
            continue
        area = abs(geod.polygon_area_perimeter(*poly.exterior.xy)[0])
        for hole in poly.interiors:
            area -= abs(geod.polygon_area_perimeter(*hole.xy)[0])
        total += area
    return total


_local = threading.local()  # pyproj Transformers must not be shared between threads


def _transformer(crs: str):  # noqa: ANN202 - pyproj imported lazily
    """A cached EPSG:4326 → ``crs`` transformer (lon/lat in, x/y out), one per thread."""
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    cache: dict[str, Any] = _local.__dict__.setdefault("transformers", {})
    if crs not in cache:
        try:
            target = CRS.from_user_input(crs)
        except CRSError as exc:
            raise AOIError(f"unknown CRS {crs!r}: {exc}; give an EPSG code such as 'EPSG:32618'") from None
        cache[crs] = Transformer.from_crs("EPSG:4326", target, always_xy=True)
    return cache[crs]


# ----------------------------------------------------------------------------------------------- loading


def load_aoi(src: str | Path | dict, options: AOIOptions | None = None) -> AOI:
    """Read and validate an AOI from a GeoJSON file path or an already-parsed GeoJSON mapping."""
    options = options or AOIOptions()
    if isinstance(src, dict):
        _check_depth(src, options.max_depth, "<object>")
        geometry, info = validate_geojson(src, options)
        try:
            canonical = json.dumps(src, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise AOIError(f"the AOI mapping is not JSON-serialisable ({exc}); pass plain dicts, lists, str "
                           f"and numbers") from None
        return _make_aoi(geometry, info, hashlib.sha256(canonical).hexdigest(), "<object>")
    if not isinstance(src, (str, Path)):
        raise AOIError(f"an AOI must be a GeoJSON file path or a mapping, not {type(src).__name__}")
    if Path(src).suffix.lower() in VECTOR_DRIVERS:
        return _load_vector_aoi(Path(src), options)
    data = _read_bounded(Path(src), options.max_bytes)
    obj = _parse_json(data, str(src), options.max_depth)
    geometry, info = validate_geojson(obj, options)
    return _make_aoi(geometry, info, hashlib.sha256(data).hexdigest(), str(src))


#: AOI files other than GeoJSON: extension → the only GDAL driver accepted for it
VECTOR_DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile"}


def _load_vector_aoi(path: Path, options: AOIOptions) -> AOI:
    """An AOI from a GeoPackage or a Shapefile: its polygons in its single layer (or the layer named
    ``aoi``), reprojected to EPSG:4326 and merged, then validated as GeoJSON is; the source records the
    layer and the CRS it was reprojected from."""
    import pyogrio
    from shapely import union_all

    _read_bounded(path, options.max_bytes)  # exists, a file, within the size limit
    want = VECTOR_DRIVERS[path.suffix.lower()]
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
        layer = "aoi" if "aoi" in layers else (layers[0] if len(layers) == 1 else None)
        if layer is None:
            raise AOIError(f"AOI file {path} has {len(layers)} layers ({', '.join(layers)}); keep one, or "
                           "name the AOI's layer 'aoi'")
        info = pyogrio.read_info(path, layer=layer)
        if info["driver"] != want:
            raise AOIError(f"AOI file {path} is read by GDAL as {info['driver']}, not {want}: its content "
                           "does not match its extension")
        gdf = pyogrio.read_dataframe(path, layer=layer)
    except AOIError:
        raise
    except Exception as exc:  # pyogrio's errors: a corrupt or unreadable file
        raise AOIError(f"AOI file {path} cannot be read as {want}: {exc}") from None
    if gdf.crs is None:
        raise AOIError(f"AOI file {path} (layer {layer}) has no CRS; define it (e.g. ogr2ogr -a_srs "
                       "EPSG:XXXX) so it can be reprojected to EPSG:4326")
    if len(gdf) == 0 or not gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        raise AOIError(f"AOI file {path} (layer {layer}) must hold polygons only, and at least one")
    from_crs = gdf.crs.to_string()
    merged = union_all(gdf.to_crs("EPSG:4326").geometry.values)
    from shapely.geometry import mapping

    obj = {"type": "Feature", "properties": {}, "geometry": json.loads(json.dumps(mapping(merged)))}
    geometry, checked = validate_geojson(obj, options)
    how = f"layer {layer}, {len(gdf)} feature(s) reprojected from {from_crs} to EPSG:4326"
    return _make_aoi(geometry, checked, hashlib.sha256(path.read_bytes()).hexdigest(), f"{path} ({how})")


def _make_aoi(geometry: PolygonalGeometry, info: dict[str, Any], sha: str, source: str) -> AOI:
    return AOI(geometry=geometry, sha256=sha, source=source, n_vertices=info["n_vertices"],
               repaired=info["repaired"], area_change=info["area_change"])


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    if not path.exists():
        raise AOIError(f"AOI file not found: {path}; check the path (relative paths are relative to the "
                       f"working directory or the config file)")
    if not path.is_file():
        raise AOIError(f"AOI path is not a regular file: {path}; give a .geojson file")
    size = path.stat().st_size
    if size > max_bytes:
        raise AOIError(f"AOI file {path} is {size} bytes, over the limit of {max_bytes} "
                       f"(aoi_options.max_bytes); simplify the polygon or raise the limit")
    with path.open("rb") as fh:
        data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    if len(data) > max_bytes:
        raise AOIError(f"AOI file {path} is over the limit of {max_bytes} bytes (aoi_options.max_bytes); "
                       f"simplify the polygon or raise the limit")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (RFC 8259 has no NaN/Infinity); every coordinate must be a "
                     f"finite number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats: parsers keep the last one silently (a second
    "coordinates" would replace the polygon that was screened by eye)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object; JSON parsers keep only the last, "
                             "so the file does not say which is meant — remove one")
        out[k] = v
    return out


def _parse_json(data: bytes, source: str, max_depth: int) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AOIError(f"AOI file {source} is not UTF-8 text ({exc.reason} at byte {exc.start}); GeoJSON "
                       f"must be UTF-8 (RFC 7946 §1) — re-save it as UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise AOIError(f"AOI file {source} is nested too deeply to parse; GeoJSON polygons need at most "
                       f"a handful of levels") from None
    except json.JSONDecodeError as exc:
        raise AOIError(f"AOI file {source} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                       f"{exc.colno}; fix the file (a JSON linter will point at the same place)") from None
    except ValueError as exc:
        raise AOIError(f"AOI file {source}: {exc}") from None
    _check_depth(obj, max_depth, source)
    return obj


def _check_depth(obj: Any, max_depth: int, source: str) -> None:
    """Iteratively refuse containers nested deeper than ``max_depth`` (a top-level object is depth 1)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > max_depth:
            raise AOIError(f"AOI {source} is nested deeper than {max_depth} levels (aoi_options.max_depth); "
                           f"a GeoJSON FeatureCollection of MultiPolygons needs 8 — remove the extra nesting")
        stack.extend((child, depth + 1) for child in children)


# -------------------------------------------------------------------------------------------- validation


class _Budget:
    """Counts positions against ``max_vertices`` while they are read, so a huge input fails early."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        if self.count > self.limit:
            raise AOIError(f"the AOI has more than {self.limit} vertices (aoi_options.max_vertices); "
                           f"simplify it (e.g. shapely simplify or ogr2ogr -simplify) or raise the limit")


class _Repairs:
    """Accumulates the planar area before/after each repair."""

    def __init__(self) -> None:
        self.repaired = False
        self.old = 0.0
        self.new = 0.0

    def change(self) -> float | None:
        if not self.repaired:
            return None
        if self.old <= 0:
            return math.inf if self.new > 0 else 0.0
        return abs(self.new - self.old) / self.old


def validate_geojson(obj: dict,
                     options: AOIOptions | None = None) -> tuple[PolygonalGeometry, dict[str, Any]]:
    """Validate a parsed GeoJSON object; return the AOI geometry (EPSG:4326) and a summary ``info`` dict.

    ``info`` holds ``type`` (the GeoJSON type), ``n_vertices``, ``n_polygons`` (input polygons),
    ``antimeridian`` (whether an unsplit crossing was split), ``repaired`` and ``area_change``.
    """
    options = options or AOIOptions()
    _check_depth(obj, options.max_depth, "<object>")
    if not isinstance(obj, dict):
        raise AOIError(f"an AOI must be a GeoJSON object ({_ACCEPTED}), not a JSON {type(obj).__name__}")
    budget = _Budget(options.max_vertices)
    repairs = _Repairs()
    state = {"n_polygons": 0, "antimeridian": False}
    kind = obj.get("type")
    _no_crs(obj, "the GeoJSON object")

    if kind == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise AOIError("a FeatureCollection needs a 'features' list; add the AOI polygon as a Feature")
        if not features:
            raise AOIError("the FeatureCollection has no features: an empty AOI intersects nothing, so the "
                           "screen would pass silently — add at least one Polygon/MultiPolygon feature")
        parts = [_feature(f, f"feature {i + 1}", options, budget, repairs, state)
                 for i, f in enumerate(features)]
        geometry = shapely.union_all(parts) if len(parts) > 1 else parts[0]
        geometry = _polygonal(geometry)
    elif kind == "Feature":
        geometry = _feature(obj, "the Feature", options, budget, repairs, state)
    elif kind in _POLYGONAL:
        geometry = _geometry(obj, "the geometry", options, budget, repairs, state)
    else:
        _refuse_type(kind, "the GeoJSON object")

    if geometry.is_empty or geometry.area <= 0:
        raise AOIError("the AOI is empty or has zero area: it would intersect nothing, so the screen would "
                       "pass silently — give a polygon that encloses an area")
    geometry = shapely.orient_polygons(geometry)  # RFC 7946 right-hand rule: exteriors counter-clockwise
    info = {
        "type": kind,
        "n_vertices": budget.count,
        "n_polygons": state["n_polygons"],
        "antimeridian": state["antimeridian"],
        "repaired": repairs.repaired,
        "area_change": repairs.change(),
    }
    return geometry, info


def _refuse_type(kind: Any, where: str) -> None:
    if kind in _GEOMETRY_TYPES:
        raise AOIError(f"{where} is a {kind}: only polygonal AOIs are accepted ({_ACCEPTED}); draw the area "
                       f"as a polygon")
    raise AOIError(f"{where} has type {kind!r}, which is not GeoJSON this pipeline accepts; only polygonal "
                   f"AOIs are accepted ({_ACCEPTED})")


#: ``crs`` names that say what RFC 7946 coordinates are anyway: WGS84 longitude/latitude (QGIS and GDAL
#: write the first when they save EPSG:4326 data as GeoJSON)
CRS84_NAMES = {"urn:ogc:def:crs:ogc:1.3:crs84", "urn:ogc:def:crs:ogc::crs84", "crs84", "ogc:crs84",
               "http://www.opengis.net/def/crs/ogc/1.3/crs84"}


def _no_crs(obj: dict, where: str) -> None:
    if "crs" not in obj:
        return
    crs = obj["crs"]
    name = (crs.get("properties") or {}).get("name") if isinstance(crs, dict) else None
    if isinstance(name, str) and crs.get("type") == "name" and name.strip().lower() in CRS84_NAMES:
        return  # OGC CRS84 is RFC 7946's own CRS: longitude, latitude on WGS84
    raise AOIError(f"{where} has a 'crs' member naming {name or crs!r}; GeoJSON (RFC 7946) coordinates must "
                   f"be WGS84 longitude/latitude. Write the file again in that form, e.g. ogr2ogr -f GeoJSON "
                   f"-t_srs EPSG:4326 -lco RFC7946=YES out.geojson in.geojson (it drops the 'crs' member)")


def _feature(feat: Any, where: str, options: AOIOptions, budget: _Budget, repairs: _Repairs,
             state: dict[str, Any]) -> PolygonalGeometry:
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        got = feat.get("type") if isinstance(feat, dict) else type(feat).__name__
        raise AOIError(f"{where} is not a GeoJSON Feature (got {got!r}); a FeatureCollection holds Features "
                       f"whose geometry is a Polygon or MultiPolygon")
    _no_crs(feat, where)
    if "geometry" not in feat:
        raise AOIError(f"{where} has no 'geometry' member; give it a Polygon or MultiPolygon geometry")
    geom = feat["geometry"]
    if geom is None:
        raise AOIError(f"{where} has a null geometry: an empty AOI intersects nothing, so the screen would "
                       f"pass silently — give it a Polygon or MultiPolygon geometry")
    if not isinstance(geom, dict):
        raise AOIError(f"{where} geometry must be a GeoJSON geometry object, not {type(geom).__name__}")
    _no_crs(geom, f"{where} geometry")
    if geom.get("type") not in _POLYGONAL:
        _refuse_type(geom.get("type"), f"{where} geometry")
    return _geometry(geom, f"{where} geometry", options, budget, repairs, state)


def _geometry(geom: dict, where: str, options: AOIOptions, budget: _Budget, repairs: _Repairs,
              state: dict[str, Any]) -> PolygonalGeometry:
    _no_crs(geom, where)
    kind = geom["type"]
    if "coordinates" not in geom:
        raise AOIError(f"{where} ({kind}) has no 'coordinates' member")
    coords = geom["coordinates"]
    if not isinstance(coords, list):
        raise AOIError(f"{where} ({kind}) coordinates must be a list, not {type(coords).__name__}")
    if not coords:
        raise AOIError(f"{where} ({kind}) has empty coordinates: an empty AOI intersects nothing, so the "
                       f"screen would pass silently — give at least one ring of 4+ positions")
    polygons = [coords] if kind == "Polygon" else coords
    parts: list[Polygon] = []
    for m, rings in enumerate(polygons, start=1):
        label = f"polygon {m} of {where}"
        state["n_polygons"] += 1
        parts.extend(_polygon(rings, label, options, budget, repairs, state))
    if not parts:
        raise AOIError(f"{where} ({kind}) is empty after validation; give a polygon that encloses an area")
    combined = MultiPolygon(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        combined = _valid_or_repair(combined, where, options, repairs)
    return combined


def _polygon(rings: Any, label: str, options: AOIOptions, budget: _Budget, repairs: _Repairs,
             state: dict[str, Any]) -> list[Polygon]:
    if not isinstance(rings, list):
        raise AOIError(f"{label} must be a list of rings, not {type(rings).__name__}")
    if not rings:
        raise AOIError(f"{label} has no rings: an empty polygon intersects nothing — give an exterior ring "
                       f"of 4+ positions")
    parsed = [_ring(ring, n, label, budget) for n, ring in enumerate(rings, start=1)]
    crosses = any(_crosses_antimeridian(r) for r in parsed)
    if crosses:
        state["antimeridian"] = True
        parsed = [[(x + 360.0 if x < 0 else x, y) for x, y in r] for r in parsed]
    poly = Polygon(parsed[0], parsed[1:])
    geom = _valid_or_repair(poly, label, options, repairs)
    if crosses:
        geom = _split_antimeridian(geom)
    return _polygon_parts(geom)


def _ring(ring: Any, n: int, label: str, budget: _Budget) -> list[tuple[float, float]]:
    where = f"ring {n} of {label}"
    if not isinstance(ring, list):
        raise AOIError(f"{where} must be a list of positions, not {type(ring).__name__}")
    budget.add(len(ring))
    if len(ring) < 4:
        raise AOIError(f"{where} has {len(ring)} positions; a linear ring needs at least 4 (3 corners plus "
                       f"the first position repeated at the end)")
    out = [_position(p, k, where) for k, p in enumerate(ring, start=1)]
    if out[0] != out[-1] or len(ring[0]) != len(ring[-1]) or list(ring[0]) != list(ring[-1]):
        # closed means equal in every ordinate: [100, 0] ... [100, 0, 4.9] is not closed
        raise AOIError(f"{where} is not closed: its last position {list(ring[-1])} differs from its first "
                       f"{list(ring[0])}; repeat the first position at the end, every ordinate the same "
                       f"(RFC 7946 §3.1.6)")
    return out


def _position(p: Any, k: int, where: str) -> tuple[float, float]:
    here = f"position {k} of {where}"
    if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
        raise AOIError(f"{here} must be [longitude, latitude] (optionally with elevation), got {_short(p)}")
    vals: list[float] = []
    for v in p:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise AOIError(f"{here} has a non-numeric value {_short(v)}; coordinates must be numbers")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise AOIError(f"{here} has a non-finite value ({v!r}); every coordinate must be a finite number")
        vals.append(f)
    x, y = vals[0], vals[1]
    if abs(x) > 360 or abs(y) > 180:
        raise AOIError(f"{here} is ({x}, {y}): coordinates look projected (metres?), AOIs must be WGS84 "
                       f"lon/lat — reproject to EPSG:4326 (e.g. ogr2ogr -t_srs EPSG:4326) before submitting")
    if not -180 <= x <= 180:
        raise AOIError(f"{here}: longitude {x} is out of range [-180, 180]; write longitudes as -180..180 "
                       f"(not 0..360)")
    if not -90 <= y <= 90:
        raise AOIError(f"{here}: latitude {y} out of range [-90, 90] — are the axes swapped? GeoJSON is "
                       f"lon,lat (longitude first)")
    return x, y


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _crosses_antimeridian(ring: list[tuple[float, float]]) -> bool:
    """A jump of more than 180° between consecutive longitudes, not counting an edge from -180 to 180
    (a ring that runs along the antimeridian, e.g. a global band, does not cross it)."""
    return any(abs(b[0] - a[0]) > 180 and not (abs(a[0]) == 180 and abs(b[0]) == 180)
               for a, b in zip(ring, ring[1:], strict=False))


def _split_antimeridian(geom: PolygonalGeometry) -> PolygonalGeometry:
    """Split a geometry drawn in unwrapped longitudes (0..360) at 180°; the east part is shifted back by
    -360."""
    west = _polygonal(geom.intersection(box(-180.0, -90.0, 180.0, 90.0)))
    east = _polygonal(geom.intersection(box(180.0, -90.0, 540.0, 90.0)))
    parts = _polygon_parts(west) + _polygon_parts(translate(east, xoff=-360.0))
    if not parts:
        raise AOIError("the antimeridian-crossing polygon is empty after splitting at ±180°; give a polygon "
                       "that encloses an area")
    return MultiPolygon(parts) if len(parts) > 1 else parts[0]


def _valid_or_repair(geom: PolygonalGeometry, label: str, options: AOIOptions,
                     repairs: _Repairs) -> PolygonalGeometry:
    if geom.is_valid:
        return geom
    reason = shapely.is_valid_reason(geom)
    if not options.repair:
        raise AOIError(f"{label} is not a valid polygon ({reason}); fix the geometry (e.g. in QGIS: Fix "
                       f"Geometries) or set aoi_options.repair: true to repair it with make_valid (the area "
                       f"change is recorded)")
    fixed = _polygonal(shapely.make_valid(geom))
    if fixed.is_empty or fixed.area <= 0:
        raise AOIError(f"{label} is not a valid polygon ({reason}) and repairing it leaves no area; "
                       f"redraw it")
    repairs.repaired = True
    repairs.old += geom.area
    repairs.new += fixed.area
    return fixed


def _polygon_parts(geom: BaseGeometry) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return [g for g in geom.geoms if not g.is_empty]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def _polygonal(geom: BaseGeometry) -> PolygonalGeometry:
    """Only the polygonal parts of ``geom`` (lines and points from make_valid/intersection dropped)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = _polygon_parts(geom)
    if not parts:
        return Polygon()
    if len(parts) == 1:
        return parts[0]
    return _union_parts(parts)


def _union_parts(parts: list[Polygon]) -> PolygonalGeometry:
    merged = shapely.union_all(parts)
    return merged if isinstance(merged, (Polygon, MultiPolygon)) else MultiPolygon(_polygon_parts(merged))

