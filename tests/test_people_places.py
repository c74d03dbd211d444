"""People and places: what an AOI touches, from the bundled Natural Earth layers and the site registry."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from pyproj import Geod
from shapely.geometry import Point, box

from geo_dino.config import AOIOptions
from geo_dino.errors import AOIError, ConfigError, GeoDinoError, ScreeningError
from geo_dino.governance.people_places import (
    DECLARED_FIELDS,
    DEFAULT_LAYERS,
    DEFAULT_REGISTRY,
    people_and_places,
)
from geo_dino.governance.screening import load_policy, load_registry, screen
from geo_dino.inputs.aoi import load_aoi

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ROOT / "data" / "context" / "people_places.gpkg"
REGISTRY = ROOT / "data" / "registry" / "sensitive_sites.gpkg"
POLICY = ROOT / "configs" / "screening_policy.yaml"
GEOD = Geod(ellps="WGS84")

OPEN_ATLANTIC = box(-35.0, 30.0, -34.9, 30.1)  # ~1200 km west of the Azores' nearest island
STRASBOURG_RHINE = box(7.72, 48.54, 7.88, 48.62)  # across the France-Germany border (Rhine at Strasbourg)
VADUZ = box(9.50, 47.12, 9.54, 47.16)  # Liechtenstein: the registry's schools, health and religious sites


@pytest.fixture(scope="module")
def nassau():
    return load_aoi(ROOT / "aoi" / "bahamas_nassau.geojson", AOIOptions()).geometry


@pytest.fixture(scope="module")
def nassau_record(nassau):
    decision = screen(nassau, load_registry(REGISTRY), load_policy(POLICY)).to_dict()
    return people_and_places(nassau, gsd_m=30.0, screening=decision,
                             declared={"faces": {"answer": "no", "decided_by": "J. Smith"}})


def test_defaults_are_the_bundled_files_and_their_checksums_hold():
    assert DEFAULT_LAYERS == LAYERS and DEFAULT_REGISTRY == REGISTRY
    digest = hashlib.sha256(LAYERS.read_bytes()).hexdigest()
    assert (LAYERS.parent / "people_places.gpkg.sha256").read_text().split() == [digest, "people_places.gpkg"]
    sums = dict(reversed(line.split()) for line in (ROOT / "data" / "SHA256SUMS").read_text().splitlines())
    assert sums["context/people_places.gpkg"] == digest
    assert digest in (LAYERS.parent / "README.md").read_text()
    assert LAYERS.stat().st_size < 3_000_000


def test_nassau_record(nassau_record):
    rec = nassau_record
    json.dumps(rec, allow_nan=False)  # JSON-serialisable as it is
    assert set(rec) >= {"sensitive_sites_hit", "urban_areas", "populated_places", "schools_health_religious",
                        "international_borders", "protected_areas", "resolution", "declared"}

    hit = rec["sensitive_sites_hit"]
    assert hit["decided_by"] == "computed (screening)"
    airport = [s for s in hit["sites"] if s["category"] == "airport"]
    # Lynden Pindling International, named "Nassau Int'l" in Natural Earth
    assert [s["name"] for s in airport] == ["Nassau Int'l"] and airport[0]["distance_m"] == 0.0
    assert set(airport[0]) >= {"name", "category", "action", "distance_m"}

    places = rec["populated_places"]
    nassau = next(p for p in places["places"] if p["name"] == "Nassau")
    assert nassau["country"] == "The Bahamas" and nassau["population"] > 100_000
    assert nassau["distance_m"] == 0.0 and places["count"] == len(places["places"])

    # Natural Earth's 1:50m urban areas have no polygon in the Bahamas (the nearest is around Miami): no
    # polygon overlap, but Nassau, a city of ~228,000, lies inside the AOI, so the AOI is urban
    urban = rec["urban_areas"]
    assert urban["decided_by"].startswith("computed (Natural Earth 50m urban areas)")
    assert urban["overlaps"] is False and urban["area_m2"] == 0.0
    assert urban["urban"] is True and [c["name"] for c in urban["cities_inside"]] == ["Nassau"]

    borders = rec["international_borders"]
    assert borders["nearest_border_m"] is None and borders["crosses"] is False and borders["within"] is False
    assert rec["schools_health_religious"]["count"] == 0 and rec["protected_areas"]["count"] == 0
    assert rec["resolution"]["could_resolve_people"] == "no"
    assert rec["declared"]["faces"] == {"answer": "no", "decided_by": "J. Smith"}
    assert rec["declared"]["homes"] == {"answer": "unknown", "decided_by": "not declared"}
    assert rec["sources"]["layers"]["sha256"] == hashlib.sha256(LAYERS.read_bytes()).hexdigest()


def test_across_the_rhine_at_strasbourg():
    rec = people_and_places(STRASBOURG_RHINE, gsd_m=None, screening=None)
    borders = rec["international_borders"]
    assert borders["crosses"] is True and borders["within"] is True and borders["nearest_border_m"] == 0.0
    assert borders["borders"][0]["countries"] == ["France", "Germany"]
    urban = rec["urban_areas"]
    assert urban["overlaps"] is True and 0.0 < urban["fraction_of_aoi"] <= 1.0
    assert 0.0 < urban["area_m2"] <= rec["aoi"]["area_m2"]
    assert [p["name"] for p in rec["populated_places"]["places"]] == ["Strasbourg"]
    assert rec["sensitive_sites_hit"]["decided_by"] == "not screened"


def test_border_distance_is_geodesic_and_bounded_by_the_setting():
    """A box 0.3° east of the Rhine border: the border is some km away, measured on the ellipsoid."""
    aoi = box(8.15, 48.54, 8.20, 48.58)
    rec = people_and_places(aoi, gsd_m=None, screening=None, border_distance_m=25_000)
    d = rec["international_borders"]["nearest_border_m"]
    # the border line is west of the box: the box's west edge is at most 0.45° of longitude from it
    west_edge_to_border_max = GEOD.inv(8.15, 48.56, 7.70, 48.56)[2]
    assert 1_000 < d < west_edge_to_border_max
    assert rec["international_borders"]["crosses"] is False
    assert rec["international_borders"]["within"] is (d <= 25_000)
    tight = people_and_places(aoi, gsd_m=None, screening=None, border_distance_m=d / 2)
    tight = tight["international_borders"]
    assert tight["within"] is False and tight["borders"] == []
    assert tight["nearest_border_m"] == pytest.approx(d)


def test_open_ocean_touches_nothing():
    rec = people_and_places(OPEN_ATLANTIC, gsd_m=10.0, screening=None)
    assert rec["urban_areas"]["overlaps"] is False and rec["urban_areas"]["n_within"] == 0
    assert rec["urban_areas"]["urban"] is False and rec["urban_areas"]["cities_inside"] == []
    assert rec["populated_places"]["count"] == 0 and rec["populated_places"]["places"] == []
    borders = rec["international_borders"]
    assert borders["within"] is False and borders["crosses"] is False and borders["nearest_border_m"] is None
    assert rec["schools_health_religious"]["count"] == 0 and rec["protected_areas"]["count"] == 0


def test_schools_health_religious_and_protected_areas_come_from_the_registry():
    rec = people_and_places(VADUZ, gsd_m=None, screening=None)
    shr = rec["schools_health_religious"]
    assert shr["counts"]["education"] > 0 and shr["counts"]["religious"] > 0
    assert shr["count"] == sum(shr["counts"].values()) == len(shr["sites"])
    assert all(s["distance_m"] <= 5_000 for s in shr["sites"])
    assert {s["category"] for s in shr["sites"]} <= {"education", "health", "religious"}

    # a small AOI inside a Natural Earth park (a US National Park Service unit)
    reg = load_registry(REGISTRY).frame()
    park = reg[reg["category"] == "protected_area"].iloc[0]
    inside = park.geometry.representative_point()
    rec = people_and_places(inside.buffer(0.001), gsd_m=None, screening=None)
    assert rec["protected_areas"]["overlaps"] is True
    assert park["name"] in [s["name"] for s in rec["protected_areas"]["sites"]]


def test_resolution_thresholds():
    for gsd, people, vehicles in [(0.5, "yes", "yes"), (1.0, "yes", "yes"), (3.0, "no", "yes"),
                                  (30.0, "no", "no"), (None, "unknown", "unknown")]:
        res = people_and_places(OPEN_ATLANTIC, gsd_m=gsd, screening=None)["resolution"]
        assert (res["could_resolve_people"], res["could_resolve_vehicles"]) == (people, vehicles), gsd
        assert res["gsd_m"] == gsd and "1 m" in res["rule"] and "5 m" in res["rule"]
    with pytest.raises(ConfigError, match="gsd_m"):
        people_and_places(OPEN_ATLANTIC, gsd_m=-1.0, screening=None)


def test_declared_answers_pass_through_and_bad_ones_are_refused():
    declared = {"faces": {"answer": "no", "decided_by": "J. Smith"},
                "homes": {"answer": "yes", "decided_by": "A. Jones"},
                "medical_data": {"answer": "unknown", "decided_by": "J. Smith"}}
    out = people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, declared=declared)["declared"]
    assert set(out) == set(DECLARED_FIELDS)
    assert {k: out[k] for k in declared} == declared
    assert out["workplaces"] == {"answer": "unknown", "decided_by": "not declared"}

    with pytest.raises(ConfigError, match=r"declared\.homes\.answer"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None,
                          declared={"homes": {"answer": "maybe", "decided_by": "A. Jones"}})
    with pytest.raises(ConfigError, match=r"declared\.faces\.decided_by"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, declared={"faces": {"answer": "no"}})
    with pytest.raises(ConfigError, match=r"declared\.face\b"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None,
                          declared={"face": {"answer": "no", "decided_by": "J. Smith"}})


def test_missing_or_tampered_layers_are_refused_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.gpkg"
    with pytest.raises(ScreeningError, match="nowhere.gpkg") as exc:
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, layers=missing)
    assert isinstance(exc.value, GeoDinoError)
    with pytest.raises(ScreeningError, match="nowhere.gpkg"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, registry=missing)

    copy = tmp_path / "people_places.gpkg"
    shutil.copyfile(LAYERS, copy)
    (tmp_path / "people_places.gpkg.sha256").write_text("0" * 64 + "  people_places.gpkg\n")
    with pytest.raises(ScreeningError, match="people_places.gpkg"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, layers=copy)

    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"not a geopackage")
    with pytest.raises(ScreeningError, match="junk.gpkg"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening=None, layers=junk)


def test_bad_aoi_and_bad_screening_are_refused():
    with pytest.raises(AOIError):
        people_and_places(box(0, 0, 0, 0).buffer(0), gsd_m=None, screening=None)
    with pytest.raises(AOIError):
        people_and_places(box(500_000, 4_000_000, 510_000, 4_010_000), gsd_m=None, screening=None)
    with pytest.raises(ScreeningError, match="hits"):
        people_and_places(OPEN_ATLANTIC, gsd_m=None, screening={"action": "allow"})


def test_features_across_the_antimeridian_are_seen(tmp_path):
    """A place at -179.99° is 2 km from an AOI ending at 179.99°: read through the wrapped window."""
    import geopandas as gpd
    from shapely.geometry import LineString

    layers = tmp_path / "wrap.gpkg"
    gpd.GeoDataFrame({"area_sqkm": [1.0]}, geometry=[box(10, 10, 10.01, 10.01)],
                     crs="EPSG:4326").to_file(layers, layer="urban_areas", driver="GPKG")
    gpd.GeoDataFrame({"name": ["East"], "country": ["Nowhere"], "adm0_a3": ["NWH"], "pop_max": [10]},
                     geometry=[Point(-179.99, 0.0)], crs="EPSG:4326").to_file(
        layers, layer="populated_places", driver="GPKG")
    gpd.GeoDataFrame({"country_a": ["A"], "country_b": ["B"]}, geometry=[LineString([(20, 20), (21, 21)])],
                     crs="EPSG:4326").to_file(layers, layer="borders", driver="GPKG")
    aoi = box(179.95, -0.01, 179.99, 0.01)
    rec = people_and_places(aoi, gsd_m=None, screening=None, layers=layers)
    (place,) = rec["populated_places"]["places"]
    assert place["name"] == "East"
    assert place["distance_m"] == pytest.approx(GEOD.inv(179.99, 0.0, -179.99, 0.0)[2], rel=1e-3)
