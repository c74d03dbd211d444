"""Sensitive-site screening: shipped registry and policy on real places, metric buffers, failing closed."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from pyproj import Geod, Transformer
from shapely.geometry import Point, box, shape

from geo_dino.config import Approval
from geo_dino.errors import AOIError, ConfigError, RunRefused, ScreeningError
from geo_dino.governance.screening import (
    ACTIONS,
    Decision,
    enforce,
    load_policy,
    load_registry,
    screen,
    write_decision,
)

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "data" / "registry" / "sensitive_sites.gpkg"
POLICY = REPO / "configs" / "screening_policy.yaml"
BAHAMAS = REPO / "data" / "rasters" / "landsat7_bahamas_RGB.byte.tif"  # bundled
GEOD = Geod(ellps="WGS84")

NEW_PROVIDENCE = box(-77.56, 24.98, -77.25, 25.10)
NORTH_DAKOTA = box(-99.1, 46.9, -98.9, 47.1)
CFB_EDMONTON = (-113.47884, 53.67492)  # Natural Earth airport typed "military major"
NASSAU_AIRPORT = (-77.466, 25.039)  # Lynden Pindling International, approximate


@pytest.fixture(scope="module")
def registry():
    return load_registry(REGISTRY)


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY)


def _tiny_registry(path: Path, lon: float, lat: float, category: str = "test_site",
                   crs: str = "EPSG:4326") -> Path:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame({"site_id": ["t:1"], "name": ["Test site"], "category": [category]},
                           geometry=[Point(lon, lat)], crs="EPSG:4326")
    if crs != "EPSG:4326":
        gdf = gdf.to_crs(crs)
    gdf.to_file(path, layer="sites", driver="GPKG")
    return _vouch(path)


def _vouch(path: Path) -> Path:
    """Write the registry's ``.sha256`` sidecar, as scripts/build_registry.py does."""
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  "
                                                     f"{path.name}\n")
    return path


def _policy_file(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def _rule_policy(tmp_path: Path, action: str, buffer_m: float, category: str = "test_site") -> Path:
    return _policy_file(tmp_path / f"policy_{action}_{buffer_m}.yaml",
                        f"version: 1\ndefault: {{action: record, buffer_m: 0}}\ncategories:\n"
                        f"  {category}: {{action: {action}, buffer_m: {buffer_m}}}\n")


def _offset(lon: float, lat: float, azimuth: float, metres: float) -> tuple[float, float]:
    x, y, _ = GEOD.fwd(lon, lat, azimuth, metres)
    return x, y


# -------------------------------------------------------------------------------- shipped registry, policy


def test_shipped_registry_matches_sidecar_and_has_every_category(registry, policy):
    sidecar = REGISTRY.with_name(REGISTRY.name + ".sha256").read_text().split()
    assert sidecar == [hashlib.sha256(REGISTRY.read_bytes()).hexdigest(), REGISTRY.name]
    assert registry.sha256 == sidecar[0]
    assert registry.n_sites == len(registry.frame()) > 2800
    counts = registry.frame()["category"].value_counts()
    assert counts["military"] == 44
    assert set(registry.categories) == {"military", "airport", "port", "nuclear", "protected_area", "health",
                                        "education", "emergency", "government", "religious", "energy",
                                        "water", "aviation"}
    # the policy sets an explicit rule for every category the registry holds
    assert set(registry.categories) <= set(policy.categories)
    assert policy.rule("military").action == "deny" and policy.rule("nuclear").action == "deny"
    assert policy.rule("no_such_category") == policy.default


def test_registry_site_ids_unique_and_sorted(registry):
    ids = list(registry.frame()["site_id"])
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


# ------------------------------------------------------------------------------------------- real places


def test_new_providence_hits_nassau_airport_and_port(registry, policy):
    d = screen(NEW_PROVIDENCE, registry, policy)
    by_cat = {h.category: h for h in d.hits}
    assert by_cat["airport"].name == "Nassau Int'l"
    assert by_cat["airport"].action == policy.rule("airport").action == "mask"
    assert by_cat["port"].name == "Nassau"
    assert by_cat["port"].action == policy.rule("port").action
    assert by_cat["airport"].distance_m == 0.0
    assert d.action == "mask" and d.allowed
    assert d.registry == {"path": str(REGISTRY.resolve()), "sha256": registry.sha256,
                          "n_sites": registry.n_sites}
    assert d.policy["sha256"] == policy.sha256
    assert len(d.aoi_sha256) == 64


def test_bahamas_raster_footprint_hits_airport_and_port(registry, policy):
    import rasterio
    from rasterio.warp import transform_geom
    from shapely.geometry import shape

    with rasterio.open(BAHAMAS) as ds:
        footprint = shape(transform_geom(ds.crs, "EPSG:4326", box(*ds.bounds).__geo_interface__))
    d = screen(footprint, registry, policy)
    names = {(h.name, h.category) for h in d.hits}
    assert {("Nassau Int'l", "airport"), ("Nassau", "port")} <= names
    assert d.action == "mask"


def test_mask_geometry_in_utm_covers_the_airport(registry, policy):
    d = screen(NEW_PROVIDENCE, registry, policy)
    mask = d.mask_geometry("EPSG:32618")
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True).transform(*NASSAU_AIRPORT)
    assert mask.contains(Point(x, y))
    # airport disc (1500 m) + port disc (1000 m), areas in UTM metres, within 1 %
    expected = math.pi * (1500**2 + 1000**2)
    assert abs(mask.area - expected) / expected < 0.01
    # really in UTM metres: inside the Bahamas raster's EPSG:32618 bounds
    minx, miny, maxx, maxy = mask.bounds
    assert 101_985 < minx < maxx < 339_315 and 2_611_485 < miny < maxy < 2_826_915


