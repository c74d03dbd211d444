"""QGIS styles: every piece of QML the package writes, for rasters and for vector layers.

Raster styles are whole QGIS 3 layer-style documents around one ``<rasterrenderer>`` (:func:`qml_document`):
paletted for class rasters (:func:`palette_qml`), a single-band pseudocolour ramp for continuous ones
(:func:`singleband_qml`), multiband colour and single-band grey stretches (:func:`multiband_qml`,
:func:`gray_qml`). :func:`write_qml_palette` and :func:`write_qml_singleband` write the ``.qml`` beside a COG.

Vector styles: a categorized renderer on ``class_value`` for polygons of classes (:func:`layer_style_qml`),
single-symbol styles for the screening context layers (:func:`vector_style`), and :func:`write_layer_style`,
which stores a style in a GeoPackage's ``layer_styles`` table as QGIS's "Save to database" does.

The QGIS project (:mod:`geo_dino.outputs.qgis_project`) embeds these same styles in ``run.qgs``.
"""

from __future__ import annotations

import math
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from geo_dino.errors import ConfigError, OutputError
from geo_dino.files import write_text_atomic

__all__ = ["gray_qml", "layer_style_qml", "make_value_transparent", "multiband_qml", "palette_qml",
           "qml_document", "singleband_qml", "vector_style", "write_layer_style", "write_qml_palette",
           "write_qml_singleband"]

QGIS_VERSION = "3.22.0-Białowieża"
"""The QGIS version every style and project names (the oldest LTR that reads them as written)."""
DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
"""The first line of every QML and ``.qgs`` file."""

#: Colour stops (position in [0, 1], RGB) of a viridis-like ramp for continuous rasters.
_RAMPS: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    "viridis": ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)),
                (0.75, (94, 201, 98)), (1.0, (253, 231, 37))),
    "magma": ((0.0, (0, 0, 4)), (0.25, (81, 18, 124)), (0.5, (183, 55, 121)),
              (0.75, (252, 137, 97)), (1.0, (252, 253, 191))),
}


# --------------------------------------------------------------------------------------------- rasters


