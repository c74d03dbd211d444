"""A QGIS project per run: ``run.qgs`` beside the outputs, every layer styled, every path relative.

:func:`write_project` discovers a run folder's outputs by name (``pca_rgb*``, ``classes*``, ``seg_*``,
``change_*``, ``similarity``, ``*.gpkg``; ``features.zarr`` and JSON files are not map layers), writes the
screening context into ``context.gpkg`` (layers ``aoi``, ``masked_sites`` and the ``sites_hit``, in the
outputs' CRS, their styles in its ``layer_styles`` table) and writes ``run.qgs``: plain QGIS 3 XML made with
``xml.etree``, so the pipeline needs no PyQGIS. Datasources are ``./name`` paths with ``Paths/Absolute``
false, so the folder can be moved or zipped whole. The input rasters live outside the run folder: the
``Inputs`` group refers to them by their absolute paths (from the provenance record), hidden at first, so a
run folder moved on the same machine still finds them; an input that is gone is left out with a warning.

Layer tree, top (drawn last) to bottom: ``Screening``, ``Search`` (``geo-dino similar``), ``Head`` (a
trained head's answer, above the label-free outputs), ``Vectors``, ``Change``, ``Classes``, ``Features``,
``Inputs``. Only the most useful output is on when the project opens (:func:`default_visibility`).
Each layer's style is embedded in its ``<maplayer>``: the ``<pipe>`` of the ``.qml`` beside a raster when
there is one, else one made from the data by :mod:`geo_dino.outputs.styles` (paletted from the colour table,
a min/max pseudocolour stretch, multiband colour for ``pca_rgb``); for GeoPackage layers the default style of
the file's ``layer_styles`` table, else the layer's style from :func:`~geo_dino.outputs.styles.vector_style`.
In the project only, value 0 of a binary change raster is transparent so it overlays the classes.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geo_dino.errors import CRSMismatchError, OutputError
from geo_dino.files import QGIS_PROJECT, RECORD, SCREENING, atomic_write, safe_output_path, write_text_atomic
from geo_dino.outputs import styles

PROJECT = QGIS_PROJECT
CONTEXT = "context.gpkg"
GROUPS = ("Screening", "Search", "Head", "Vectors", "Change", "Classes", "Features", "Inputs")

#: (stem pattern, group, kind) of the rasters a run may hold; the first match wins. ``Head``: a trained
#: head's answer, above the label-free outputs; ``Search``: search by example (``geo-dino similar``).
_RASTERS: tuple[tuple[str, str, str], ...] = (
    (r"pca_rgb(_t[12])?", "Features", "rgb"),
    (r"similarity", "Search", "continuous"),
    (r"seg_classes(_t[12])?", "Head", "classes"),
    (r"seg_probability(_t[12])?", "Head", "probability"),
    (r"change_binary", "Head", "binary"),
    (r"change_probability", "Head", "probability"),
    (r"classes(_t[12])?", "Classes", "classes"),
    (r"change_mask", "Change", "binary"),
    (r"change_magnitude", "Change", "continuous"),
    (r"change_(spectral|features)", "Change", "continuous"),
)
_SUFFIXES = (".tif", ".tiff", ".gpkg")  # map layers; anything else (features.zarr, *.json) is not one


@dataclass(frozen=True)
class MapLayer:
    """One layer of the project: relative datasource, CRS (pyproj), extent in it, and its style elements."""

    name: str
    source: str
    provider: str
    group: str
    crs: Any
    extent: tuple[float, float, float, float]
    style: list[ET.Element] = field(compare=False)
    visible: bool = True
    geometry: str | None = None  # vectors: "Polygon", "Line" or "Point"; None for rasters
    wkb_type: str | None = None

    @property
    def id(self) -> str:
        """A stable id (same run folder → same project bytes)."""
        return f"{self.name}_{uuid.uuid5(uuid.NAMESPACE_URL, self.source).hex[:12]}"


# ------------------------------------------------------------------------------------------- XML helpers
def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: Any) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def _spatialrefsys(crs: Any) -> ET.Element:
    """A QGIS ``<spatialrefsys>`` from a pyproj CRS (QGIS reads the WKT; the rest is for people)."""
    el = ET.Element("spatialrefsys")
    auth = crs.to_authority()
    with warnings.catch_warnings():  # PROJ strings are lossy; QGIS reads the WKT, this is only a hint
        warnings.simplefilter("ignore", UserWarning)
        proj4 = crs.to_proj4() or ""
    acronym = re.search(r"\+proj=(\S+)", proj4)
    _sub(el, "wkt", crs.to_wkt())
    _sub(el, "proj4", proj4)
    _sub(el, "srid", auth[1] if auth else 0)
    _sub(el, "authid", ":".join(auth) if auth else "")
    _sub(el, "description", crs.name)
    _sub(el, "projectionacronym", acronym.group(1) if acronym else "")
    _sub(el, "ellipsoidacronym", "")
    _sub(el, "geographicflag", "true" if crs.is_geographic else "false")
    return el


def _extent(tag: str, ext: tuple[float, float, float, float]) -> ET.Element:
    el = ET.Element(tag)
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), ext, strict=True):
        _sub(el, k, repr(float(v)))
    return el


def _qml_children(qml: str, tags: tuple[str, ...]) -> list[ET.Element]:
    """The style elements named ``tags`` of a QML document, in document order."""
    root = ET.fromstring(qml.encode("utf-8"))
    return [c for c in root if c.tag in tags]


# ---------------------------------------------------------------------------------------------- rasters
def _stats(ds: Any, band: int) -> tuple[float, float]:
    """Min and max of a band's valid pixels, read at most 1024 pixels across (overviews when there)."""
    import numpy as np

    f = max(1, max(ds.width, ds.height) // 1024)
    a = ds.read(band, out_shape=(max(1, ds.height // f), max(1, ds.width // f)), masked=True)
    v = np.asarray(a.compressed(), dtype="float64")
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _raster_style(path: Path, kind: str, ds: Any) -> list[ET.Element]:
    """``<pipe>`` and ``<blendMode>`` for a raster: its sidecar ``.qml`` first, else made from the data."""
    from geo_dino.inputs.labels import CHANGED_LABEL_FREE, UNCHANGED, class_colormap

    sidecar = path.with_suffix(".qml")
    if sidecar.is_file():
        qml = sidecar.read_text(encoding="utf-8")
    elif kind in ("classes", "binary") or (ds.count == 1 and ds.colorinterp[0].name == "palette"):
        nodata = None if ds.nodata is None else int(ds.nodata)
        try:
            cmap = {v: c for v, c in ds.colormap(1).items() if v != nodata and any(c)}
        except ValueError:  # no colour table
            cmap = {0: UNCHANGED, 1: CHANGED_LABEL_FREE} if kind == "binary" else class_colormap(8)
        qml = styles.palette_qml([(v, f"class {v}", c) for v, c in sorted(cmap.items())[:256]], nodata)
    elif kind == "rgb" or (not kind and ds.count >= 3):
        red, green, blue = ((i, *_stats(ds, i)) for i in (1, 2, 3))
        qml = styles.multiband_qml(red, green, blue)
    else:
        lo, hi = (0.0, 1.0) if kind == "probability" else _stats(ds, 1)
        qml = styles.singleband_qml(1, lo, hi)
    style = _qml_children(qml, ("pipe", "blendMode"))
    if kind == "binary":  # an overlay in the project: only the changed pixels are drawn
        styles.make_value_transparent(style[0], 0)
    return style


def _raster_layer(run_dir: Path, path: Path, group: str, kind: str) -> MapLayer:
    import rasterio
    from pyproj import CRS

    with rasterio.open(path) as ds:
        if ds.crs is None:
            raise OutputError(f"{path.name} has no CRS; every output raster must carry one")
        return MapLayer(path.stem, f"./{path.relative_to(run_dir.resolve()).as_posix()}", "gdal", group,
                        CRS.from_wkt(ds.crs.to_wkt()), tuple(ds.bounds), _raster_style(path, kind, ds))


def _percentiles(ds: Any, band: int, lo: float = 2.0, hi: float = 98.0, n: int = 4,
                 size: int = 256) -> tuple[float, float]:
    """Percentiles of a band's valid pixels from ``n × n`` windows of ``size`` px spread over the raster: a
    few blocks read whatever the raster's size (an input may be a whole scene without overviews)."""
    import numpy as np
    from rasterio.windows import Window

    vals = []
    h, w = min(size, ds.height), min(size, ds.width)
    for r in np.linspace(0, ds.height - h, n).astype(int):
        for c in np.linspace(0, ds.width - w, n).astype(int):
            a = ds.read(band, window=Window(int(c), int(r), w, h), masked=True)
            vals.append(np.asarray(a.compressed(), dtype="float64"))
    v = np.concatenate(vals)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    return (a, b) if b > a else (a, a + 1.0)


def _input_layers(run_dir: Path, record: dict[str, Any]) -> list[MapLayer]:
    """The run's input rasters (``Inputs`` group, hidden at first): absolute local paths from the record, the
    run's selected bands as red, green, blue (or grey) stretched over their 2–98 % range."""
    import rasterio
    from pyproj import CRS

    inputs = record.get("inputs") or []
    out = []
    for i, inp in enumerate(inputs):
        raw = str(inp.get("path") or "")
        path = Path(raw)
        if "://" in raw or raw.startswith("/vsi") or not path.is_absolute() or not path.is_file():
            warnings.warn(f"input raster {raw!r} is not a local file here; the project leaves it out",
                          stacklevel=3)
            continue
        with rasterio.open(path, driver="GTiff") as ds:  # what the run read: GeoTIFF/COG only
            if ds.crs is None:
                continue
            bands = [int(b) for b in (inp.get("bands") or range(1, ds.count + 1))]
            if len(bands) >= 3:
                red, green, blue = ((b, *_percentiles(ds, b)) for b in bands[:3])
                qml = styles.multiband_qml(red, green, blue)
            else:
                qml = styles.gray_qml(bands[0], *_percentiles(ds, bands[0]))
            sfx = f"_t{i + 1}" if len(inputs) == 2 else ""
            out.append(MapLayer(f"input{sfx}_{path.stem}", path.resolve().as_posix(), "gdal", "Inputs",
                                CRS.from_wkt(ds.crs.to_wkt()), tuple(ds.bounds),
                                _qml_children(qml, ("pipe", "blendMode")), visible=False))
    return out


# ---------------------------------------------------------------------------------------------- vectors
_VECTOR_STYLE_TAGS = ("renderer-v2", "labeling", "blendMode", "featureBlendMode", "layerOpacity")


def _stored_style(gpkg: Path, layer: str) -> str | None:
    """The default (else newest) QML of ``layer`` in ``gpkg``'s ``layer_styles`` table, if any."""
    try:
        with sqlite3.connect(f"{gpkg.resolve().as_uri()}?mode=ro", uri=True) as db:
            row = db.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = ? AND styleQML != '' "
                             "ORDER BY useAsDefault DESC, id DESC LIMIT 1", (layer,)).fetchone()
    except sqlite3.Error:  # no layer_styles table
        return None
    return row[0] if row else None


def _vector_layers(run_dir: Path, gpkg: Path, group: str) -> list[MapLayer]:
    import pyogrio
    from pyproj import CRS

    out = []
    for layer, geom in pyogrio.list_layers(gpkg):
        if geom is None:  # attribute-only table
            continue
        info = pyogrio.read_info(gpkg, layer=layer)
        if info["crs"] is None:
            raise OutputError(f"{gpkg.name}|{layer} has no CRS; every output layer must carry one")
        bounds = info.get("total_bounds")
        if bounds is None or not info["features"]:
            ext = (0.0, 0.0, 0.0, 0.0)
        else:
            x0, y0, x1, y1 = (float(b) for b in bounds)
            ext = (x0, y0, x1, y1)
        qml = _stored_style(gpkg, layer) or styles.vector_style(layer)
        kind = "Polygon" if "Polygon" in geom else "Line" if "Line" in geom else "Point"
        source = f"./{gpkg.relative_to(run_dir.resolve()).as_posix()}|layername={layer}"
        out.append(MapLayer(layer, source, "ogr", group, CRS.from_user_input(info["crs"]), ext,
                            _qml_children(qml, _VECTOR_STYLE_TAGS), visible=layer != "tiles", geometry=kind,
                            wkb_type=geom.replace(" ", "")))
    return out


def write_context(run_dir: Path, crs: Any) -> Path:
    """Write ``context.gpkg``: the AOI outline, the screening's masked sites and the sites it hit, in ``crs``,
    styles stored.

    ``masked_sites`` holds the buffered sites of ``screening.json`` ``mask_4326`` with the hit's name and
    action; ``sites_hit`` (points) and ``sites_hit_areas`` (polygons) hold every site of ``sites_4326``, the
    sites themselves, with category, action, buffer and distance (written when there are any).
    """
    import json

    import geopandas as gpd
    import shapely
    from shapely.geometry import shape

    dst = safe_output_path(run_dir, CONTEXT)
    record = json.loads((run_dir / RECORD).read_text())
    screening = json.loads((run_dir / SCREENING).read_text())
    hits = {h.get("site_id"): h for h in screening.get("hits", [])}
    aoi = record.get("aoi") or {}
    feats = (screening.get("mask_4326") or {}).get("features", [])
    site_props = [hits.get(f["properties"].get("site_id"), {}) | f["properties"] for f in feats]
    columns = ("site_id", "name", "category", "action", "buffer_m")
    layers = {
        "aoi": gpd.GeoDataFrame({"sha256": [aoi.get("sha256", "")], "source": [str(aoi.get("source", ""))]},
                                geometry=[shape(aoi["geometry"])] if aoi.get("geometry") else [],
                                crs=aoi.get("crs")),
        "masked_sites": gpd.GeoDataFrame({k: [props.get(k) for props in site_props] for k in columns},
                                         geometry=[shape(f["geometry"]) for f in feats], crs="EPSG:4326"),
    }
    geometry_types = {"aoi": "MultiPolygon", "masked_sites": "MultiPolygon"}
    hit_cols = ("site_id", "name", "category", "action", "buffer_m", "distance_m")
    hit_feats = [(f["properties"], shape(f["geometry"]))
                 for f in (screening.get("sites_4326") or {}).get("features", [])]
    for name, kinds, gtype in (("sites_hit", ("Point", "MultiPoint"), "MultiPoint"),
                               ("sites_hit_areas", ("Polygon", "MultiPolygon"), "MultiPolygon")):
        part = [(props, g) for props, g in hit_feats if g.geom_type in kinds]
        if part:
            layers[name] = gpd.GeoDataFrame({k: [props.get(k) for props, _ in part] for k in hit_cols},
                                            geometry=[g for _, g in part], crs="EPSG:4326")
            geometry_types[name] = gtype

    def write(tmp: Path) -> None:
        """Every layer into ``tmp``, in ``crs``, each with its style stored."""
        for name, gdf in layers.items():
            if gdf.crs is None:
                raise OutputError(f"the run's {name} has no CRS in its record; cannot place it on the map")
            if gdf.crs.is_geographic and len(gdf):  # straight lon/lat edges stay right once projected
                gdf = gdf.set_geometry(shapely.segmentize(gdf.geometry.values, 0.01))
            gdf = gdf.to_crs(crs)
            gdf.to_file(tmp, layer=name, driver="GPKG", engine="pyogrio", geometry_type=geometry_types[name],
                        promote_to_multi=True)
            styles.write_layer_style(tmp, name, styles.vector_style(name), name=f"{name} (geo_dino)")

    atomic_write(dst, write, suffix=".gpkg")
    return dst


# ---------------------------------------------------------------------------------------------- project
def discover_layers(run_dir: Path) -> list[MapLayer]:
    """Every map layer of a run folder, by name; ``provenance.json`` outputs that are not here are errors."""
    import json

    run_dir = Path(run_dir)
    record_path = run_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    names = {str(o["path"]).rstrip("/") for o in record.get("outputs", []) if o.get("path")}
    names |= {p.name for p in run_dir.iterdir() if p.suffix in _SUFFIXES and not p.name.startswith(".")}
    layers: list[MapLayer] = []
    for name in sorted(names):
        if Path(name).suffix not in _SUFFIXES or name == CONTEXT:  # features.zarr, stac_item.json, ...
            continue
        path = safe_output_path(run_dir, name)  # refuses symlinks and names leaving the folder
        if not path.is_file():
            raise OutputError(f"the output {name} in provenance.json is missing from {run_dir}; "
                              "rerun finalize_outputs")
        if path.suffix == ".gpkg":
            layers += _vector_layers(run_dir, path, "Search" if path.stem.endswith("_matches") else "Vectors")
            continue
        match = [(g, k) for pattern, g, k in _RASTERS if re.fullmatch(pattern, path.stem)]
        group, kind = match[0] if match else ("Features", "")  # an unknown raster: a min/max stretch
        layers.append(_raster_layer(run_dir, path, group, kind))
    return layers


#: The output shown when a project opens, best first (the newest date of a name): a search the user asked
#: for, a trained head's answer, the label-free change, the k-means classes, the feature PCA.
_SHOWN_FIRST = (r"similarity", r"change_binary", r"seg_classes(_t[12])?", r"change_mask",
                r"classes(_t[12])?", r"pca_rgb(_t[12])?")


def default_visibility(layers: list[MapLayer]) -> list[MapLayer]:
    """Only the most useful output is on when the project opens (:data:`_SHOWN_FIRST`), so no layer hides
    the one that matters; with it the screening context (AOI outline, masked and hit sites), the matches of
    a search, and, under a change overlay (its unchanged pixels are transparent), the newest input image —
    or the newest k-means classes where the inputs are not here. Everything else starts hidden."""
    from dataclasses import replace

    def newest(pattern: str, group: str | None = None) -> MapLayer | None:
        found = sorted((lay for lay in layers if lay.provider == "gdal" and re.fullmatch(pattern, lay.name)
                        and (group is None or lay.group == group)), key=lambda lay: lay.name)
        return found[-1] if found else None

    main = next((lay for pattern in _SHOWN_FIRST if (lay := newest(pattern)) is not None), None)
    shown = {id(lay) for lay in layers if lay.group == "Screening"}
    if main is not None:
        shown.add(id(main))
        if main.group == "Search":
            shown |= {id(lay) for lay in layers if lay.group == "Search" and lay.provider == "ogr"}
        if main.name in ("change_binary", "change_mask"):
            under = newest(r"input.*", "Inputs") or newest(r"classes(_t[12])?", "Classes")
            if under is not None:
                shown.add(id(under))
    return [replace(lay, visible=id(lay) in shown) for lay in layers]


def _maplayer(layer: MapLayer) -> ET.Element:
    vector = layer.provider == "ogr"
    attrs = {"type": "vector" if vector else "raster", "hasScaleBasedVisibilityFlag": "0",
             "minScale": "1e+08", "maxScale": "0", "styleCategories": "AllStyleCategories"}
    if vector:
        attrs |= {"geometry": layer.geometry or "Polygon", "wkbType": layer.wkb_type or "MultiPolygon",
                  "readOnly": "0", "labelsEnabled": "0"}
    el = ET.Element("maplayer", attrs)
    el.append(_extent("extent", layer.extent))
    _sub(el, "id", layer.id)
    _sub(el, "datasource", layer.source)
    _sub(el, "layername", layer.name)
    _sub(el, "srs").append(_spatialrefsys(layer.crs))
    _sub(el, "provider", layer.provider, **({"encoding": "UTF-8"} if vector else {}))
    el.extend(layer.style)
    return el


def _project_tree(layers: list[MapLayer], crs: Any, extent: tuple[float, float, float, float],
                  title: str) -> ET.Element:
    root = ET.Element("qgis", projectname=title, version=styles.QGIS_VERSION)
    _sub(root, "homePath", path="")
    _sub(root, "title", title)
    _sub(_sub(root, "projectCrs"), "spatialrefsys").extend(list(_spatialrefsys(crs)))
    tree = _sub(root, "layer-tree-group")
    _sub(tree, "customproperties")
    for group in GROUPS:
        members = [lay for lay in layers if lay.group == group]
        if not members:
            continue
        g = _sub(tree, "layer-tree-group", name=group, checked="Qt::Checked", expanded="1")
        _sub(g, "customproperties")
        for lay in members:
            node = _sub(g, "layer-tree-layer", id=lay.id, name=lay.name, source=lay.source,
                        providerKey=lay.provider, checked="Qt::Checked" if lay.visible else "Qt::Unchecked",
                        expanded="0", legend_exp="")
            _sub(node, "customproperties")
    _sub(tree, "custom-order", enabled="0")
    canvas = _sub(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    _sub(canvas, "units", "degrees" if crs.is_geographic else "meters")
    canvas.append(_extent("extent", extent))
    _sub(canvas, "rotation", 0)
    _sub(_sub(canvas, "destinationsrs"), "spatialrefsys").extend(list(_spatialrefsys(crs)))
    _sub(canvas, "rendermaptile", 0)
    projectlayers = _sub(root, "projectlayers")
    for lay in layers:
        projectlayers.append(_maplayer(lay))
    props = _sub(root, "properties")
    _sub(_sub(props, "Paths"), "Absolute", "false", type="bool")
    _sub(_sub(props, "SpatialRefSys"), "ProjectionsEnabled", 1, type="int")
    return root


def write_project(run_dir: Path, *, name: str = PROJECT) -> Path:
    """Write ``context.gpkg`` and the QGIS project ``name`` (``run.qgs``) in ``run_dir``; return its path.

    The project CRS and map extent are the output rasters' (which must share one CRS, else
    :class:`CRSMismatchError`); :class:`OutputError` when the run has no output raster or a path would leave
    the run folder.
    """
    import json

    run_dir = Path(run_dir).resolve()
    dst = safe_output_path(run_dir, name)
    if dst.suffix != ".qgs":
        raise OutputError(f"the project name {name!r} must end in .qgs (plain XML, not a .qgz archive)")
    layers = discover_layers(run_dir)
    rasters = [lay for lay in layers if lay.provider == "gdal"]
    if not rasters:
        raise OutputError(f"{run_dir} holds no output raster; write the project after finalize_outputs")
    crs = rasters[0].crs
    for lay in rasters[1:]:
        if lay.crs != crs:
            raise CRSMismatchError(f"{lay.name} is in {lay.crs.to_string()}, {rasters[0].name} in "
                                   f"{crs.to_string()}; a run's outputs must share one CRS")
    record_path = run_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record and (run_dir / SCREENING).exists():  # AOI outline and masked sites
        layers += _vector_layers(run_dir, write_context(run_dir, crs), "Screening")
    layers += _input_layers(run_dir, record)  # after the extent's rasters: an input may cover far more
    layers = default_visibility(layers)
    extent = (min(r.extent[0] for r in rasters), min(r.extent[1] for r in rasters),
              max(r.extent[2] for r in rasters), max(r.extent[3] for r in rasters))
    root = _project_tree(layers, crs, extent, str(record.get("run_id", run_dir.name)))
    ET.indent(root)
    return write_text_atomic(dst, styles.DOCTYPE + ET.tostring(root, encoding="unicode") + "\n")
