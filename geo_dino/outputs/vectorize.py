"""Class rasters to polygons: a blockwise polygoniser writing one GeoPackage layer, styled for QGIS.

:func:`vectorize_classes` reads the class raster (and an optional confidence raster on the same grid) in
``block × block`` windows, so memory is bounded by the window and by the polygons, never by the scene:

1. In each window, connected components are labelled per class (``scipy.ndimage.label`` with the chosen
   4- or 8-connectivity) and ``rasterio.features.shapes`` turns the component-id array into one polygon per
   component, in **global pixel coordinates** ``(col, row)`` (integers, so unions below are exact). Pixel
   count, confidence sum and finite-confidence count per component come from ``np.bincount``.
2. A component that touches no *inner* window edge is complete: it is emitted at once. One that touches an
   inner edge is kept; pixels of the same class facing each other across a window edge (and, with
   8-connectivity, diagonally, window corners included) link their components in a union-find.
3. At the end each union-find group is merged into one polygon (:func:`_merge`: a union of the shells with
   the holes put back for 4-connectivity, ``shapely.union_all`` for 8), its counts and sums added. The result
   equals polygonising the whole raster at once (tested with 5- to 16-pixel blocks).

Emitting a polygon maps it to the raster CRS with the grid's affine transform, measures ``area_m2`` (planar
area × unit factor² for projected CRSs; geodesic area on the CRS's ellipsoid with :class:`pyproj.Geod` for
geographic ones; always of the *unsimplified* pixel polygon), drops it if below ``min_area_m2``, then
simplifies it. Simplification is per polygon: each polygon stays valid, but neighbours may no longer share
boundaries exactly (use ``simplify_m=0`` for an exact, gap-free coverage). The tolerance ``simplify_m`` is
converted to CRS units; for geographic CRSs it becomes degrees at the polygon's centroid latitude using the
larger of the metres-per-degree along the meridian and the parallel, so the ground tolerance never exceeds
``simplify_m``. Plain Douglas–Peucker is used when its result is valid with all the polygon's parts (holes
narrower than the tolerance may close); otherwise the topology-preserving variant; a result still invalid is
repaired with ``make_valid`` (polygonal part); one that is empty or changes type falls back to the
unsimplified polygon. Repairs and fallbacks are counted in the record.

With 4-connectivity the layer is ``Polygon``; with 8-connectivity GDAL's polygons may touch themselves at a
corner, so they are made valid and the layer is ``MultiPolygon`` (one feature per 8-connected component).
Features are held in batches and written to a hidden copy of the GeoPackage (other layers kept, this layer
replaced), verified (feature count, CRS, other layers) and moved over the target.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from geo_dino.errors import ConfigError, OutputError, SourceError
from geo_dino.files import atomic_write, folder_lock, safe_output_path, sha256_file
from geo_dino.inputs.grid import Grid, PixelBox, crs_equal
from geo_dino.outputs.styles import layer_style_qml, write_layer_style

__all__ = ["vectorize_classes"]

_BATCH = 50_000  # features written to the GeoPackage at a time


# --------------------------------------------------------------------------------------------- inputs


def _open(path: Path, what: str) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    if not Path(path).is_file():
        raise SourceError(f"the {what} {path} does not exist; pass the path of a GeoTIFF written by the run")
    try:
        ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise SourceError(f"the {what} {path} cannot be read as a raster: {exc}") from None
    if ds.count != 1:
        ds.close()
        raise SourceError(f"the {what} {path} has {ds.count} bands; it must have one")
    if ds.crs is None:
        ds.close()
        raise SourceError(f"the {what} {path} has no CRS; polygons need one (write it with a CRS)")
    return ds


def _grid(ds: Any) -> Grid:
    return Grid(ds.height, ds.width, ds.transform, ds.crs.to_wkt())


def _class_table(classes: Any) -> tuple[dict[int, str], dict[int, tuple[int, int, int, int]]]:
    """``{value: name}`` and ``{value: rgba}`` of a ``{value: name}`` mapping or a ClassTable."""
    from geo_dino.inputs.labels import ClassTable, class_colormap

    if isinstance(classes, ClassTable):
        entries = classes.qml_classes()
        return {v: n for v, n, _ in entries}, {v: tuple(c) for v, _, c in entries}  # type: ignore[misc]
    if not isinstance(classes, Mapping) or not classes:
        raise ConfigError("classes must be a non-empty {value: name} mapping or a ClassTable")
    names = {}
    for v, n in classes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not isinstance(n, str) or not n:
            raise ConfigError(f"classes entry {v!r}: {n!r} must map an integer value to a non-empty name")
        names[int(v)] = n
    if len(set(names.values())) != len(names):
        raise ConfigError(f"classes {names} repeat a name; give every class value its own name")
    palette = class_colormap(len(names))
    return names, {v: palette[k] for k, v in enumerate(sorted(names))}


class _Measure:
    """Areas in m² and simplification tolerances in CRS units for one CRS (``x, y`` axis order)."""

    def __init__(self, crs_wkt: str) -> None:
        from pyproj import CRS

        crs = CRS.from_user_input(crs_wkt)
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 0.0
        self.geod = crs.get_geod() if crs.is_geographic else None
        if self.geod is not None:
            self.deg_per_unit = math.degrees(factor)  # geographic units are angles (factor: radians per unit)
        elif crs.is_projected and factor > 0:
            self.m_per_unit = factor
        else:
            raise SourceError(f"cannot measure areas in the CRS {crs.name!r}: it is neither projected with a "
                              "linear unit nor geographic; reproject the class raster first")

    def area_m2(self, geom: Any) -> float:
        import shapely

        if self.geod is None:
            return float(geom.area) * self.m_per_unit ** 2
        return abs(float(self.geod.geometry_area_perimeter(shapely.orient_polygons(geom))[0]))

    def tolerance(self, geom: Any, metres: float) -> float:
        if self.geod is None:
            return metres / self.m_per_unit
        lat = math.radians(geom.centroid.y * self.deg_per_unit)
        a, e2 = self.geod.a, self.geod.es
        w = 1.0 - e2 * math.sin(lat) ** 2
        m_per_deg = math.radians(1.0) * max(a * (1 - e2) / w ** 1.5, a / math.sqrt(w) * math.cos(lat))
        return metres / m_per_deg / self.deg_per_unit


# --------------------------------------------------------------------------------------------- output sink


class _Sink:
    """Collects emitted polygons, measures, filters and simplifies them, and writes batches to ``path``."""

    def __init__(self, path: Path, layer: str, grid: Grid, names: dict[int, str], *, min_area_m2: float,
                 simplify_m: float, multi: bool) -> None:
        self.path, self.layer, self.grid, self.names = path, layer, grid, names
        self.measure = _Measure(grid.crs)
        self.min_area, self.simplify_m, self.multi = min_area_m2, simplify_m, multi
        t = grid.transform
        self.matrix = [t.a, t.b, t.d, t.e, t.c, t.f]
        self.rows: list[tuple] = []
        self.written = 0
        self.stats: dict[int, list] = {}  # value -> [features, area_m2, pixels]
        self.counts = {"dropped_min_area": 0, "simplify_repaired": 0, "simplify_kept_original": 0}

    def add(self, value: int, geom_px: Any, pixels: int, csum: float, cn: int) -> None:
        """One complete component: ``geom_px`` in global pixel coordinates ``(col, row)``."""
        from shapely.affinity import affine_transform

        geom = affine_transform(geom_px, self.matrix)
        area = self.measure.area_m2(geom)
        if area < self.min_area:
            self.counts["dropped_min_area"] += 1
            return
        if self.simplify_m > 0:
            geom = self._simplify(geom, self.measure.tolerance(geom, self.simplify_m))
        mean = csum / cn if cn else math.nan
        self.rows.append((value, self.names.get(value, f"class_{value}"), area, mean, pixels, geom))
        s = self.stats.setdefault(value, [0, 0.0, 0])
        s[0], s[1], s[2] = s[0] + 1, s[1] + area, s[2] + pixels
        if len(self.rows) >= _BATCH:
            self.flush()

    def _simplify(self, geom: Any, tol: float) -> Any:
        """Plain Douglas–Peucker when it keeps the polygon valid with all its parts (fast on huge polygons;
        holes narrower than ``tol`` may close), else topology-preserving; ``make_valid`` repairs; the original
        if the result is empty."""
        import shapely

        simple = shapely.simplify(geom, tol, preserve_topology=False)
        if (simple.is_valid and not simple.is_empty and (self.multi or simple.geom_type == "Polygon")
                and shapely.get_num_geometries(simple) == shapely.get_num_geometries(geom)):
            return simple
        simple = shapely.simplify(geom, tol, preserve_topology=True)
        if not simple.is_valid:
            simple = _polygonal(shapely.make_valid(simple))
            self.counts["simplify_repaired"] += 1
        if simple.is_empty or not simple.is_valid or (simple.geom_type != "Polygon" and not self.multi):
            self.counts["simplify_kept_original"] += 1
            return geom
        return simple

    def flush(self, final: bool = False) -> None:
        if not self.rows and not (final and self.written == 0):
            return
        import geopandas as gpd
        import pandas as pd
        import pyogrio

        cols: list[Sequence[Any]] = (list(zip(*self.rows, strict=True)) if self.rows else
                                     [[] for _ in range(6)])
        frame = gpd.GeoDataFrame({
            "class_value": np.asarray(cols[0], dtype=np.int32),
            "class_name": pd.Series(cols[1], dtype=object),
            "area_m2": np.asarray(cols[2], dtype=np.float64),
            "mean_confidence": np.asarray(cols[3], dtype=np.float64),
            "pixel_count": np.asarray(cols[4], dtype=np.int64),
        }, geometry=gpd.GeoSeries(list(cols[5]), crs=self.grid.crs), crs=self.grid.crs)
        pyogrio.write_dataframe(frame, self.path, layer=self.layer, driver="GPKG", append=self.written > 0,
                                geometry_type="MultiPolygon" if self.multi else "Polygon",
                                promote_to_multi=self.multi)
        self.written += len(self.rows)
        self.rows = []


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a ``make_valid`` result (an empty polygon if there is none)."""
    import shapely

    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


