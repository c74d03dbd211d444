"""Training labels on the tile grid: class tables, rasterised polygons, label rasters, spatial splits.

The nouns:

* :class:`LabelClass` / :class:`ClassTable` — the classes a supervised head predicts (name, value 0..254,
  RGB colour). ``IGNORE = 255`` marks unlabelled and nodata pixels; a loss skips it. The table travels with
  the head (:meth:`ClassTable.to_dict` / :meth:`ClassTable.from_dict`).
* Label arrays are ``uint8 (row, col)`` on a :class:`~geo_dino.inputs.grid.Grid` — the raster's own grid, in
  the raster's CRS. Labels are never resampled silently: a label raster on another grid is refused unless
  ``reproject=True`` asks for a nearest-neighbour warp, which the returned record reports.

Rules chosen here (each tested):

* **Overlapping polygons: the smallest area wins.** Features are burned largest first, so a small polygon
  (a building) inside a large one (a land-use parcel) keeps its class whatever the file order. Among
  polygons of exactly equal area, the later feature in the file wins.
* A pixel is labelled when its **centre** lies inside a polygon (GDAL's rule), or, with
  ``all_touched=True``, when the polygon touches the pixel at all.
* **Spatial split**: whole square blocks of ``block × block`` tiles go to validation; training tiles within
  ``buffer`` tiles (Chebyshev distance, diagonals included) of any validation tile are dropped, so with
  ``buffer >= 1`` no training tile touches a validation tile.

Errors are :class:`LabelError` (a :class:`~geo_dino.errors.GeoDinoError` and a ``ValueError``), except a
missing/unreadable/oversized file (:class:`~geo_dino.errors.SourceError`), a grid mismatch
(:class:`~geo_dino.errors.CRSMismatchError`) and bad arguments or tables
(:class:`~geo_dino.errors.ConfigError`).
Heavy libraries (geopandas, rasterio) are imported where used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geo_dino.errors import ConfigError, CRSMismatchError, LabelError, OutputError, SourceError
from geo_dino.inputs.grid import Grid, Tile, TileGrid

__all__ = ["IGNORE", "ClassTable", "LabelClass", "LabelError", "class_colormap", "label_stats",
           "rasterize_polygons", "read_label_raster", "spatial_split"]

IGNORE = 255
"""The label of unlabelled and nodata pixels (skipped by the loss)."""

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg")
MAX_VECTOR_BYTES = 200_000_000
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


# --------------------------------------------------------------------------------------------- class table


@dataclass(frozen=True)
class LabelClass:
    """One class: its ``name``, its label ``value`` (0..254) and an RGB ``colour``."""

    name: str
    value: int
    colour: tuple[int, int, int]


def _colour(c: Any, name: str) -> tuple[int, int, int]:
    if isinstance(c, str):
        m = _HEX.match(c.strip())
        if not m:
            raise ConfigError(f"class {name!r}: colour {c!r} is not '#rrggbb' or [r, g, b]")
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if (not isinstance(c, (list, tuple)) or len(c) != 3
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
                       for v in c)):
        raise ConfigError(f"class {name!r}: colour {c!r} must be three integers 0..255 (r, g, b) or "
                          f"'#rrggbb'")
    return int(c[0]), int(c[1]), int(c[2])


#: Colour-blind-friendly qualitative palette: Okabe & Ito (2008) without black, then the tab10 colours
#: that are not close to those. Further classes get deterministic golden-ratio hues.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),    # orange
    (86, 180, 233),   # sky blue
    (0, 158, 115),    # bluish green
    (240, 228, 66),   # yellow
    (0, 114, 178),    # blue
    (213, 94, 0),     # vermillion
    (204, 121, 167),  # reddish purple
    (127, 127, 127),  # grey (tab10)
    (148, 103, 189),  # purple (tab10)
    (140, 86, 75),    # brown (tab10)
    (188, 189, 34),   # olive (tab10)
    (23, 190, 207),   # cyan (tab10)
)


#: The colours of binary change rasters: "unchanged", and "changed" as the label-free change (red) and a
#: trained head (magenta) draw it. No class colour of :func:`class_colormap` comes near either "changed"
#: colour (:data:`MIN_COLOUR_DISTANCE`), so a change drawn over the k-means classes stays visible.
UNCHANGED = (210, 210, 210, 255)
CHANGED_LABEL_FREE = (255, 0, 0, 255)
CHANGED_HEAD = (255, 0, 255, 255)
#: the least RGB distance between a class colour and a "changed" colour
MIN_COLOUR_DISTANCE = 100.0


def colour_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Euclidean distance of two colours' RGB."""
    return float(sum((int(x) - int(y)) ** 2 for x, y in zip(a[:3], b[:3], strict=True)) ** 0.5)