def test_north_dakota_hits_nothing(registry, policy):
    d = screen(NORTH_DAKOTA, registry, policy)
    assert d.action == "allow" == ACTIONS[0]
    assert d.allowed and d.hits == ()
    assert d.mask_geometry("EPSG:26914") is None
    enforce(d)  # does not raise


def test_military_airport_is_denied_even_with_approval(registry, policy):
    lon, lat = CFB_EDMONTON
    aoi = box(lon - 0.02, lat - 0.02, lon + 0.02, lat + 0.02)
    d = screen(aoi, registry, policy, approval={"approver": "Jane Doe", "reason": "testing a deny"})
    assert d.action == "deny" and not d.allowed
    assert d.approval is None
    assert [h.name for h in d.hits if h.category == "military"] == ["CFB Edmonton"]
    with pytest.raises(RunRefused) as exc:
        enforce(d)
    assert "CFB Edmonton" in str(exc.value) and "cannot be approved" in str(exc.value)
    assert exc.value.decision is d
    # every site hit is in the decision with its own geometry, whatever its action (none is masked here)
    sites = d.to_dict()["sites_4326"]["features"]
    assert [f["properties"]["site_id"] for f in sites] == sorted(h.site_id for h in d.hits)
    assert not d.to_dict()["mask_4326"]["features"]
    mil = next(f for f in sites if f["properties"]["category"] == "military")
    assert mil["properties"]["action"] == "deny" and mil["geometry"]["type"] == "Point"
    assert shape(mil["geometry"]).distance(Point(*CFB_EDMONTON)) < 0.05  # the site itself, not a buffer


def test_require_approval_blocks_without_and_passes_with_approval(registry, policy):
    hospital = registry.frame().query("category == 'health'").geometry.iloc[0]
    aoi = hospital.buffer(0.001)
    d = screen(aoi, registry, policy)
    assert d.action == "require_approval" and not d.allowed and d.approval is None
    with pytest.raises(RunRefused) as exc:
        enforce(d)
    msg = str(exc.value)
    assert "approver" in msg and "--approve-by" in msg and "health" in msg

    for approval in (Approval(approver="Jane Doe", reason="hospital roof survey"),
                     {"approver": "Jane Doe", "reason": "hospital roof survey"}):
        ok = screen(aoi, registry, policy, approval=approval)
        assert ok.allowed and ok.action == "require_approval"
        assert ok.approval["approver"] == "Jane Doe" and ok.approval["reason"] == "hospital roof survey"
        assert ok.approval["approved_at"].endswith("Z")
        enforce(ok)

    with pytest.raises(ConfigError, match="approver"):
        screen(aoi, registry, policy, approval={"approver": "", "reason": "x"})