# --------------------------------------------------------------------------------------------- merging


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def _link(uf: _UnionFind, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
          diagonal: bool) -> None:
    """Union the components of pixels facing each other along an edge: ``a[k]`` with ``b[k + offset]``.

    ``a`` and ``b`` are ``(global ids, classes)`` of the two facing pixel lines (0 id: no component).
    """
    (ga, ca), (gb, cb) = a, b
    n = len(ga)
    for off in ((-1, 0, 1) if diagonal else (0,)):
        sa, sb = slice(max(0, -off), n - max(0, off)), slice(max(0, off), n - max(0, -off))
        ok = (ga[sa] > 0) & (gb[sb] > 0) & (ca[sa] == cb[sb])
        if ok.any():
            for x, y in np.unique(np.stack([ga[sa][ok], gb[sb][ok]], axis=1), axis=0).tolist():
                uf.union(x, y)


def _components(cls: np.ndarray, valid: np.ndarray, connectivity: int) -> tuple[np.ndarray, list[int]]:
    """Component ids ``(row, col)`` int32 (0: none) and the class value of each id (index ``id - 1``)."""
    from scipy import ndimage

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    ids = np.zeros(cls.shape, np.int32)
    values: list[int] = []
    for v in np.unique(cls[valid]).tolist():
        lab, k = ndimage.label(valid & (cls == v), structure=structure)
        sel = lab > 0
        ids[sel] = lab[sel] + len(values)
        values.extend([int(v)] * k)
    return ids, values