def _hex(rgb: tuple[int, ...]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def qml_document(renderer: str) -> str:
    """A complete QGIS 3 raster layer style around one ``<rasterrenderer>`` element."""
    return (
        DOCTYPE
        + f'<qgis version={quoteattr(QGIS_VERSION)} styleCategories="AllStyleCategories" '
        'hasScaleBasedVisibilityFlag="0" minScale="1e+08" maxScale="0">\n'
        "  <flags>\n    <Identifiable>1</Identifiable>\n    <Removable>1</Removable>\n"
        "    <Searchable>1</Searchable>\n    <Private>0</Private>\n  </flags>\n"
        "  <customproperties/>\n"
        "  <pipe>\n"
        "    <provider>\n"
        '      <resampling enabled="false" maxOversampling="2" zoomedInResamplingMethod="nearestNeighbour" '
        'zoomedOutResamplingMethod="nearestNeighbour"/>\n'
        "    </provider>\n"
        + renderer
        + '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" colorizeRed="255" '
        'colorizeGreen="128" colorizeBlue="128" colorizeStrength="100" invertColors="0"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n'
        "    <resamplingStage>resamplingFilter</resamplingStage>\n"
        "  </pipe>\n"
        "  <blendMode>0</blendMode>\n"
        "</qgis>\n"
    )


_MINMAX = ("      <minMaxOrigin>\n        <limits>None</limits>\n        <extent>WholeRaster</extent>\n"
           "        <statAccuracy>Estimated</statAccuracy>\n"
           "        <cumulativeCutLower>0.02</cumulativeCutLower>\n"
           "        <cumulativeCutUpper>0.98</cumulativeCutUpper>\n        <stdDevFactor>2</stdDevFactor>\n"
           "      </minMaxOrigin>\n")


def palette_qml(classes: Sequence[tuple[int, str, tuple[int, ...]]], nodata: int | None) -> str:
    """A QGIS 3 paletted style (``value, label, (r, g, b[, a])`` per class); ``nodata`` is transparent."""
    entries = "".join(
        f"        <paletteEntry value={quoteattr(str(int(v)))} color={quoteattr(_hex(c))} "
        f"alpha={quoteattr(str(int(c[3]) if len(c) > 3 else 255))} label={quoteattr(str(label))}/>\n"
        for v, label, c in classes if nodata is None or int(v) != int(nodata)
    )
    transparency = "      <rasterTransparency/>\n"
    if nodata is not None:
        transparency = ("      <rasterTransparency>\n        <singleValuePixelList>\n"
                        f'          <pixelListEntry min="{int(nodata)}" max="{int(nodata)}" '
                        'percentTransparent="100"/>\n        </singleValuePixelList>\n'
                        "      </rasterTransparency>\n")
    renderer = (
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        + transparency + _MINMAX
        + "      <colorPalette>\n" + entries + "      </colorPalette>\n"
        "    </rasterrenderer>\n"
    )
    return qml_document(renderer)


def singleband_qml(band: int, vmin: float, vmax: float, ramp: str = "viridis") -> str:
    """A QGIS 3 single-band pseudocolour style (interpolated ``ramp`` from ``vmin`` to ``vmax``)."""
    if ramp not in _RAMPS:
        raise OutputError(f"unknown colour ramp {ramp!r}; choose one of {sorted(_RAMPS)}")
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        raise OutputError(f"write_qml_singleband: need finite vmin < vmax, got {vmin}, {vmax}")
    stops = _RAMPS[ramp]

    def rgba(c: tuple[int, int, int]) -> str:
        return f"{c[0]},{c[1]},{c[2]},255"

    inner = ":".join(f"{p:g};{rgba(c)}" for p, c in stops[1:-1])
    props = (f'          <prop k="color1" v="{rgba(stops[0][1])}"/>\n'
             f'          <prop k="color2" v="{rgba(stops[-1][1])}"/>\n'
             '          <prop k="discrete" v="0"/>\n          <prop k="rampType" v="gradient"/>\n'
             f'          <prop k="stops" v="{inner}"/>\n')
    items = "".join(
        f'        <item alpha="255" value="{vmin + p * (vmax - vmin)!r}" '
        f'label={quoteattr(f"{vmin + p * (vmax - vmin):.4g}")} color="{_hex(c)}"/>\n'
        for p, c in stops
    )
    renderer = (
        f'    <rasterrenderer type="singlebandpseudocolor" band="{int(band)}" opacity="1" alphaBand="-1" '
        f'nodataColor="" classificationMin="{vmin!r}" classificationMax="{vmax!r}">\n'
        "      <rasterTransparency/>\n" + _MINMAX
        + "      <rastershader>\n"
        f'        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" '
        f'minimumValue="{vmin!r}" maximumValue="{vmax!r}" labelPrecision="4">\n'
        f'        <colorramp type="gradient" name="[source]">\n{props}        </colorramp>\n'
        + items
        + "        </colorrampshader>\n      </rastershader>\n    </rasterrenderer>\n"
    )
    return qml_document(renderer)


def _stretch(tag: str, lo: float, hi: float) -> str:
    """A ``<tag>`` min/max contrast enhancement (stretch from ``lo`` to ``hi``)."""
    return (f"      <{tag}>\n        <minValue>{lo!r}</minValue>\n"
            f"        <maxValue>{hi!r}</maxValue>\n"
            "        <algorithm>StretchToMinimumMaximum</algorithm>\n"
            f"      </{tag}>\n")


def multiband_qml(red: tuple[int, float, float], green: tuple[int, float, float],
                  blue: tuple[int, float, float]) -> str:
    """A QGIS 3 multiband colour style; ``red``, ``green`` and ``blue`` are each ``(band, min, max)``."""
    channels = (("red", red), ("green", green), ("blue", blue))
    return qml_document(
        f'    <rasterrenderer type="multibandcolor" redBand="{red[0]}" greenBand="{green[0]}" '
        f'blueBand="{blue[0]}" opacity="1" alphaBand="-1" nodataColor="">\n      <rasterTransparency/>\n'
        + "".join(_stretch(f"{colour}ContrastEnhancement", lo, hi) for colour, (_, lo, hi) in channels)
        + "    </rasterrenderer>\n")


def gray_qml(band: int, lo: float, hi: float) -> str:
    """A QGIS 3 single-band grey style, black to white stretched from ``lo`` to ``hi``."""
    return qml_document(
        f'    <rasterrenderer type="singlebandgray" grayBand="{band}" '
        'gradient="BlackToWhite" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency/>\n" + _stretch("contrastEnhancement", lo, hi)
        + "    </rasterrenderer>\n")


def make_value_transparent(pipe: ET.Element, value: int) -> None:
    """Add ``value`` as a fully transparent pixel value to every ``<rasterTransparency>`` under ``pipe``."""
    for transparency in pipe.iter("rasterTransparency"):
        pixels = transparency.find("singleValuePixelList")
        if pixels is None:
            pixels = ET.SubElement(transparency, "singleValuePixelList")
        ET.SubElement(pixels, "pixelListEntry", {"min": str(value), "max": str(value),
                                                 "percentTransparent": "100"})


def write_qml_palette(path: Path, classes: list[tuple[int, str, tuple[int, int, int, int]]],
                      nodata: int | None) -> Path:
    """Write a QGIS 3 paletted style (``value, label, (r, g, b, a)`` per class); ``nodata`` is transparent."""
    return write_text_atomic(Path(path), palette_qml(classes, nodata))


def write_qml_singleband(path: Path, band: int, vmin: float, vmax: float, ramp: str = "viridis") -> Path:
    """Write a QGIS 3 single-band pseudocolour style (interpolated ``ramp`` from ``vmin`` to ``vmax``)."""
    return write_text_atomic(Path(path), singleband_qml(band, vmin, vmax, ramp))


# --------------------------------------------------------------------------------------------- vectors


def _rgba(c: tuple[int, ...]) -> str:
    return ",".join(str(int(v)) for v in (*c[:3], c[3] if len(c) > 3 else 255))


def _fill_symbol(name: str, rgba: tuple[int, ...]) -> str:
    outline = tuple(int(v * 0.6) for v in rgba[:3]) + (255,)
    props = {"color": _rgba(rgba), "joinstyle": "bevel", "offset": "0,0", "offset_unit": "MM",
             "outline_color": _rgba(outline), "outline_style": "solid", "outline_width": "0.26",
             "outline_width_unit": "MM", "style": "solid"}
    options = "".join(f'          <Option name={quoteattr(k)} type="QString" value={quoteattr(v)}/>\n'
                      for k, v in props.items())
    legacy = "".join(f"        <prop k={quoteattr(k)} v={quoteattr(v)}/>\n" for k, v in props.items())
    return (f'    <symbol name={quoteattr(name)} type="fill" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            '      <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n'
            f'        <Option type="Map">\n{options}        </Option>\n{legacy}'
            "      </layer>\n    </symbol>\n")


def layer_style_qml(classes: list[tuple[int, str, tuple[int, ...]]]) -> str:
    """A QGIS 3 vector style: categorized renderer on ``class_value``, one solid fill per class.

    ``classes`` is ``[(value, name, (r, g, b[, a])), ...]`` (e.g. ``ClassTable.qml_classes()``); the names are
    the legend labels.
    """
    if not classes:
        raise ConfigError("layer_style_qml needs at least one (value, name, rgba) class")
    cats = "".join(f"      <category render=\"true\" value={quoteattr(str(int(v)))} symbol=\"{k}\" "
                   f"label={quoteattr(str(name))}/>\n" for k, (v, name, _) in enumerate(classes))
    symbols = "".join(_fill_symbol(str(k), c) for k, (_, _, c) in enumerate(classes))
    return (DOCTYPE
            + f'<qgis version={quoteattr(QGIS_VERSION)} styleCategories="AllStyleCategories">\n'
            '  <renderer-v2 type="categorizedSymbol" attr="class_value" symbollevels="0" enableorderby="0" '
            'forceraster="0">\n'
            f"    <categories>\n{cats}    </categories>\n"
            f"    <symbols>\n{symbols}    </symbols>\n"
            "    <rotation/>\n    <sizescale/>\n"
            "  </renderer-v2>\n"
            "  <blendMode>0</blendMode>\n  <featureBlendMode>0</featureBlendMode>\n"
            "  <layerGeometryType>2</layerGeometryType>\n"
            "</qgis>\n")


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: Any) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def _symbol(*fills: dict[str, str], name: str = "0") -> ET.Element:
    """A QGIS fill ``<symbol>`` of ``SimpleFill`` symbol layers (QGIS property names and values)."""
    sym = ET.Element("symbol", {"type": "fill", "name": name, "alpha": "1", "clip_to_extent": "1",
                                "force_rhr": "0"})
    for props in fills:
        layer = _sub(sym, "layer", **{"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
        opts = _sub(layer, "Option", type="Map")
        base = {"color": "0,0,0,0", "outline_color": "0,0,0,255", "outline_style": "solid",
                "outline_width": "0.26", "outline_width_unit": "MM", "style": "solid", "joinstyle": "miter",
                "offset": "0,0", "offset_unit": "MM"}
        for k, v in (base | props).items():
            _sub(opts, "Option", name=k, value=v, type="QString")
    return sym


def _marker(props: dict[str, str], name: str = "0") -> ET.Element:
    """A QGIS marker ``<symbol>`` of one ``SimpleMarker`` symbol layer."""
    sym = ET.Element("symbol", {"type": "marker", "name": name, "alpha": "1", "clip_to_extent": "1",
                                "force_rhr": "0"})
    layer = _sub(sym, "layer", **{"class": "SimpleMarker", "enabled": "1", "locked": "0", "pass": "0"})
    opts = _sub(layer, "Option", type="Map")
    base = {"name": "star", "color": "255,255,255,255", "outline_color": "0,0,0,255",
            "outline_style": "solid", "outline_width": "0.4", "outline_width_unit": "MM", "size": "4.5",
            "size_unit": "MM", "angle": "0", "offset": "0,0", "offset_unit": "MM", "joinstyle": "miter",
            "scale_method": "diameter"}
    for k, v in (base | props).items():
        _sub(opts, "Option", name=k, value=v, type="QString")
    return sym


def _vector_qml(*fills: dict[str, str], marker: dict[str, str] | None = None) -> str:
    """A QGIS 3 vector layer style (single fill symbol, or ``marker`` for points) as a QML document."""
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories")
    renderer = _sub(root, "renderer-v2", type="singleSymbol", symbollevels="0", forceraster="0",
                    enableorderby="0")
    _sub(renderer, "symbols").append(_marker(marker) if marker is not None else _symbol(*fills))
    _sub(root, "blendMode", 0)
    _sub(root, "featureBlendMode", 0)
    _sub(root, "layerOpacity", 1)
    return DOCTYPE + ET.tostring(root, encoding="unicode")


#: Styles of the screening context layers and the tile index, by layer name; ``""``: any other layer.
_VECTOR_STYLES: dict[str, str] = {
    "aoi": _vector_qml({"style": "no", "outline_color": "20,20,20,255", "outline_width": "0.8"}),
    "masked_sites": _vector_qml(  # semi-transparent red under a red diagonal hatch
        {"color": "220,30,30,90", "outline_color": "200,0,0,255", "outline_width": "0.5"},
        {"color": "200,0,0,255", "style": "b_diagonal", "outline_style": "no"}),
    # every site the screen hit, whatever its action: white stars, and orange dashed outlines for areas
    "sites_hit": _vector_qml(marker={}),
    "sites_hit_areas": _vector_qml({"style": "no", "outline_color": "230,120,0,255", "outline_width": "0.6",
                                    "outline_style": "dash"}),
    "tiles": _vector_qml({"style": "no", "outline_color": "90,90,90,200", "outline_width": "0.15"}),
    # the places a search by example found: cyan circles, black outline
    "matches": _vector_qml(marker={"name": "circle", "color": "0,230,230,255", "size": "3.5"}),
    "": _vector_qml({"color": "255,255,255,40", "outline_color": "40,40,40,255", "outline_width": "0.3"}),
}


def vector_style(layer: str) -> str:
    """The QML of a context layer (``aoi``, ``masked_sites``, ``sites_hit``, ``sites_hit_areas``, ``tiles``)
    or of a search's ``matches``;
    a thin grey outline over a faint white fill for any other layer name."""
    return _VECTOR_STYLES.get(layer, _VECTOR_STYLES[""])


#: The table as QGIS creates it through GDAL's GPKG driver (QgsOgrUtils::saveStyle: FID ``id``, field widths
#: 256/30, ``useAsDefault`` boolean, ``update_time`` defaulting to CURRENT_TIMESTAMP), in GDAL's SQL.
_LAYER_STYLES_SQL = (
    'CREATE TABLE IF NOT EXISTS "layer_styles" ( "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
    '"f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" TEXT(256), '
    '"f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, "styleSLD" TEXT, '
    '"useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30), '
    "\"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ','now')"
#: The ``description`` of every stored style (the same text in GeoPackages written before and since).
_STYLE_DESCRIPTION = "written by geo_dino.outputs.vectorize"


def write_layer_style(gpkg: Path, layer: str, qml: str, *, name: str | None = None,
                      use_as_default: bool = True) -> None:
    """Store ``qml`` for ``layer`` in the GeoPackage's ``layer_styles`` table, as QGIS's "Save to database".

    The table is created if missing and registered in ``gpkg_contents`` as ``attributes`` (and in
    ``gpkg_ogr_contents`` with an unknown count, which GDAL recounts). A style of the same ``name`` (default:
    the layer name) is replaced; with ``use_as_default`` other default styles of the layer are unset, so QGIS
    applies this one when the layer is loaded. One SQLite transaction.
    """
    gpkg = Path(gpkg)
    if gpkg.is_symlink() or not gpkg.is_file():
        raise OutputError(f"{gpkg} is not a GeoPackage file (missing or a symlink)")
    style_name = name or layer
    con = sqlite3.connect(gpkg)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"gpkg_contents", "gpkg_geometry_columns"} <= tables:
            raise OutputError(f"{gpkg} is not a GeoPackage (no gpkg_contents/gpkg_geometry_columns table)")
        row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE lower(table_name) = lower(?)",
                          (layer,)).fetchone()
        if row is None:
            raise OutputError(f"{gpkg} has no feature layer {layer!r} to style")
        with con:
            con.execute(_LAYER_STYLES_SQL)
            con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, "
                        "description, last_change, srs_id) "
                        f"VALUES ('layer_styles', 'attributes', 'layer_styles', '', {_NOW}, 0)")
            if "gpkg_ogr_contents" in tables:
                con.execute("INSERT OR IGNORE INTO gpkg_ogr_contents (table_name, feature_count) "
                            "VALUES ('layer_styles', NULL)")
            key = (layer, row[0])
            if use_as_default:
                con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_schema = '' AND "
                            "f_table_name = ? AND f_geometry_column = ?", key)
            values = (qml, "", 1 if use_as_default else 0, _STYLE_DESCRIPTION)
            cur = con.execute(f"UPDATE layer_styles SET styleQML = ?, styleSLD = ?, useAsDefault = ?, "
                              f"description = ?, update_time = {_NOW} WHERE f_table_schema = '' AND "
                              "f_table_name = ? AND f_geometry_column = ? AND styleName = ?",
                              (*values, *key, style_name))
            if cur.rowcount == 0:
                con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, "
                            "owner) "
                            "VALUES ('', '', ?, ?, ?, ?, ?, ?, ?, '')", (*key, style_name, *values))
            con.execute(f"UPDATE gpkg_contents SET last_change = {_NOW} WHERE table_name = 'layer_styles'")
    except sqlite3.Error as exc:
        raise OutputError(f"cannot store the style of {layer!r} in {gpkg}: {exc}") from None
    finally:
        con.close()