def _near_change(rgb: tuple[int, ...]) -> bool:
    return any(colour_distance(rgb, c) < MIN_COLOUR_DISTANCE for c in (CHANGED_LABEL_FREE, CHANGED_HEAD))


def class_colormap(k: int) -> dict[int, tuple[int, int, int, int]]:
    """``k`` distinct, colour-blind-friendly RGBA colours for classes ``0..k-1`` (same every call); none near
    the "changed" colours."""
    import colorsys

    if not 1 <= k <= 65535:
        raise OutputError(f"class_colormap: k={k} must be in [1, 65535]")
    colours: list[tuple[int, int, int]] = list(_BASE_PALETTE[:k])
    seen = set(colours)
    i = 0
    while len(colours) < k:
        h = (0.1 + i * 0.618033988749895) % 1.0
        s, v = (0.65, 0.9) if (i // 7) % 2 == 0 else (0.9, 0.65)
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
        i += 1
        if rgb not in seen and not _near_change(rgb):
            seen.add(rgb)  # type: ignore[arg-type]
            colours.append(rgb)  # type: ignore[arg-type]
    return {n: (r, g, b, 255) for n, (r, g, b) in enumerate(colours)}


def _default_colours(n: int) -> list[tuple[int, int, int]]:
    return [rgba[:3] for _, rgba in sorted(class_colormap(n).items())]


@dataclass(frozen=True)
class ClassTable:
    """The classes of a head, ordered as given. Build with :meth:`from_dict`, :meth:`from_mapping` or
    :meth:`infer`; direct construction validates too."""

    classes: tuple[LabelClass, ...]

    IGNORE = IGNORE

    def __post_init__(self) -> None:
        if not self.classes:
            raise ConfigError("a class table needs at least one class")
        names: set[str] = set()
        values: set[int] = set()
        for c in self.classes:
            if not isinstance(c.name, str) or not c.name.strip():
                raise ConfigError(f"class names must be non-empty strings, got {c.name!r}")
            if not isinstance(c.value, (int, np.integer)) or isinstance(c.value, bool):
                raise ConfigError(f"class {c.name!r}: value {c.value!r} must be an integer 0..254")
            if c.value == IGNORE:
                raise ConfigError(f"class {c.name!r}: value {IGNORE} is reserved for ignored "
                                  "(unlabelled/nodata) pixels; choose a value in 0..254")
            if not 0 <= c.value <= 254:
                raise ConfigError(f"class {c.name!r}: value {c.value} is outside 0..254")
            _colour(c.colour, c.name)
            if c.name in names:
                raise ConfigError(f"duplicate class name {c.name!r}")
            if c.value in values:
                raise ConfigError(f"duplicate class value {c.value} (class {c.name!r})")
            names.add(c.name)
            values.add(int(c.value))

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassTable:
        """From :meth:`to_dict`'s form (a YAML instance): ``{"ignore_index": 255, "classes": [{"name": ...,
        "value": ..., "colour": [r, g, b] or "#rrggbb"}, ...]}``; ``colour`` and ``ignore_index`` optional."""
        if not isinstance(d, Mapping) or "classes" not in d:
            raise ConfigError("a class table is a mapping with a 'classes' list")
        extra = set(d) - {"classes", "ignore_index"}
        if extra:
            raise ConfigError(f"unknown class table keys {sorted(extra)}; allowed: classes, ignore_index")
        if d.get("ignore_index", IGNORE) != IGNORE:
            raise ConfigError(f"ignore_index must be {IGNORE}, got {d['ignore_index']!r}")
        items = d["classes"]
        if not isinstance(items, (list, tuple)):
            raise ConfigError("'classes' must be a list of {name, value, colour}")
        defaults = _default_colours(max(1, len(items)))
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, Mapping) or not {"name", "value"} <= set(item):
                raise ConfigError(f"classes[{k}]: needs 'name' and 'value' (and optionally 'colour')")
            bad = set(item) - {"name", "value", "colour"}
            if bad:
                raise ConfigError(f"classes[{k}]: unknown keys {sorted(bad)}")
            name = item["name"]
            out.append(LabelClass(name, item["value"], _colour(item.get("colour", defaults[k]), str(name))))
        return cls(tuple(out))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, int]) -> ClassTable:
        """From ``{name: value}``, with deterministic default colours in the given order."""
        colours = _default_colours(max(1, len(mapping)))
        return cls(tuple(LabelClass(n, v, colours[k]) for k, (n, v) in enumerate(mapping.items())))

    @classmethod
    def infer(cls, found: Iterable[Any]) -> ClassTable:
        """From the attribute values or raster values found: strings become classes ``0..n-1`` in sorted
        order; integers keep their value and are named ``class_<value>``. Colours are deterministic."""
        vals = set()
        for v in found:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            vals.add(v.item() if isinstance(v, np.generic) else v)
        if not vals:
            raise LabelError("no class value found to infer a class table from")
        if all(isinstance(v, str) for v in vals):
            return cls.from_mapping({n: i for i, n in enumerate(sorted(vals))})
        ints = []
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
                raise LabelError(f"cannot infer classes from value {v!r}: use all strings or all integers")
            ints.append(int(v))
        return cls.from_mapping({f"class_{v}": v for v in sorted(ints)})

    # -- use -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form, stored beside a head checkpoint."""
        return {"ignore_index": IGNORE,
                "classes": [{"name": c.name, "value": int(c.value), "colour": list(c.colour)}
                            for c in self.classes]}

    @property
    def names(self) -> tuple[str, ...]:
        """The class names, in table order."""
        return tuple(c.name for c in self.classes)

    @property
    def values(self) -> tuple[int, ...]:
        """The class values (0..254), in table order."""
        return tuple(int(c.value) for c in self.classes)

    def name_of(self, value: int) -> str:
        """The name of the class with label value ``value``; a value not in the table raises LabelError."""
        for c in self.classes:
            if c.value == value:
                return c.name
        raise LabelError(f"value {value} is not a class of this table (values {list(self.values)})")

    def value_for(self, raw: Any, *, where: str = "") -> int:
        """The class value of an attribute value: a class name, or an integer class value."""
        at = f"{where}: " if where else ""
        if isinstance(raw, np.generic):
            raw = raw.item()
        if isinstance(raw, str):
            for c in self.classes:
                if c.name == raw:
                    return int(c.value)
            raise LabelError(f"{at}unknown class {raw!r}; the class table has {list(self.names)}")
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if isinstance(raw, float) and (math.isnan(raw) or raw != int(raw)):
                raise LabelError(f"{at}class value {raw!r} is not an integer")
            if int(raw) in self.values:
                return int(raw)
            raise LabelError(f"{at}unknown class value {raw!r}; the class table has values "
                             f"{list(self.values)}")
        raise LabelError(f"{at}class value {raw!r} is neither a class name nor an integer value")

    def qml_classes(self) -> list[tuple[int, str, tuple[int, int, int, int]]]:
        """``(value, name, rgba)`` entries for :func:`geo_dino.outputs.styles.write_qml_palette`."""
        return [(int(c.value), c.name, (*c.colour, 255)) for c in self.classes]