def _polygons(ids: np.ndarray, box: PixelBox, connectivity: int) -> dict[int, Any]:
    """One polygon per component id, in global pixel coordinates (made valid for 8-connectivity)."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    parts: dict[int, list] = {}
    for gj, v in shapes(ids, mask=ids > 0, connectivity=connectivity,
                        transform=Affine.translation(box.col_off, box.row_off)):
        rings = [shapely.linearrings(np.asarray(r, dtype=np.float64)) for r in gj["coordinates"]]
        parts.setdefault(int(v), []).append(shapely.polygons(rings[0], rings[1:] or None))
    out = {}
    for k, geoms in parts.items():
        geom = geoms[0] if len(geoms) == 1 else shapely.union_all(geoms)
        out[k] = geom if connectivity == 4 or geom.is_valid else _polygonal(shapely.make_valid(geom))
    return out


def _merge(pieces: list[Any], diagonal: bool) -> Any:
    """The union of one component's pieces from different windows (global pixel coordinates, so exact).

    4-connectivity: a piece's holes never reach its window's edge (they would not be holes) and hold no part
    of the component, so only the shells are unioned (cheap even for a scene-wide polygon with thousands of
    holes) and the holes are put back. 8-connectivity: a part can sit in a hole of another part of the same
    component (touching it diagonally), so the pieces are unioned whole. ``simplify(0)`` drops the collinear
    vertices left on window edges.
    """
    import shapely

    if diagonal:
        return shapely.simplify(shapely.union_all(pieces), 0.0, preserve_topology=False)
    shells = shapely.union_all([shapely.Polygon(p.exterior) for p in pieces])
    shells = shapely.simplify(shells, 0.0, preserve_topology=False)
    if shells.geom_type != "Polygon":
        raise OutputError(f"merging {len(pieces)} pieces gave a {shells.geom_type}; this is a bug in "
                          "geo_dino.outputs.vectorize, please report it with the raster")
    return shapely.Polygon(shells.exterior, [*shells.interiors, *(h for p in pieces for h in p.interiors)])


def _edges(ids: np.ndarray, cls: np.ndarray, base: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(global ids, classes)`` of a window's four border pixel lines (id 0: no component)."""
    def line(k: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.where(k > 0, k.astype(np.int64) + base, 0), c.astype(np.int64)

    return {"top": line(ids[0], cls[0]), "bottom": line(ids[-1], cls[-1]), "left": line(ids[:, 0], cls[:, 0]),
            "right": line(ids[:, -1], cls[:, -1])}


def _scan(src: Any, conf: Any, grid: Grid, skip: set[int], block: int, connectivity: int,
          sink: _Sink) -> set[int]:
    """Polygonise ``src`` window by window into ``sink``; return the class values found."""
    height, width, diagonal = grid.height, grid.width, connectivity == 8
    uf, kept = _UnionFind(), {}  # kept: global id -> [value, geometry, pixels, conf sum, conf count]
    bottoms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    right: tuple[np.ndarray, np.ndarray] | None = None
    base, found = 0, set()
    for i, r0 in enumerate(range(0, height, block)):
        for j, c0 in enumerate(range(0, width, block)):
            box = PixelBox(r0, c0, min(block, height - r0), min(block, width - c0))
            win = box.to_rasterio()
            cls = src.read(1, window=win)
            valid = src.read_masks(1, window=win) > 0
            if skip:
                valid &= ~np.isin(cls, sorted(skip))
            ids, values = _components(cls, valid, connectivity)
            n = len(values)
            found.update(values)
            pixels = np.bincount(ids.ravel(), minlength=n + 1)
            csum, cn = np.zeros(n + 1), np.zeros(n + 1, np.int64)
            if conf is not None:
                cv = conf.read(1, window=win, masked=True)
                ok = (ids > 0) & ~np.ma.getmaskarray(cv) & np.isfinite(cv.data)
                # numpy's stub types every bincount as integer; with float64 weights it is float64
                csum = cast("np.ndarray[Any, np.dtype[np.float64]]",
                            np.bincount(ids[ok], weights=cv.data[ok].astype(np.float64), minlength=n + 1))
                cn = np.bincount(ids[ok], minlength=n + 1)
            e = _edges(ids, cls, base)
            inner = [e[s][0] for s, on in (("top", r0 > 0), ("bottom", box.row_end < height),
                                           ("left", c0 > 0), ("right", box.col_end < width)) if on]
            on_edge = set(np.unique(np.concatenate(inner)).tolist()) - {0} if inner else set()
            for k, geom in _polygons(ids, box, connectivity).items():
                rec = [values[k - 1], geom, int(pixels[k]), float(csum[k]), int(cn[k])]
                if k + base in on_edge:
                    kept[k + base] = rec
                    uf.parent[k + base] = k + base
                else:
                    sink.add(*rec)
            if r0 > 0:
                _link(uf, bottoms[(i - 1, j)], e["top"], diagonal)
                if diagonal and (i - 1, j - 1) in bottoms:  # corners: top-left / top-right pixel diagonals
                    gb, cb = bottoms[(i - 1, j - 1)]
                    _link(uf, (gb[-1:], cb[-1:]), (e["top"][0][:1], e["top"][1][:1]), False)
                if diagonal and (i - 1, j + 1) in bottoms:
                    gb, cb = bottoms[(i - 1, j + 1)]
                    _link(uf, (gb[:1], cb[:1]), (e["top"][0][-1:], e["top"][1][-1:]), False)
            if c0 > 0 and right is not None:
                _link(uf, right, e["left"], diagonal)
            right = e["right"] if box.col_end < width else None
            if box.row_end < height:
                bottoms[(i, j)] = e["bottom"]
            base += n
        for key in [k for k in bottoms if k[0] < i]:
            del bottoms[key]
    groups: dict[int, list[int]] = {}
    for gid in kept:
        groups.setdefault(uf.find(gid), []).append(gid)
    for members in groups.values():
        recs = [kept.pop(m) for m in members]
        if len(recs) == 1:
            sink.add(*recs[0])
            continue
        geom = _merge([r[1] for r in recs], diagonal)
        sink.add(recs[0][0], geom, sum(r[2] for r in recs), sum(r[3] for r in recs), sum(r[4] for r in recs))
    return found


# --------------------------------------------------------------------------------------------- main entry


def vectorize_classes(class_cog: Path, *, run_dir: Path, gpkg_name: str, layer: str, classes: Any,
                      confidence_cog: Path | None = None, skip_values: Iterable[int] = (),
                      min_area_m2: float = 0.0, simplify_m: float = 0.0, block: int = 2048,
                      connectivity: int = 4, style: bool = True) -> dict[str, Any]:
    """Polygonise a one-band integer class raster into ``layer`` of ``run_dir/gpkg_name``; return the record.

    ``classes`` is ``{value: name}`` or a :class:`~geo_dino.inputs.labels.ClassTable` (whose colours style the
    layer); values found but not named become ``class_<value>``. Pixels masked in the class raster (its
    nodata) and pixels in ``skip_values`` are never polygons. ``confidence_cog`` is a float raster on the same
    grid (NaN or its nodata are left out of the means). ``min_area_m2`` (square metres) drops smaller polygons
    after merging; ``simplify_m`` (metres, 0: none) simplifies each polygon. The raster is read in
    ``block × block`` pixel windows (rows × columns); ``connectivity`` is 4 or 8. See the module docstring for
    the algorithm.

    Attributes: ``class_value`` (int), ``class_name``, ``area_m2`` (true area of the pixels in m²),
    ``mean_confidence`` (NULL without a confidence raster), ``pixel_count``. The layer is in the raster's CRS.
    Other layers of an existing GeoPackage are kept; this layer is replaced. With ``style``, a categorized
    QGIS style is stored as the layer's default in ``layer_styles``
    (:func:`geo_dino.outputs.styles.write_layer_style`).

    Raises :class:`OutputError` for a path outside ``run_dir`` or a failed verification, :class:`SourceError`
    for a missing/unreadable raster or one without CRS, :class:`CRSMismatchError` when the confidence
    raster is on another grid and :class:`ConfigError` for bad arguments.
    """
    import pyogrio
    from pyproj import CRS

    from geo_dino.inputs.sources import gdal_env

    if connectivity not in (4, 8):
        raise ConfigError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"block must be a positive number of pixels, got {block!r}")
    for name, v in (("min_area_m2", min_area_m2), ("simplify_m", simplify_m)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be a finite number >= 0 (metres), got {v!r}")
    if (not isinstance(layer, str) or not layer
            or layer.lower().startswith(("gpkg_", "rtree_", "layer_styles"))):
        raise ConfigError(f"layer {layer!r} must be a non-empty name "
                          "not starting with gpkg_, rtree_ or layer_styles")
    skip = {int(v) for v in skip_values}
    names, colours = _class_table(classes)
    run_root = Path(run_dir).resolve()
    dst = safe_output_path(run_dir, gpkg_name)
    if dst.suffix.lower() != ".gpkg":
        raise ConfigError(f"gpkg_name {gpkg_name!r} must end in .gpkg")
    dst.parent.mkdir(parents=True, exist_ok=True)
    grid: Grid
    sink: _Sink
    unnamed: list[int]

    def write(tmp: Path) -> None:
        """This layer into ``tmp`` (a copy of ``dst`` with its other layers), styled and verified."""
        nonlocal grid, sink, unnamed
        src = _open(Path(class_cog), "class raster")
        conf = None
        try:
            if np.dtype(src.dtypes[0]).kind not in "iu":
                raise SourceError(f"the class raster {class_cog} is {src.dtypes[0]}; "
                                  "class rasters hold integers")
            grid = _grid(src)
            if confidence_cog is not None:
                conf = _open(Path(confidence_cog), "confidence raster")
                _grid(conf).same_as(grid, what=f"the confidence raster {confidence_cog} and the class raster")
            before: set[str] = set()
            if dst.exists():
                try:
                    before = {str(n) for n in pyogrio.list_layers(dst)[:, 0]}
                except Exception as exc:
                    raise OutputError(f"{dst} exists but is not a readable GeoPackage ({exc}); "
                                      "remove it or choose another gpkg_name") from None
                shutil.copyfile(dst, tmp)
            sink = _Sink(tmp, layer, grid, names, min_area_m2=float(min_area_m2),
                         simplify_m=float(simplify_m), multi=connectivity == 8)
            found = _scan(src, conf, grid, skip, block, connectivity, sink)
            sink.flush(final=True)
            unnamed = sorted(found - set(names))
            if style:
                entries: list[tuple[int, str, tuple[int, ...]]] = [
                    (v, names[v], colours[v]) for v in sorted(names) if v not in skip]
                entries += [(v, f"class_{v}", (128, 128, 128, 255)) for v in unnamed]
                write_layer_style(tmp, layer, layer_style_qml(entries), name=layer)
            info = pyogrio.read_info(tmp, layer=layer)
            if info["features"] != sink.written:
                raise OutputError(f"{dst.name}:{layer}: {info['features']} features read back, "
                                  f"{sink.written} written")
            if not info["crs"] or not crs_equal(info["crs"], grid.crs):
                raise OutputError(f"{dst.name}:{layer}: CRS {info['crs']} read back "
                                  "differs from the raster's")
            lost = before - {str(n) for n in pyogrio.list_layers(tmp)[:, 0]}
            if lost:
                raise OutputError(f"{dst.name}: writing {layer!r} lost the layers {sorted(lost)}")
        finally:
            src.close()
            if conf is not None:
                conf.close()

    # the temporary copy is made, written and renamed by one writer at a time (it has one name per file)
    with folder_lock(dst.parent), gdal_env():
        atomic_write(dst, write, suffix=".gpkg")
        digest = sha256_file(dst)
    crs = CRS.from_user_input(grid.crs)
    per_class = {names.get(v, f"class_{v}"): {"value": v, "features": s[0], "area_m2": s[1],
                                              "pixel_count": s[2]}
                 for v, s in sorted(sink.stats.items())}
    return {
        "path": dst.relative_to(run_root).as_posix(), "layer": layer, "features": sink.written,
        "geometry_type": "MultiPolygon" if connectivity == 8 else "Polygon", "crs": crs.to_string(),
        "sha256": digest, "classes": per_class, "unnamed_values": unnamed,
        "style": layer if style else None, **sink.counts,
        "parameters": {
            "class_cog": str(class_cog),
            "confidence_cog": None if confidence_cog is None else str(confidence_cog),
            "skip_values": sorted(skip), "min_area_m2": float(min_area_m2), "simplify_m": float(simplify_m),
            "simplify_method": "per-polygon Douglas-Peucker (topology-preserving where plain DP breaks "
                               "validity or parts); make_valid repairs; unsimplified fallback when empty",
            "area_method": "geodesic (pyproj.Geod)" if crs.is_geographic else "planar",
            "block": block, "connectivity": connectivity,
        },
    }