# --------------------------------------------------------------------------------------------- metric buffers


@pytest.mark.parametrize(("buffer_m", "hits"), [(1500, True), (500, False)])
def test_buffer_is_in_metres_at_high_latitude(tmp_path, buffer_m, hits):
    # At 60°N a degree of longitude is ~55.8 km: 1 km east is 0.018°, more than a naive 1500 m / 111 km
    # = 0.0135° "buffer in degrees" would reach.
    lon, lat = 10.0, 60.0
    reg = load_registry(_tiny_registry(tmp_path / "sites.gpkg", lon, lat))
    pol = load_policy(_rule_policy(tmp_path, "mask", buffer_m))
    x0, _ = _offset(lon, lat, 90, 1000)
    aoi = box(x0, lat - 0.01, x0 + 0.05, lat + 0.01)
    d = screen(aoi, reg, pol)
    assert bool(d.hits) is hits
    if hits:
        assert d.hits[0].distance_m == pytest.approx(1000, abs=2)
        assert d.action == "mask"
        mask = d.mask_geometry("EPSG:4326")
        for az in (0, 90, 180, 270):
            assert mask.contains(Point(*_offset(lon, lat, az, 1490)))
            assert not mask.contains(Point(*_offset(lon, lat, az, 1520)))
    else:
        assert d.action == "allow"


def test_buffer_across_the_antimeridian(tmp_path):
    reg = load_registry(_tiny_registry(tmp_path / "sites.gpkg", 179.999, 0.0))
    pol = load_policy(_rule_policy(tmp_path, "deny", 1000))
    d = screen(box(-179.995, -0.01, -179.9, 0.01), reg, pol)  # about 670 m away, across ±180°
    assert d.action == "deny"
    assert d.hits[0].distance_m == pytest.approx(668, abs=5)


def test_registry_in_another_crs_is_reprojected(tmp_path):
    reg = load_registry(_tiny_registry(tmp_path / "sites.gpkg", 10.0, 60.0, crs="EPSG:3857"))
    pt = reg.frame().geometry.iloc[0]
    assert reg.frame().crs.to_epsg() == 4326
    assert (pt.x, pt.y) == (pytest.approx(10.0), pytest.approx(60.0))


# ---------------------------------------------------------------------------------------------- fail closed


def test_missing_registry_fails_closed(tmp_path):
    with pytest.raises(ScreeningError, match="not found"):
        load_registry(tmp_path / "nope.gpkg")


def test_empty_registry_fails_closed(tmp_path):
    import geopandas as gpd

    empty = gpd.GeoDataFrame({"site_id": [], "name": [], "category": []},
                             geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    path = tmp_path / "empty.gpkg"
    empty.to_file(path, layer="sites", driver="GPKG")
    with pytest.raises(ScreeningError, match="zero sites"):
        load_registry(_vouch(path))


def test_corrupt_registry_fails_closed(tmp_path):
    path = tmp_path / "corrupt.gpkg"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ScreeningError, match="cannot be read"):
        load_registry(_vouch(path))


def test_geojson_named_gpkg_fails_closed(tmp_path):
    path = tmp_path / "disguised.gpkg"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"category": "x"},
         "geometry": {"type": "Point", "coordinates": [0, 1]}}]}))
    with pytest.raises(ScreeningError, match="not the GPKG"):
        load_registry(_vouch(path))


def test_registry_hash_mismatch_fails_closed(tmp_path):
    path = _tiny_registry(tmp_path / "sites.gpkg", 10.0, 60.0)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_registry(path, expected_sha256=good).sha256 == good
    with pytest.raises(ScreeningError, match="not the expected"):
        load_registry(path, expected_sha256="0" * 64)
    # with no expected hash, a sibling .sha256 is checked
    path.with_name(path.name + ".sha256").write_text(f"{'f' * 64}  {path.name}\n")
    with pytest.raises(ScreeningError, match="changed or replaced"):
        load_registry(path)
    path.with_name(path.name + ".sha256").write_text(f"{good}  {path.name}\n")
    assert load_registry(path).sha256 == good