# --------------------------------------------------------------------------------------------- polygons


def _check_vector(path: str | Path, max_bytes: int) -> Path:
    s = str(path)
    if "://" in s or s.lower().startswith("/vsi"):
        raise SourceError(f"{s}: remote and virtual paths are refused for labels; copy the file locally")
    p = Path(s)
    if p.suffix.lower() not in VECTOR_SUFFIXES:
        raise SourceError(f"{s}: label polygons must be GeoJSON or GeoPackage ({', '.join(VECTOR_SUFFIXES)})")
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise SourceError(f"{s}: label file not found") from None
    if not real.is_file():
        raise SourceError(f"{s}: not a regular file")
    size = real.stat().st_size
    if size > max_bytes:
        raise SourceError(f"{s}: {size:,} bytes exceeds the label file limit of {max_bytes:,} bytes; "
                          "split the file or raise max_bytes")
    with real.open("rb") as fh:
        head = fh.read(16)
    is_gpkg = head == _SQLITE_MAGIC
    if (real.suffix.lower() == ".gpkg") != is_gpkg:
        raise SourceError(f"{s}: the content does not match the suffix (GeoPackage is SQLite, GeoJSON is "
                          f"text)")
    return real


def _read_vector(real: Path, layer: str | None, source: str) -> Any:
    import geopandas as gpd
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError, FeatureError, FieldError, GeometryError

    bad_file = (DataSourceError, DataLayerError, FeatureError, FieldError, GeometryError)
    try:
        layers = [str(x) for x in pyogrio.list_layers(real)[:, 0]]
    except bad_file as exc:
        raise SourceError(f"{source}: cannot be read as GeoJSON/GeoPackage: {exc}") from None
    if layer is None:
        if len(layers) > 1:
            raise LabelError(f"{source}: has {len(layers)} layers {layers}; choose one with layer=")
        layer = layers[0] if layers else None
    elif layer not in layers:
        raise LabelError(f"{source}: no layer {layer!r}; layers are {layers}")
    try:
        return gpd.read_file(real, layer=layer, engine="pyogrio")
    except bad_file as exc:
        raise SourceError(f"{source}: cannot be read: {exc}") from None


