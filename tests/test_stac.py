"""STAC Items and Collections of real tiny runs, validated offline against the bundled schemas."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import rasterio

from geo_dino.config import parse_config
from geo_dino.outputs import stac
from geo_dino.run import stages as pl
from tests.conftest import PUCALLPA

_RUNS: dict[str, Path] = {}  # one real run per kind per session; each test gets its own copy of the folder


def _run_copy(kind: str, cfg: dict, dest: Path) -> Path:
    if kind not in _RUNS:
        _RUNS[kind] = pl.run_local(parse_config(cfg))
    return Path(shutil.copytree(_RUNS[kind], dest / _RUNS[kind].name))  # run folders are movable


@pytest.fixture
def change_run(tiny_config, tmp_path) -> Path:
    """A two-date Pucallpa run: PCA, k-means and change outputs with their styles."""
    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]})
    return _run_copy("change", cfg, tmp_path / "moved")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket use fails loudly: validation must never go to the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during STAC validation")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_bundled_schema_ids_match_their_urls():
    for url, rel in stac.SCHEMA_FILES.items():
        doc = json.loads((stac.SCHEMA_DIR / rel).read_text())
        if url.endswith("common.json"):  # upstream v1.1.0 typo: "$id" ends in "commonjson"
            continue
        assert doc["$id"].rstrip("#") == url, rel


def test_published_extension_schemas_are_bundled_unchanged():
    """Byte lengths of the published texts (the Content-Length the URLs serve); see schemas/README.md."""
    published = {stac.PROJECTION: 4374, stac.RASTER: 6318, stac.MLM: 33494}
    for url, size in published.items():
        assert (stac.SCHEMA_DIR / stac.SCHEMA_FILES[url]).stat().st_size == size, url


def test_items_of_the_previous_mlm_version_still_validate(change_run, tmp_path, no_network):
    item = json.loads(stac.write_item(change_run).read_text())
    old = "https://stac-extensions.github.io/mlm/v1.3.0/schema.json"
    item["stac_extensions"] = [old if u == stac.MLM else u for u in item["stac_extensions"]]
    del item["assets"]["heads"]["mlm:artifact_type"]  # not in MLM v1.3.0
    assert old in stac.validate_item(_write_json(tmp_path / "old.json", item))


def test_item_of_a_change_run(change_run, no_network):
    item_path = stac.write_item(change_run)
    assert item_path == change_run / "stac_item.json"
    passed = stac.validate_item(item_path)
    item = json.loads(item_path.read_text())
    assert passed[0].endswith("item-spec/json-schema/item.json")
    assert set(passed[1:]) == set(item["stac_extensions"])
    wanted = {stac.PROJECTION, stac.RASTER, stac.FILE, stac.PROCESSING, stac.MLM}
    assert wanted <= set(item["stac_extensions"])

    rec = json.loads((change_run / "provenance.json").read_text())
    assert item["id"] == rec["run_id"] and item["properties"]["created"] == rec["created_at"]
    # the time is the acquisitions' (Pucallpa 1985 and 2020: years from the file names), not the run's
    assert item["properties"]["datetime"] is None
    assert item["properties"]["start_datetime"] == "1985-01-01T00:00:00Z"
    assert item["properties"]["end_datetime"] == "2020-12-31T23:59:59Z"
    assert [a["source"] for a in item["properties"]["geo_dino:acquired"]] == ["file name (year)"] * 2
    assert {o["name"] for o in rec["outputs"]} <= set(item["assets"])
    assert {"change_magnitude", "change_mask", "provenance", "tiles", "heads"} <= set(item["assets"])
    for key, asset in item["assets"].items():
        href = asset["href"]
        assert not Path(href).is_absolute() and "://" not in href and ".." not in href, key
        assert not href.startswith("work/"), key  # work/ is the run's scratch, not a product
        target = change_run / href
        assert target.exists(), key
        if target.is_file():
            assert asset["file:checksum"] == "1220" + hashlib.sha256(target.read_bytes()).hexdigest(), key
            assert asset["file:size"] == target.stat().st_size
    for out in rec["outputs"]:
        asset = item["assets"][out["name"]]
        assert asset["type"] == stac.COG
        with rasterio.open(change_run / out["path"]) as ds:
            assert asset["proj:code"] == ds.crs.to_string()
            assert asset["proj:shape"] == [ds.height, ds.width]
            assert asset["proj:transform"] == pytest.approx(list(ds.transform)[:6])
            assert asset["proj:bbox"] == pytest.approx(list(ds.bounds))
            assert len(asset["raster:bands"]) == ds.count
            assert asset["raster:bands"][0]["data_type"] == ds.dtypes[0]
    assert item["assets"]["change_mask_style"]["type"] == "text/xml"
    assert item["assets"]["pca_rgb_t1"]["roles"] == ["visual", "overview"]
    assert item["assets"]["change_magnitude"]["raster:bands"][0]["nodata"] == "nan"
    assert item["assets"]["heads"]["roles"] == ["mlm:model"]
    assert item["assets"]["heads"]["mlm:artifact_type"] == "numpy.savez"
    props = item["properties"]
    assert props["mlm:input"][0]["bands"] == ["red", "green", "blue"]
    assert {o["name"] for o in props["mlm:output"]} == {"features", "kmeans", "change"}
    assert props["processing:software"]["rasterio"] == rasterio.__version__
    w, s, e, n = item["bbox"]
    aw, as_, ae, an = rec["aoi"]["bounds"]
    assert aw - 1e-3 <= w < e <= ae + 1e-3 and as_ - 1e-3 <= s < n <= an + 1e-3


def test_broken_items_fail_with_clear_errors(change_run, tmp_path, no_network):
    good = json.loads(stac.write_item(change_run).read_text())

    bad = copy.deepcopy(good)
    bad["assets"]["change_mask"]["proj:shape"] = "335x645"
    msg = r"projection/v2\.0\.0.*change_mask\['proj:shape'\]: '335x645' is not of type"
    with pytest.raises(stac.STACError, match=msg):
        stac.validate_item(_write_json(tmp_path / "a.json", bad))

    bad = copy.deepcopy(good)
    del bad["assets"]["classes_t1"]["href"]
    with pytest.raises(stac.STACError, match=r"item\.json.*'href' is a required property"):
        stac.validate_item(_write_json(tmp_path / "b.json", bad))

    bad = copy.deepcopy(good)
    bad["assets"]["classes_t1"]["file:checksum"] = "SHA256:xyz"
    with pytest.raises(stac.STACError, match=r"file/v2\.1\.0"):
        stac.validate_item(_write_json(tmp_path / "c.json", bad))

    bad = copy.deepcopy(good)
    bad["stac_extensions"].append("https://stac-extensions.github.io/eo/v2.0.0/schema.json")
    with pytest.raises(stac.STACError, match="not bundled"):
        stac.validate_item(_write_json(tmp_path / "d.json", bad))

    bad = copy.deepcopy(good)  # MLM v1.4.0: the mlm:model asset must say how the model was saved
    del bad["assets"]["heads"]["mlm:artifact_type"]
    with pytest.raises(stac.STACError, match=r"mlm/v1\.4\.0.*'mlm:artifact_type' is a required property"):
        stac.validate_item(_write_json(tmp_path / "f.json", bad))

    bad = copy.deepcopy(good)  # ... and only that asset
    bad["assets"]["classes_t1"]["mlm:artifact_type"] = "numpy.savez"
    with pytest.raises(stac.STACError, match=r"mlm/v1\.4\.0.*classes_t1"):
        stac.validate_item(_write_json(tmp_path / "g.json", bad))

    bad = copy.deepcopy(good)  # a $ref to an unbundled schema is refused, not fetched
    bad["assets"]["change_mask"]["proj:projjson"] = {"type": "GeographicCRS"}
    with pytest.raises(stac.STACError, match="proj.org/schemas"):
        stac.validate_item(_write_json(tmp_path / "e.json", bad))


def test_collection_over_two_runs(tiny_config, change_run, tmp_path, no_network):
    other = _run_copy("bahamas", tiny_config(), tmp_path / "moved")
    out = tmp_path / "catalog"
    path = stac.write_collection([change_run, other], out, id="tests", description="two tiny runs",
                                 license="other")
    assert stac.validate_collection(path)
    coll = json.loads(path.read_text())
    (bbox,) = coll["extent"]["spatial"]["bbox"]
    items = [json.loads((out / link["href"]).read_text()) for link in coll["links"] if link["rel"] == "item"]
    assert len(items) == 2
    for it in items:
        stac.validate_item(tmp_path / "moved" / it["id"] / "stac_item.json")
        assert bbox[0] <= it["bbox"][0] and bbox[1] <= it["bbox"][1]
        assert bbox[2] >= it["bbox"][2] and bbox[3] >= it["bbox"][3]
    start, end = coll["extent"]["temporal"]["interval"][0]
    times = [t for i in items for t in (i["properties"]["datetime"], i["properties"].get("start_datetime"),
                                         i["properties"].get("end_datetime")) if t]
    assert start <= min(times) and max(times) <= end
    assert all(not Path(link["href"]).is_absolute() for link in coll["links"])


def test_collection_document_is_pinned(tmp_path, no_network):
    """The Collection's keys and values, whatever builds it: extent, summaries, relative item links, an empty
    ``stac_extensions`` when no asset names a CRS, title and providers only when given."""
    def item(name: str, when: str, bbox: list[float], code: str | None) -> Path:
        assets = {"a": {"href": "a.tif", **({"proj:code": code} if code else {})}}
        return _write_json(tmp_path / "runs" / name / "stac_item.json",
                           {"id": name, "bbox": bbox, "assets": assets,
                            "properties": {"datetime": when, "mlm:architecture": f"ViT {name}"}})

    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r2").mkdir(parents=True)
    one = item("r1", "2024-05-01T10:00:00.250000Z", [-75.0, -9.0, -74.0, -8.0], "EPSG:32718")
    two = item("r2", "2023-01-02T03:04:05Z", [-76.0, -8.5, -74.5, -7.0], None)
    out = tmp_path / "catalog"
    providers = [{"name": "lab", "roles": ["producer"], "url": "https://example.org"}]
    doc = json.loads(stac.write_collection([one, two], out, id="c", description="d", title="T",
                                           providers=providers).read_text())
    first, last = "2023-01-02T03:04:05Z", "2024-05-01T10:00:00.250000Z"
    assert doc == {
        "type": "Collection", "stac_version": stac.STAC_VERSION, "stac_extensions": [stac.PROJECTION],
        "id": "c", "description": "d", "license": "other", "title": "T", "providers": providers,
        "extent": {"spatial": {"bbox": [[-76.0, -9.0, -74.0, -7.0]]},
                   "temporal": {"interval": [[first, last]]}},
        "summaries": {"datetime": {"minimum": first, "maximum": last},
                      "mlm:architecture": ["ViT r1", "ViT r2"], "proj:code": ["EPSG:32718"]},
        "links": [{"rel": "item", "href": f"../runs/{n}/stac_item.json", "type": "application/geo+json",
                   "title": n} for n in ("r1", "r2")],
    }
    assert stac.validate_collection(out / "collection.json")
    bare = json.loads(stac.write_collection([two], out, id="c", description="d").read_text())
    assert bare["stac_extensions"] == [] and "proj:code" not in bare["summaries"]
    assert "title" not in bare and "providers" not in bare
    assert not list(out.glob(".*"))  # no temporary file left


def test_each_finished_run_joins_its_collection(tiny_config, tmp_path, no_network):
    """Runs of one config (or one Prefect deployment) share ``collections/<name>/collection.json`` in their
    output folder, rewritten by each run as it finishes; Items name it and link to it."""
    out = tmp_path / "runs"
    first = pl.run_local(parse_config(tiny_config(name="coastal", output_dir=str(out))))
    second = pl.run_local(parse_config(tiny_config(name="coastal", output_dir=str(out))))
    other = pl.run_local(parse_config(tiny_config(name="inland", output_dir=str(out))))
    coll_path = out / "collections" / "coastal" / "collection.json"
    assert stac.validate_collection(coll_path)
    coll = json.loads(coll_path.read_text())
    assert coll["id"] == "coastal"
    hrefs = sorted((coll_path.parent / lk["href"]).resolve() for lk in coll["links"] if lk["rel"] == "item")
    # not the other config's run
    assert hrefs == sorted([first / "stac_item.json", second / "stac_item.json"])
    for run in (first, second):
        item = json.loads((run / "stac_item.json").read_text())
        assert item["collection"] == "coastal"
        (link,) = [lk for lk in item["links"] if lk["rel"] == "collection"]
        assert (run / link["href"]).resolve() == coll_path.resolve()
        rec = json.loads((run / "provenance.json").read_text())
        assert (run / rec["stac_collection"]).resolve() == coll_path.resolve()
        assert rec["prefect"]["deployment"] is None  # run locally: the config's name names the Collection
    other_coll = json.loads((out / "collections" / "inland" / "collection.json").read_text())
    assert [lk["title"] for lk in other_coll["links"] if lk["rel"] == "item"] == [other.name]
    # a run that did not finish is left out when the Collection is rewritten
    rec = json.loads((second / "provenance.json").read_text())
    (second / "provenance.json").write_text(json.dumps({**rec, "status": "failed"}))
    stac.update_collection(out, "coastal")
    coll = json.loads(coll_path.read_text())
    assert [lk["title"] for lk in coll["links"] if lk["rel"] == "item"] == [first.name]
    with pytest.raises(stac.STACError, match="no finished run"):
        stac.update_collection(out, "nobody")
    with pytest.raises(stac.STACError, match="cannot name a Collection"):
        stac.update_collection(out, "../..")


def test_write_item_refuses_unfinished_runs(tmp_path):
    with pytest.raises(stac.STACError, match="no provenance.json"):
        stac.write_item(tmp_path)
    (tmp_path / "provenance.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(stac.STACError, match="finish"):
        stac.write_item(tmp_path)


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, geo_dino.outputs.stac; "
            "print(any(m in sys.modules for m in ('pystac', 'jsonschema', 'rasterio')))")
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert res.stdout.strip() == "False"