def test_registry_without_sidecar_or_pinned_hash_fails_closed(tmp_path):
    """An edited registry with its sidecar deleted must not pass: no sidecar and no pinned sha256 refuses;
    pinning the reviewed file's sha256 in the config lets it through."""
    path = _tiny_registry(tmp_path / "sites.gpkg", 10.0, 60.0)
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(ScreeningError, match="no sites.gpkg.sha256 beside it") as err:
        load_registry(path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"screening.registry_sha256: {good}" in str(err.value)  # the fix, in the message
    assert load_registry(path, expected_sha256=good).sha256 == good


def test_registry_without_category_fails_closed(tmp_path):
    import geopandas as gpd

    path = tmp_path / "nocat.gpkg"
    gpd.GeoDataFrame({"site_id": ["a"], "kind": ["military"]}, geometry=[Point(1, 2)],
                     crs="EPSG:4326").to_file(path, layer="sites", driver="GPKG")
    with pytest.raises(ScreeningError, match="no 'category' column"):
        load_registry(_vouch(path))


def test_registry_without_crs_fails_closed(tmp_path):
    import geopandas as gpd

    path = tmp_path / "nocrs.gpkg"
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame({"category": ["military"]}, geometry=[Point(1, 2)]).to_file(path, layer="sites",
                                                                                     driver="GPKG")
    with pytest.raises(ScreeningError, match="no CRS"):
        load_registry(_vouch(path))


@pytest.mark.parametrize(("body", "key"), [
    ("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories:\n  x: {action: ignore, buffer_m: 5}\n",
     "categories.x.action"),
    ("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories: {}\nextra: 1\n", "extra"),
    ("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories:\n  x: {action: deny, buffer_m: -5}\n",
     "categories.x.buffer_m"),
    ("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories:\n  x: {action: deny, buffer_m: .inf}\n",
     "categories.x.buffer_m"),
    ("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories:\n  x: {action: deny, buffr_m: 5}\n",
     "categories.x.buffr_m"),
    ("version: 1\ncategories: {}\n", "default"),
    ("version: 2\ndefault: {action: record, buffer_m: 0}\ncategories: {}\n", "version"),
    ("- just\n- a list\n", "mapping"),
    ("version: [1\n", "YAML"),
])
def test_bad_policy_fails_closed_naming_the_key(tmp_path, body, key):
    with pytest.raises(ScreeningError) as exc:
        load_policy(_policy_file(tmp_path / "bad.yaml", body))
    assert key in str(exc.value)


def test_missing_policy_fails_closed(tmp_path):
    with pytest.raises(ScreeningError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_empty_aoi_is_refused(registry, policy):
    with pytest.raises(AOIError, match="empty"):
        screen(Point(0, 0).buffer(0).difference(Point(0, 0).buffer(1)), registry, policy)


# -------------------------------------------------------------------------------------------------- outputs


def test_write_decision_writes_valid_json(tmp_path, registry, policy):
    d = screen(NEW_PROVIDENCE, registry, policy, aoi_sha256="ab" * 32)
    path = write_decision(d, tmp_path / "run")
    assert path == tmp_path / "run" / "screening.json"
    data = json.loads(path.read_text())
    assert data["action"] == "mask" and data["allowed"] is True
    assert data["aoi_sha256"] == "ab" * 32
    assert {h["name"] for h in data["hits"]} == {"Nassau Int'l", "Nassau"}
    assert data["registry"]["sha256"] == registry.sha256
    assert data["policy"]["sha256"] == policy.sha256
    feats = data["mask_4326"]["features"]
    assert sorted(f["properties"]["category"] for f in feats) == ["airport", "port"]
    assert all(f["geometry"]["type"] == "Polygon" for f in feats)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["screening.json"]  # no temporary left over
    assert isinstance(d, Decision) and data == d.to_dict()