def rasterize_polygons(path: str | Path, attribute: str, table: ClassTable, grid: Grid, *,
                       layer: str | None = None, all_touched: bool = False,
                       max_bytes: int = MAX_VECTOR_BYTES) -> np.ndarray:
    """Burn labelled polygons onto ``grid``: ``uint8 (row, col)``, :data:`IGNORE` where no polygon.

    ``attribute`` holds a class name or integer class value of ``table`` per feature. Polygons are
    reprojected to ``grid.crs`` (lon/lat order for geographic CRSs, geopandas' ``always_xy``). Where
    polygons overlap the smallest area wins (ties: the later feature). Raises :class:`LabelError` for a
    missing attribute, an unknown or empty class value, a missing/empty/non-polygon/invalid geometry, a file
    without CRS, or polygons that label no pixel of the grid.
    """
    import shapely
    from pyproj.exceptions import CRSError, ProjError
    from rasterio.features import rasterize

    source = str(path)
    real = _check_vector(path, max_bytes)
    gdf = _read_vector(real, layer, source)
    if len(gdf) == 0:
        raise LabelError(f"{source}: has no features")
    if attribute not in gdf.columns or attribute == gdf.geometry.name:
        cols = [c for c in gdf.columns if c != gdf.geometry.name]
        raise LabelError(f"{source}: no attribute {attribute!r}; attributes are {cols}")
    if gdf.crs is None:
        raise LabelError(f"{source}: has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:xxxx) before labelling")
    values = []
    for k, (geom, raw) in enumerate(zip(gdf.geometry, gdf[attribute], strict=True)):
        where = f"{source}: feature {k} ({attribute}={raw!r})"
        if geom is None or geom.is_empty:
            raise LabelError(f"{where}: has no geometry")
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise LabelError(f"{where}: is a {geom.geom_type}; only Polygon/MultiPolygon features are labels")
        if not geom.is_valid:
            raise LabelError(f"{where}: invalid polygon ({shapely.is_valid_reason(geom)}); repair it first "
                             "(e.g. shapely.make_valid or QGIS 'Fix geometries')")
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            raise LabelError(f"{where}: has no value for attribute {attribute!r}")
        values.append(table.value_for(raw, where=f"{source}: feature {k}, attribute {attribute!r}"))
    try:
        geoms = gdf.to_crs(grid.crs).geometry
    except (CRSError, ProjError) as exc:
        raise LabelError(f"{source}: cannot reproject from {gdf.crs} to {grid.crs}: {exc}") from None
    coords = shapely.get_coordinates(geoms.values)
    if not np.isfinite(coords).all():
        raise LabelError(f"{source}: polygons do not project to finite coordinates in {grid.crs}; are they "
                         f"in that CRS's area of use?")
    left, bottom, right, top = grid.bounds()
    frame = shapely.box(left, bottom, right, top)
    if not any(frame.intersects(g) for g in geoms):
        b = [round(v, 6) for v in geoms.total_bounds]
        raise LabelError(f"{source}: no polygon overlaps the grid (polygon bounds {b} vs grid bounds "
                         f"{[left, bottom, right, top]} in {grid.crs}); are the labels for this raster?")
    areas = np.asarray(geoms.area)
    order = sorted(range(len(values)), key=lambda i: (-areas[i], i))  # largest first: smallest burned last
    out = rasterize(((geoms.iloc[i], values[i]) for i in order), out_shape=(grid.height, grid.width),
                    transform=grid.transform, fill=IGNORE, all_touched=all_touched, dtype="uint8")
    if not (out != IGNORE).any():
        raise LabelError(f"{source}: the polygons overlap the grid but contain no pixel centre; "
                         "use all_touched=True for polygons smaller than a pixel")
    return out


