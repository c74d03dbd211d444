"""Tests of geo_dino.inputs.aoi: RFC 7946 AOI validation against hostile input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod, Transformer
from shapely.geometry import MultiPolygon, Point, Polygon, box

from geo_dino.config import AOIOptions
from geo_dino.errors import AOIError, GeoDinoError
from geo_dino.inputs.aoi import AOI, geodesic_area_m2, load_aoi, validate_geojson

ROOT = Path(__file__).resolve().parents[1]

SQUARE = [[[-77.6, 24.9], [-77.2, 24.9], [-77.2, 25.2], [-77.6, 25.2], [-77.6, 24.9]]]
OTHER = [[[-78.2, 24.4], [-77.9, 24.4], [-77.9, 24.7], [-78.2, 24.7], [-78.2, 24.4]]]


def poly(coords=SQUARE) -> dict:
    return {"type": "Polygon", "coordinates": coords}


def feature(geometry, **extra) -> dict:
    return {"type": "Feature", "properties": {"name": "t"}, "geometry": geometry, **extra}


def write(tmp_path: Path, obj_or_text, name: str = "aoi.geojson") -> Path:
    p = tmp_path / name
    if isinstance(obj_or_text, bytes):
        p.write_bytes(obj_or_text)
    else:
        p.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
    return p


# ------------------------------------------------------------------------------------------ accepted types


def test_polygon_loads_from_file(tmp_path):
    p = write(tmp_path, poly())
    aoi = load_aoi(p)
    assert isinstance(aoi, AOI)
    assert isinstance(aoi.geometry, Polygon)
    assert aoi.source == str(p)
    assert aoi.crs == "EPSG:4326"
    assert aoi.n_vertices == 5
    assert aoi.repaired is False and aoi.area_change is None
    assert aoi.bounds() == pytest.approx((-77.6, 24.9, -77.2, 25.2))
    assert aoi.geometry.exterior.is_ccw  # right-hand rule


def test_multipolygon_loads():
    aoi = load_aoi({"type": "MultiPolygon", "coordinates": [SQUARE, OTHER]})
    assert isinstance(aoi.geometry, MultiPolygon)
    assert len(aoi.geometry.geoms) == 2
    assert aoi.n_vertices == 10
    assert aoi.source == "<object>"


def test_feature_loads():
    aoi = load_aoi(feature(poly()))
    assert aoi.geometry.equals(Polygon(SQUARE[0]))


def test_feature_collection_is_union_of_features():
    overlapping = [[[-77.4, 25.0], [-77.0, 25.0], [-77.0, 25.3], [-77.4, 25.3], [-77.4, 25.0]]]
    fc = {"type": "FeatureCollection",
          "features": [feature(poly()), feature(poly(overlapping)),
                       feature({"type": "MultiPolygon", "coordinates": [OTHER]})]}
    aoi = load_aoi(fc)
    expected = shapely.union_all([Polygon(SQUARE[0]), Polygon(overlapping[0]), Polygon(OTHER[0])])
    assert aoi.geometry.equals(expected)
    assert aoi.n_vertices == 15


def test_3d_positions_ignore_z():
    coords = [[[x, y, 12.5] for x, y in SQUARE[0]]]
    aoi = load_aoi(poly(coords))
    assert not aoi.geometry.has_z
    assert aoi.geometry.equals(Polygon(SQUARE[0]))


def test_polygon_with_hole_keeps_hole():
    hole = [[-77.5, 25.0], [-77.5, 25.1], [-77.3, 25.1], [-77.3, 25.0], [-77.5, 25.0]]
    aoi = load_aoi(poly(SQUARE + [hole]))
    assert len(aoi.geometry.interiors) == 1
    assert aoi.geometry.area == pytest.approx(0.4 * 0.3 - 0.2 * 0.1)


def test_validate_geojson_returns_geometry_and_info():
    geom, info = validate_geojson(poly())
    assert geom.equals(Polygon(SQUARE[0]))
    assert info["type"] == "Polygon"
    assert info["n_vertices"] == 5
    assert info["repaired"] is False and info["area_change"] is None
    assert info["antimeridian"] is False


def test_aoi_error_is_geo_dino_error_and_value_error():
    with pytest.raises(GeoDinoError):
        load_aoi({"type": "Point", "coordinates": [0, 0]})
    with pytest.raises(ValueError):
        load_aoi({"type": "Point", "coordinates": [0, 0]})


# ------------------------------------------------------------------------------------------ refused types


@pytest.mark.parametrize("obj", [
    {"type": "Point", "coordinates": [-77.3, 25.0]},
    {"type": "LineString", "coordinates": [[-77.3, 25.0], [-77.2, 25.1]]},
    {"type": "GeometryCollection", "geometries": [poly()]},
    feature({"type": "Point", "coordinates": [-77.3, 25.0]}),
])
def test_non_polygonal_refused(obj):
    with pytest.raises(AOIError, match="only polygonal AOIs are accepted"):
        load_aoi(obj)


def test_unknown_type_refused():
    with pytest.raises(AOIError, match="only polygonal AOIs are accepted"):
        load_aoi({"type": "Circle", "coordinates": [0, 0]})


def test_top_level_array_refused(tmp_path):
    with pytest.raises(AOIError, match="must be a GeoJSON object"):
        load_aoi(write(tmp_path, "[1, 2]"))


def test_null_geometry_refused():
    with pytest.raises(AOIError, match="null geometry"):
        load_aoi(feature(None))


def test_empty_coordinates_refused():
    with pytest.raises(AOIError, match="empty coordinates"):
        load_aoi(poly([]))
    with pytest.raises(AOIError, match="empty coordinates"):
        load_aoi({"type": "MultiPolygon", "coordinates": []})
    with pytest.raises(AOIError, match="has no rings"):
        load_aoi({"type": "MultiPolygon", "coordinates": [[]]})


def test_empty_feature_collection_refused():
    with pytest.raises(AOIError, match="has no features"):
        load_aoi({"type": "FeatureCollection", "features": []})


def test_zero_area_polygon_refused():
    flat = [[[0, 0], [1, 0], [2, 0], [0, 0]]]
    with pytest.raises(AOIError, match="not a valid polygon"):
        load_aoi(poly(flat))


@pytest.mark.parametrize("where", ["top", "feature", "geometry"])
def test_crs_member_refused(where):
    named = {"type": "name", "properties": {"name": "EPSG:32618"}}
    if where == "top":
        obj = {"type": "FeatureCollection", "crs": named, "features": [feature(poly())]}
    elif where == "feature":
        obj = {"type": "FeatureCollection", "features": [feature(poly(), crs=named)]}
    else:
        obj = {**poly(), "crs": named}
    with pytest.raises(AOIError, match="'crs' member naming 'EPSG:32618'.*RFC 7946.*-lco RFC7946=YES"):
        load_aoi(obj)
    # what QGIS and GDAL write for EPSG:4326 data: OGC CRS84, RFC 7946's own CRS, accepted
    for name in ("urn:ogc:def:crs:OGC:1.3:CRS84", "urn:ogc:def:crs:OGC::CRS84", "OGC:CRS84"):
        crs84 = {"type": "name", "properties": {"name": name}}
        ok = (({"type": "FeatureCollection", "crs": crs84, "features": [feature(poly())]} if where == "top"
               else {"type": "FeatureCollection", "features": [feature(poly(), crs=crs84)]})
              if where != "geometry" else {**poly(), "crs": crs84})
        assert load_aoi(ok).geometry.area > 0


def test_duplicate_keys_and_rings_closed_in_only_two_ordinates_are_refused(tmp_path):
    """A second "coordinates" would silently replace the first polygon; [100, 0] ... [100, 0, 4.9] is not a
    closed ring."""
    text = ('{"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]], '
            '"coordinates": [[[50,50],[51,50],[51,51],[50,50]]]}')
    path = tmp_path / "twice.geojson"
    path.write_text(text)
    with pytest.raises(AOIError, match="'coordinates' appears twice"):
        load_aoi(path)
    open_ring = {"type": "Polygon", "coordinates": [[[100, 0], [101, 0], [101, 1], [100, 0, 4.9]]]}
    with pytest.raises(AOIError, match="not closed.*every ordinate"):
        load_aoi(open_ring)
    closed_3d = {"type": "Polygon", "coordinates": [[[100, 0, 1], [101, 0, 1], [101, 1, 1], [100, 0, 1.0]]]}
    assert load_aoi(closed_3d).geometry.area > 0


# ------------------------------------------------------------------------------------------ coordinates


def test_longitude_out_of_range():
    bad = [[[-190.0, 0], [-170, 0], [-170, 10], [-190.0, 10], [-190.0, 0]]]
    with pytest.raises(AOIError, match=r"longitude -190.0 is out of range \[-180, 180\]"):
        load_aoi(poly(bad))


def test_latitude_out_of_range_hints_swapped_axes():
    # Tokyo as lat,lon
    swapped = [[[35.6, 139.7], [35.7, 139.7], [35.7, 139.8], [35.6, 139.8], [35.6, 139.7]]]
    with pytest.raises(AOIError,
                       match="latitude 139.7 out of range.*are the axes swapped\\? GeoJSON is lon,lat"):
        load_aoi(poly(swapped))


def test_projected_coordinates_detected():
    utm = [[[250000.0, 2760000.0], [260000, 2760000], [260000, 2770000], [250000, 2770000],
            [250000.0, 2760000.0]]]
    with pytest.raises(AOIError,
                       match=r"coordinates look projected \(metres\?\), AOIs must be WGS84 lon/lat"):
        load_aoi(poly(utm))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_refused(tmp_path, literal):
    text = ('{"type": "Polygon", "coordinates": [[[' + literal + ', 24.9], [-77.2, 24.9], [-77.2, 25.2], '
            '[-77.6, 25.2], [-77.6, 24.9]]]}')
    with pytest.raises(AOIError, match=f"{literal} is not valid JSON"):
        load_aoi(write(tmp_path, text))


def test_overflowing_number_refused(tmp_path):
    text = ('{"type": "Polygon", "coordinates": [[[1e400, 24.9], [-77.2, 24.9], [-77.2, 25.2], '
            '[-77.6, 25.2], [-77.6, 24.9]]]}')  # json parses 1e400 as inf without calling parse_constant
    with pytest.raises(AOIError, match="non-finite value"):
        load_aoi(write(tmp_path, text))


def test_nan_in_memory_refused():
    coords = [[[float("nan"), 24.9], [-77.2, 24.9], [-77.2, 25.2], [-77.6, 25.2], [-77.6, 24.9]]]
    with pytest.raises(AOIError, match="non-finite value"):
        load_aoi(poly(coords))


@pytest.mark.parametrize("position,match", [
    ([True, 24.9], "non-numeric value True"),
    (["-77.6", 24.9], "non-numeric value '-77.6'"),
    ([-77.6], r"must be \[longitude, latitude\]"),
    ([-77.6, 24.9, 0, 0], r"must be \[longitude, latitude\]"),
])
def test_bad_positions_refused(position, match):
    coords = [[position, [-77.2, 24.9], [-77.2, 25.2], [-77.6, 25.2], position]]
    with pytest.raises(AOIError, match=match):
        load_aoi(poly(coords))


# ------------------------------------------------------------------------------------------ rings


def test_unclosed_ring_refused_not_auto_closed():
    open_ring = [SQUARE[0][:-1] + [[-77.6, 25.0]]]
    with pytest.raises(AOIError, match="ring 1 of polygon 1 .* is not closed"):
        load_aoi(poly(open_ring))


def test_unclosed_hole_named_by_ring_and_polygon_number():
    hole = [[-77.5, 25.0], [-77.5, 25.1], [-77.3, 25.1], [-77.3, 25.0]]
    with pytest.raises(AOIError, match="ring 2 of polygon 2 .* is not closed"):
        load_aoi({"type": "MultiPolygon", "coordinates": [OTHER, SQUARE + [hole]]})


def test_too_few_positions_refused():
    with pytest.raises(AOIError, match="has 3 positions; a linear ring needs at least 4"):
        load_aoi(poly([[[0, 0], [1, 0], [0, 0]]]))


# ------------------------------------------------------------------------------------------ validity


BOWTIE = [[[0.0, 0.0], [2.0, 2.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]  # asymmetric lobes


def test_self_intersection_refused_with_reason():
    with pytest.raises(AOIError, match="not a valid polygon \\(Self-intersection.*repair: true"):
        load_aoi(poly(BOWTIE))


def test_self_intersection_repaired_when_asked():
    aoi = load_aoi(poly(BOWTIE), AOIOptions(repair=True))
    assert aoi.repaired is True
    assert aoi.geometry.is_valid and aoi.geometry.area > 0
    original = Polygon(BOWTIE[0]).area  # GEOS' signed-lobe area of the invalid ring
    assert aoi.area_change == pytest.approx(abs(aoi.geometry.area - original) / original)
    assert aoi.area_change > 0
    record = aoi.to_record()
    assert record["repaired"] is True and record["area_change"] == pytest.approx(aoi.area_change)


def test_symmetric_bowtie_repair_records_infinite_change():
    sym = [[[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]  # lobes cancel: zero net area
    aoi = load_aoi(poly(sym), AOIOptions(repair=True))
    assert aoi.repaired and aoi.area_change == math.inf
    assert aoi.geometry.area == pytest.approx(0.5)
    assert aoi.to_record()["area_change"] == "inf"
    json.dumps(aoi.to_record(), allow_nan=False)


def test_overlapping_multipolygon_parts_refused():
    with pytest.raises(AOIError, match="not a valid polygon"):
        load_aoi({"type": "MultiPolygon", "coordinates": [SQUARE, SQUARE]})


# ------------------------------------------------------------------------------------------ limits


def test_missing_file_refused(tmp_path):
    with pytest.raises(AOIError, match="AOI file not found"):
        load_aoi(tmp_path / "nope.geojson")


def test_directory_refused(tmp_path):
    with pytest.raises(AOIError, match="not a regular file"):
        load_aoi(tmp_path)


def test_oversized_file_refused_before_reading(tmp_path, monkeypatch):
    p = write(tmp_path, poly())
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    with pytest.raises(AOIError, match=r"over the limit of 50 .*max_bytes"):
        load_aoi(p, AOIOptions(max_bytes=50))
    assert opened == []


def test_non_utf8_refused(tmp_path):
    data = json.dumps(feature(poly(), properties={"name": "Andrós"}), ensure_ascii=False).encode("latin-1")
    with pytest.raises(AOIError, match="not UTF-8"):
        load_aoi(write(tmp_path, data))


def test_utf8_bom_accepted(tmp_path):
    aoi = load_aoi(write(tmp_path, b"\xef\xbb\xbf" + json.dumps(poly()).encode()))
    assert aoi.n_vertices == 5


def test_invalid_json_refused(tmp_path):
    with pytest.raises(AOIError, match="not valid JSON.*line 1"):
        load_aoi(write(tmp_path, '{"type": "Polygon", "coordinates": [[[0, 0], '))


def test_vertex_budget():
    with pytest.raises(AOIError, match="more than 4 vertices.*max_vertices"):
        load_aoi(poly(), AOIOptions(max_vertices=4))
    assert load_aoi(poly(), AOIOptions(max_vertices=5)).n_vertices == 5


def test_deep_nesting_refused_in_file(tmp_path):
    nested = '{"type": "Polygon", "coordinates": ' + "[" * 30 + "]" * 30 + "}"
    with pytest.raises(AOIError, match="nested deeper than 20 levels"):
        load_aoi(write(tmp_path, nested))


def test_extreme_nesting_does_not_crash_parser(tmp_path):
    nested = "[" * 200_000 + "]" * 200_000
    with pytest.raises(AOIError, match="nested"):
        load_aoi(write(tmp_path, nested), AOIOptions(max_bytes=1_000_000))


def test_deep_nesting_refused_in_memory_and_in_properties():
    deep: list = []
    for _ in range(50):
        deep = [deep]
    with pytest.raises(AOIError, match="nested deeper than 20 levels"):
        load_aoi(feature(poly(), properties={"x": deep}))
    with pytest.raises(AOIError, match="nested deeper than 20 levels"):
        validate_geojson(feature(poly(), properties={"x": deep}))


# ------------------------------------------------------------------------------------------ antimeridian


def test_unsplit_antimeridian_polygon_is_split():
    ring = [[170.0, -10.0], [-170.0, -10.0], [-170.0, 10.0], [170.0, 10.0], [170.0, -10.0]]
    geom, info = validate_geojson(poly([ring]))
    assert info["antimeridian"] is True
    assert isinstance(geom, MultiPolygon) and len(geom.geoms) == 2
    xy = shapely.get_coordinates(geom)
    assert xy[:, 0].min() >= -180 and xy[:, 0].max() <= 180
    assert {round(p.bounds[0]) for p in geom.geoms} == {-180, 170}
    aoi = load_aoi(poly([ring]))
    unsplit = Polygon([(170, -10), (190, -10), (190, 10), (170, 10)])  # the same shape in unwrapped lon
    assert aoi.area_m2() == pytest.approx(geodesic_area_m2(unsplit), rel=1e-6)
    # and matches pyproj directly on the densified, unwrapped ring
    lon, lat = shapely.segmentize(unsplit, 0.01).exterior.xy
    assert aoi.area_m2() == pytest.approx(abs(Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0]),
                                          rel=1e-6)


def test_properly_split_antimeridian_multipolygon_passes():
    east = [[[170.0, 0.0], [180.0, 0.0], [180.0, 10.0], [170.0, 10.0], [170.0, 0.0]]]
    west = [[[-180.0, 0.0], [-170.0, 0.0], [-170.0, 10.0], [-180.0, 10.0], [-180.0, 0.0]]]
    geom, info = validate_geojson({"type": "MultiPolygon", "coordinates": [east, west]})
    assert info["antimeridian"] is False
    assert isinstance(geom, MultiPolygon) and len(geom.geoms) == 2
    assert geom.bounds == (-180.0, 0.0, 180.0, 10.0)


# --------------------------------------------------------------------------------------- reprojection, record


def test_to_crs_utm_matches_pyproj():
    aoi = load_aoi(poly())
    utm = aoi.to_crs("EPSG:32618")
    assert utm.is_valid and not utm.is_empty
    t = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)
    ex, ey = t.transform(-77.6, 24.9)
    xy = shapely.get_coordinates(utm)
    assert np.min(np.hypot(xy[:, 0] - ex, xy[:, 1] - ey)) < 1e-6  # the corner is a vertex of the result
    assert 200_000 < ex < 300_000 and 2_700_000 < ey < 2_800_000  # east of the zone's false easting origin
    assert utm.contains(Point(t.transform(-77.4, 25.05)))
    back = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    round_trip = shapely.transform(utm, lambda a: np.column_stack(back.transform(a[:, 0], a[:, 1])))
    assert round_trip.hausdorff_distance(aoi.geometry) < 1e-6
    assert utm.area == pytest.approx(aoi.area_m2(), rel=2e-3)  # UTM scale error is small this near the zone


def test_to_crs_densifies_edges():
    aoi = load_aoi(poly())
    assert len(shapely.get_coordinates(aoi.to_crs("EPSG:3857"))) > 5 * 10


def test_to_crs_outside_area_of_use_refused():
    aoi = load_aoi(poly([[[170.0, -10.0], [-170.0, -10.0], [-170.0, 10.0], [170.0, 10.0], [170.0, -10.0]]]))
    with pytest.raises(AOIError, match="does not project to finite coordinates in EPSG:32618"):
        aoi.to_crs("EPSG:32618")


def test_to_crs_unknown_crs_refused():
    with pytest.raises(AOIError, match="unknown CRS"):
        load_aoi(poly()).to_crs("EPSG:999999")


def test_sha256_of_file_bytes_and_canonical_object(tmp_path):
    import hashlib

    text = json.dumps(poly(), indent=2)
    p = write(tmp_path, text)
    a, b = load_aoi(p), load_aoi(p)
    assert a.sha256 == b.sha256 == hashlib.sha256(text.encode()).hexdigest()
    obj = poly()
    reordered = {"coordinates": obj["coordinates"], "type": obj["type"]}
    assert load_aoi(obj).sha256 == load_aoi(reordered).sha256 == hashlib.sha256(
        json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert load_aoi(poly(OTHER)).sha256 != load_aoi(obj).sha256


def test_to_record_is_json():
    aoi = load_aoi(poly())
    rec = json.loads(json.dumps(aoi.to_record(), allow_nan=False))
    assert set(rec) >= {"sha256", "source", "n_vertices", "bounds", "area_m2", "repaired", "area_change",
                        "geometry"}
    assert rec["geometry"]["type"] == "Polygon"
    assert rec["bounds"] == pytest.approx([-77.6, 24.9, -77.2, 25.2])
    assert rec["area_m2"] == pytest.approx(aoi.area_m2())
    assert 1.3e9 < rec["area_m2"] < 1.4e9  # ~40.4 km × 33.3 km at 25° N


# ------------------------------------------------------------------------------------------ demo AOIs


def _raster(relative: str) -> Path:
    """A raster bundled in the repository (data/SHA256SUMS lists them); missing is a failure, not a skip."""
    p = ROOT / relative
    assert p.is_file(), f"bundled raster missing: {p}"
    return p


BAHAMAS = "data/rasters/landsat7_bahamas_RGB.byte.tif"
PUCALLPA = "data/rasters/pucallpa/landsat_pucallpa_1985.tif"


@pytest.mark.parametrize("name,raster", [
    ("bahamas_andros", BAHAMAS), ("bahamas_nassau", BAHAMAS), ("pucallpa", PUCALLPA)])
def test_demo_aois_load_and_overlap_their_rasters(name, raster):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.warp import transform_bounds

    doc = json.loads((ROOT / "aoi" / f"{name}.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 1
    assert doc["features"][0]["properties"]["name"]
    aoi = load_aoi(ROOT / "aoi" / f"{name}.geojson")
    with rasterio.open(_raster(raster)) as ds:
        footprint = box(*transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
    assert aoi.geometry.intersects(footprint)
    assert footprint.contains(aoi.geometry)


def test_demo_andros_excludes_nassau_and_nassau_covers_airport():
    andros = load_aoi(ROOT / "aoi" / "bahamas_andros.geojson")
    nassau = load_aoi(ROOT / "aoi" / "bahamas_nassau.geojson")
    airport, downtown = Point(-77.466, 25.039), Point(-77.35, 25.05)
    assert not andros.geometry.contains(downtown) and not andros.geometry.contains(airport)
    assert not andros.geometry.intersects(nassau.geometry)
    assert nassau.geometry.contains(airport) and nassau.geometry.contains(downtown)
    assert 3e9 < andros.area_m2() < 1e10  # 60-100 km across
    assert 4e8 < nassau.area_m2() < 9e8  # ~30 × 20 km


@pytest.mark.parametrize("ext", ["gpkg", "shp"])
def test_geopackage_and_shapefile_aois_are_reprojected_and_recorded(tmp_path, ext):
    """An AOI drawn in QGIS and saved as a GeoPackage or a Shapefile in a projected CRS: reprojected to
    EPSG:4326, merged, validated like GeoJSON, and the source says so."""
    import geopandas as gpd
    from shapely.geometry import box

    ref = load_aoi(ROOT / "aoi/pucallpa.geojson")
    utm = gpd.GeoDataFrame({"name": ["west", "east"]}, crs="EPSG:4326",
                           geometry=[box(*ref.geometry.bounds).buffer(0)] * 2).to_crs("EPSG:32718")
    path = tmp_path / f"drawn.{ext}"
    utm.to_file(path, driver="GPKG" if ext == "gpkg" else "ESRI Shapefile")
    aoi = load_aoi(path)
    assert "reprojected from EPSG:32718 to EPSG:4326" in aoi.source and "2 feature(s)" in aoi.source
    assert aoi.geometry.symmetric_difference(box(*ref.geometry.bounds)).area < 1e-6
    assert aoi.to_record()["sha256"] == aoi.sha256 and len(aoi.sha256) == 64


def test_vector_aois_fail_clearly(tmp_path):
    import geopandas as gpd
    from shapely.geometry import Point, box

    lines = tmp_path / "points.gpkg"
    gpd.GeoDataFrame(geometry=[Point(0, 0)], crs="EPSG:4326").to_file(lines, driver="GPKG")
    with pytest.raises(AOIError, match="polygons only"):
        load_aoi(lines)
    fake = tmp_path / "fake.gpkg"
    fake.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(AOIError, match="fake.gpkg"):
        load_aoi(fake)
    two = tmp_path / "two.gpkg"
    gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs="EPSG:4326").to_file(two, layer="a", driver="GPKG")
    gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs="EPSG:4326").to_file(two, layer="b", driver="GPKG")
    with pytest.raises(AOIError, match="2 layers"):
        load_aoi(two)