# --------------------------------------------------------------------------------------------- label rasters


def read_label_raster(path: str | Path, grid: Grid, *, mapping: Mapping[int, int] | None = None,
                      nodata_as_ignore: bool = True, reproject: bool = False, table: ClassTable | None = None,
                      sources: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a one-band label raster onto ``grid``: ``(labels uint8 (row, col), record)``.

    The file is checked like any raster source (:func:`geo_dino.inputs.sources.open_raster`; ``sources`` is a
    :class:`~geo_dino.config.SourceConfig`, by default allowing the file's own folder). It must be on
    ``grid`` (shape, transform, CRS), else :class:`CRSMismatchError` — unless ``reproject=True``, which warps
    it with nearest neighbour (pixels outside the file become :data:`IGNORE`) and says so in the record.

    ``mapping`` maps raw values to class values or :data:`IGNORE` (Taizhou ``{0: IGNORE, 1: 0, 2: 1}``);
    raw values missing from it raise :class:`LabelError` listing them. Without ``mapping`` raw values are
    used as they are (they must be integers in 0..255). With ``nodata_as_ignore`` the file's nodata value
    becomes :data:`IGNORE` before mapping. With ``table``, every resulting value must be one of its classes.
    The record (JSON-able) holds the path, sha256, counts per class, ignored pixels and any reprojection.
    """
    import rasterio

    from geo_dino.config import SourceConfig
    from geo_dino.files import sha256_file
    from geo_dino.inputs.sources import gdal_env, open_raster

    cfg = sources if sources is not None else SourceConfig(allowed_roots=[Path(path).resolve().parent])
    info = open_raster(path, cfg)
    if info.count != 1:
        raise LabelError(f"{path}: a label raster has one band, this one has {info.count}")
    if info.dtype.startswith("float"):
        raise LabelError(f"{path}: label rasters hold integer classes, this one is {info.dtype}")
    reproj: dict[str, Any] | None = None
    with gdal_env(), rasterio.open(info.path) as src:
        raw = src.read(1)
        nodata = src.nodata
        valid = np.ones(raw.shape, dtype=bool)
        if nodata_as_ignore and nodata is not None:
            valid &= raw != nodata
        try:
            grid.same_as(info.grid, what=f"the label raster {path} and the image grid")
        except CRSMismatchError as exc:
            if not reproject:
                raise CRSMismatchError(f"{exc}; pass reproject=True to warp the labels onto the image grid "
                                       "(nearest neighbour), or rasterise them on the image grid") from None
            raw, valid = _warp_nearest(raw, valid, info.grid, grid)
            reproj = {"from_crs": info.grid.crs, "from_transform": list(info.grid.transform)[:6],
                      "from_shape": [info.grid.height, info.grid.width], "resampling": "nearest"}
    labels = _apply_mapping(raw, valid, mapping, str(path))
    if table is not None:
        bad = sorted(set(np.unique(labels).tolist()) - set(table.values) - {IGNORE})
        if bad:
            raise LabelError(f"{path}: label values {bad} are not classes of the table {list(table.values)}")
    counts = {int(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True), strict=True)
              if v != IGNORE}
    record = {
        "path": info.path,
        "sha256": sha256_file(info.path),
        "counts": {(table.name_of(v) if table is not None else str(v)): n for v, n in sorted(counts.items())},
        "ignored": int(np.count_nonzero(labels == IGNORE)),
        "nodata": None if nodata is None else float(nodata),
        "mapping": None if mapping is None else {str(k): int(v) for k, v in mapping.items()},
        "reprojected": reproj,
    }
    return labels, record


def _warp_nearest(raw: np.ndarray, valid: np.ndarray, src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.warp import Resampling, reproject

    out = np.zeros((dst.height, dst.width), dtype=raw.dtype)
    ok = np.zeros((dst.height, dst.width), dtype=np.uint8)
    common = {"src_transform": src.transform, "src_crs": src.crs, "dst_transform": dst.transform,
              "dst_crs": dst.crs, "resampling": Resampling.nearest}
    reproject(raw, out, **common)
    reproject(valid.astype(np.uint8), ok, src_nodata=0, dst_nodata=0, **common)  # outside the file: 0
    return out, ok.astype(bool)


def _apply_mapping(raw: np.ndarray, valid: np.ndarray, mapping: Mapping[int, int] | None,
                   source: str) -> np.ndarray:
    present = np.unique(raw[valid])
    if mapping is None:
        bad = present[(present < 0) | (present > 255)]
        if bad.size:
            raise LabelError(f"{source}: raw values {bad.tolist()} are outside 0..255; pass mapping= to map "
                             f"them to classes or IGNORE")
        out = raw.astype(np.uint8)
        out[~valid] = IGNORE
        return out
    for k, v in mapping.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v <= 255:
            raise ConfigError(f"mapping {k!r} -> {v!r}: targets must be class values 0..254 or IGNORE (255)")
    missing = sorted(set(present.tolist()) - {int(k) for k in mapping})
    if missing:
        raise LabelError(f"{source}: raw values {missing} are not in the mapping {dict(mapping)}; map each "
                         f"to a class value or to IGNORE ({IGNORE})")
    out = np.full(raw.shape, IGNORE, dtype=np.uint8)
    for k, v in mapping.items():
        out[valid & (raw == k)] = v
    return out


# --------------------------------------------------------------------------------------------- statistics


def label_stats(labels: np.ndarray, table: ClassTable) -> dict[str, Any]:
    """Pixel counts per class and inverse-frequency weights, :data:`IGNORE` left out.

    ``weights[c] = labelled / (n_present * count[c])`` for classes present (so the pixel-weighted mean weight
    is 1 and a class ten times rarer weighs ten times more); absent classes weigh 0 and are listed in
    ``absent``. ``weight_vector`` orders the weights as ``table.values``. Values that are neither a class nor
    :data:`IGNORE` raise :class:`LabelError`.
    """
    arr = np.asarray(labels)
    vals, ns = np.unique(arr, return_counts=True)
    found = {int(v): int(n) for v, n in zip(vals, ns, strict=True)}
    bad = sorted(set(found) - set(table.values) - {IGNORE})
    if bad:
        raise LabelError(f"label values {bad} are not classes of the table {list(table.values)}")
    counts = {c.name: found.get(int(c.value), 0) for c in table.classes}
    labelled = sum(counts.values())
    present = [n for n in counts.values() if n > 0]
    weights = {name: (labelled / (len(present) * n) if n else 0.0) for name, n in counts.items()}
    return {"counts": counts, "ignored": found.get(IGNORE, 0), "labelled": labelled, "weights": weights,
            "weight_vector": [weights[n] for n in table.names],
            "absent": [n for n, k in counts.items() if not k]}


# --------------------------------------------------------------------------------------------- spatial split


def _tile_indices(tiles: TileGrid | Iterable[tuple[int, int] | Tile]) -> list[tuple[int, int]]:
    if isinstance(tiles, TileGrid):
        nr, nc = tiles.shape
        return [(r, c) for r in range(nr) for c in range(nc)]
    out = []
    for t in tiles:
        rc = (t.grid_row, t.grid_col) if isinstance(t, Tile) else tuple(t)
        if len(rc) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in rc):
            raise ConfigError(f"tile index {t!r} is not a (row, col) pair of integers")
        out.append((int(rc[0]), int(rc[1])))
    if len(set(out)) != len(out):
        raise ConfigError("tile indices contain duplicates")
    return out


def spatial_split(tiles: TileGrid | Iterable[tuple[int, int] | Tile], val_fraction: float, *, block: int = 4,
                  buffer: int = 1, seed: int = 0
                  ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Split tiles ``(row, col)`` into ``(train, val, dropped)``, each sorted.

    Tiles are grouped in square blocks ``(row // block, col // block)``; blocks, shuffled by ``seed``, go to
    validation until at least ``val_fraction`` of the tiles are there. Training tiles within ``buffer`` tiles
    (Chebyshev distance) of a validation tile are ``dropped``. For a :class:`TileGrid` (whose tiles may
    overlap), ``buffer`` must also keep training and validation tiles pixel-disjoint. Raises
    :class:`ConfigError` for bad arguments or when either side would be empty.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction {val_fraction!r} must be in (0, 1)")
    if not isinstance(block, int) or block < 1:
        raise ConfigError(f"block {block!r} must be a positive integer")
    if not isinstance(buffer, int) or buffer < 0:
        raise ConfigError(f"buffer {buffer!r} must be a non-negative integer")
    if isinstance(tiles, TileGrid):
        need = max(0, math.ceil(tiles.size / tiles.stride) - 1)
        if buffer < need:
            raise ConfigError(f"buffer {buffer} lets training tiles share pixels with validation tiles "
                              f"(tile size {tiles.size}, stride {tiles.stride}); use buffer >= {need}")
    idx = _tile_indices(tiles)
    if not idx:
        raise ConfigError("no tiles to split")
    blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in idx:
        blocks.setdefault((r // block, c // block), []).append((r, c))
    keys = sorted(blocks)
    rng = np.random.default_rng(seed)
    target = val_fraction * len(idx)
    val: set[tuple[int, int]] = set()
    for k in rng.permutation(len(keys)):
        if len(val) >= target:
            break
        val.update(blocks[keys[int(k)]])
    train, dropped = _around(idx, val, buffer)
    if not train:
        raise ConfigError(f"the split leaves no training tile ({len(val)} validation, {len(dropped)} dropped "
                          f"of {len(idx)}); lower val_fraction, block or buffer")
    return sorted(train), sorted(val), sorted(dropped)


def _around(idx: list[tuple[int, int]], held: set[tuple[int, int]], buffer: int
            ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, dropped)``: the tiles of ``idx`` not in ``held``, dropped when within ``buffer`` tiles
    (Chebyshev distance) of a held tile; both in ``idx``'s order."""
    train: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    for r, c in idx:
        if (r, c) in held:
            continue
        near = any((r + dr, c + dc) in held
                   for dr in range(-buffer, buffer + 1) for dc in range(-buffer, buffer + 1))
        (dropped if near else train).append((r, c))
    return train, dropped


def held_out_split(cells: Iterable[tuple[int, int]], test: Iterable[tuple[int, int]], *, buffer: int = 1
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, test, dropped)`` for a given set of ``test`` tiles: the training tiles within ``buffer``
    tiles (Chebyshev distance) of a test tile are dropped. Raises :class:`ConfigError` when either side would
    be empty."""
    idx = sorted(set(cells))
    held = {c for c in test if c in set(idx)}
    if not held:
        raise ConfigError("the geographic hold-out holds no labelled tile; move split.test_box or change "
                          "split.axis")
    train, dropped = _around(idx, held, buffer)
    if not train:
        raise ConfigError(f"the hold-out leaves no training tile ({len(held)} test, {len(dropped)} dropped "
                          f"of {len(idx)}); lower split.buffer or hold out less")
    return train, sorted(held), dropped


def half_cells(cells: Iterable[tuple[int, int]], axis: str) -> list[tuple[int, int]]:
    """The tiles ``(row, col)`` of one half of the labelled tiles' extent: ``east`` (columns in the eastern
    half), ``west``, ``north`` (rows in the northern half) or ``south``."""
    idx = sorted(set(cells))
    if not idx:
        raise ConfigError("no tiles to split")
    k = 1 if axis in ("east", "west") else 0
    lo, hi = min(c[k] for c in idx), max(c[k] for c in idx)
    mid = (lo + hi + 1) / 2
    if axis in ("east", "south"):
        return [c for c in idx if c[k] >= mid]
    if axis in ("west", "north"):
        return [c for c in idx if c[k] < mid]
    raise ConfigError(f"split.axis {axis!r}: choose east, west, north or south")
