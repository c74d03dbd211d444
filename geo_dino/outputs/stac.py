"""STAC metadata for runs: one Item per run folder, one Collection per deployment, validated offline.

:func:`write_item` turns a finished run folder into ``stac_item.json`` beside its outputs, built from
``provenance.json`` and the outputs themselves. Every asset href is relative, so the folder stays
self-contained and can be moved or uploaded as is. :func:`write_collection` gathers the Items of several runs
(one deployment: a site or a programme) under a ``collection.json`` whose item links are relative too. Both
are built with pystac.

An Item's time is when its input rasters were acquired: ``start_datetime``/``end_datetime`` span the
inputs' acquisition dates (from their tags or file names, or the config's ``sources.acquired``; the record
says which), and ``datetime`` is null. Only when an input's date is unknown is ``datetime`` the run's
creation time. ``created``/``updated`` always carry the run's start and finish.

:func:`validate_item`/:func:`validate_collection` check a document against the STAC core schemas and every
extension schema it lists, all bundled under ``geo_dino/schemas`` (see its README): nothing is fetched, and a
schema that is not bundled is an error. pystac and jsonschema are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from geo_dino.errors import STACError
from geo_dino.files import (
    CONFIG,
    LABEL_FREE_MODEL,
    QGIS_PROJECT,
    RECORD,
    TILE_INDEX,
    sha256_file,
    write_text_atomic,
)

ITEM_FILE = "stac_item.json"
COLLECTION_FILE = "collection.json"
#: where a run's Collection lives, relative to the output folder that holds the run folders
COLLECTIONS_DIR = "collections"
STAC_VERSION = "1.1.0"
_CORE = f"https://schemas.stacspec.org/v{STAC_VERSION}"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
PROCESSING = "https://stac-extensions.github.io/processing/v1.1.0/schema.json"
MLM = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
_MLM_1_3 = "https://stac-extensions.github.io/mlm/v1.3.0/schema.json"  # Items written before v1.4.0
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
#: Every schema URL we may meet -> bundled file (relative to ``geo_dino/schemas``).
SCHEMA_FILES: dict[str, str] = {
    **{f"{_CORE}/item-spec/json-schema/{n}.json": f"stac-spec/v{STAC_VERSION}/{n}.json" for n in (
        "item", "bands", "basics", "common", "data-values", "datetime", "instrument", "licensing",
        "provider")},
    f"{_CORE}/collection-spec/json-schema/collection.json": f"stac-spec/v{STAC_VERSION}/collection.json",
    f"{_CORE}/catalog-spec/json-schema/catalog.json": f"stac-spec/v{STAC_VERSION}/catalog.json",
    "https://geojson.org/schema/Feature.json": "geojson/Feature.json",
    "https://geojson.org/schema/Geometry.json": "geojson/Geometry.json",
    PROJECTION: "extensions/projection-v2.0.0.json", RASTER: "extensions/raster-v1.1.0.json",
    FILE: "extensions/file-v2.1.0.json", PROCESSING: "extensions/processing-v1.1.0.json",
    MLM: "extensions/mlm-v1.4.0.json", _MLM_1_3: "extensions/mlm-v1.3.0.json",
}
#: Files in a run folder that become assets when present: name -> (key, media type, roles).
_SIDECARS = {RECORD: ("provenance", "application/json", ["metadata"]),
             CONFIG: ("config", "application/json", ["metadata"]),
             QGIS_PROJECT: ("qgis_project", "application/x-qgis", ["metadata", "visual"]),
             TILE_INDEX: ("tiles", "application/geopackage+sqlite3", ["metadata"])}


def _file_fields(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """``file:checksum`` (multihash: 0x12 = sha2-256, 0x20 = 32 bytes) and ``file:size``."""
    return {"file:checksum": "1220" + (sha256 or sha256_file(path)), "file:size": path.stat().st_size}


def _crs_fields(crs: Any) -> dict[str, Any]:
    code = crs.to_epsg()
    auth = crs.to_authority() if code is None else ("EPSG", str(code))
    if auth:
        return {"proj:code": f"{auth[0]}:{auth[1]}"}
    return {"proj:code": None, "proj:wkt2": crs.to_wkt("WKT2_2019")}


def _resolution_m(ds: Any) -> float:
    """Mean pixel size in metres at the raster's centre (geodesic for geographic CRSs)."""
    t = ds.transform
    if ds.crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        x, y = t @ (ds.width / 2, ds.height / 2)
        dx = geod.inv(x, y, x + t.a, y)[2]
        dy = geod.inv(x, y, x, y + t.e)[2]
        return float((abs(dx) + abs(dy)) / 2)
    return float((abs(t.a) + abs(t.e)) / 2 * ds.crs.linear_units_factor[1])


def _band_stats(ds: Any, band: int, max_side: int = 512) -> dict[str, float]:
    """Statistics of one band read decimated to at most ``max_side`` pixels a side (cheap, approximate)."""
    import numpy as np

    f = max(1, math.ceil(max(ds.width, ds.height) / max_side))
    arr = ds.read(band, out_shape=(math.ceil(ds.height / f), math.ceil(ds.width / f)), masked=True)
    data = np.ma.masked_invalid(arr.astype("float64"))
    valid = data.compressed()
    out = {"valid_percent": round(100.0 * valid.size / max(data.size, 1), 3)}
    if valid.size:
        out |= {"minimum": float(valid.min()), "maximum": float(valid.max()),
                "mean": float(valid.mean()), "stddev": float(valid.std())}
    return out


def _roles(name: str) -> list[str]:
    return ["visual", "overview"] if name.startswith("pca_rgb") else ["data"]


def _cog_asset(run_dir: Path, out: dict[str, Any]) -> tuple[dict[str, Any], tuple[float, ...], Any]:
    """Asset fields of one output COG (proj, raster, file) and its bounds and CRS, read from the file."""
    import rasterio

    path = run_dir / out["path"]
    with rasterio.open(path) as ds:
        nodata = ds.nodata
        nd: float | str | None = "nan" if nodata is not None and math.isnan(nodata) else nodata
        res = _resolution_m(ds)
        bands = []
        for b in range(1, ds.count + 1):
            band: dict[str, Any] = {"data_type": ds.dtypes[b - 1], "spatial_resolution": res,
                                    "statistics": _band_stats(ds, b)}
            if nd is not None:
                band["nodata"] = nd
            if ds.descriptions[b - 1]:
                band["name"] = ds.descriptions[b - 1]
            bands.append(band)
        fields = {**_crs_fields(ds.crs), "proj:shape": [ds.height, ds.width],
                  "proj:transform": [float(v) for v in list(ds.transform)[:6]],
                  "proj:bbox": [float(v) for v in ds.bounds], "raster:bands": bands}
        bounds, crs = tuple(ds.bounds), ds.crs
    fields |= _file_fields(path, out.get("sha256"))
    return fields, bounds, crs


def _mlm(rec: dict[str, Any]) -> dict[str, Any]:
    """ML-model fields: the backbone as input, the label-free (or trained) heads as outputs."""
    import re

    bb, pre, heads = rec.get("backbone") or {}, rec.get("preprocessing") or {}, rec.get("heads") or {}
    bands = list(bb.get("bands") or [])
    tile = (rec.get("pipeline") or {}).get("tile_size") or -1
    low, high = pre.get("low") or [0.0] * len(bands), pre.get("high") or [1.0] * len(bands)
    scaling = [{"type": "z-score", "mean": lo + m * (hi - lo), "stddev": s * (hi - lo)}  # raw pixel units
               for lo, hi, m, s in zip(low, high, bb.get("mean") or [], bb.get("std") or [], strict=False)]
    grid = ["batch", "channel", "height", "width"]
    outputs = [{"name": "features", "tasks": ["similarity-search"], "description": "dense patch features",
                "result": {"shape": [-1, int(bb.get("embed_dim") or 1), -1, -1], "dim_order": grid,
                           "data_type": "float32"}}]
    if heads.get("kmeans_k"):
        outputs.append({"name": "kmeans", "tasks": ["semantic-segmentation"],
                        "description": f"label-free k-means on features, k={heads['kmeans_k']}",
                        "result": {"shape": [-1, 1, -1, -1], "dim_order": grid, "data_type": "uint8"}})
    if heads.get("change"):
        ch = rec.get("change") or {}
        thr = (ch.get("threshold") or {}).get("method", "")
        outputs.append({"name": "change", "tasks": ["segmentation"],
                        "description": f"label-free change between dates: {ch.get('method', 'fused')} score "
                                       f"(every band's spectrum and/or backbone features), {thr} threshold",
                        "result": {"shape": [-1, 1, -1, -1], "dim_order": grid, "data_type": "float32"}})
    sup = rec.get("supervised_head")
    if sup:
        outputs.append({"name": "supervised", "tasks": ["semantic-segmentation"],
                        "description": f"trained head {sup.get('path', '')}".strip(),
                        "result": {"shape": [-1, 1, -1, -1], "dim_order": grid, "data_type": "uint8"}})
    pretrained = bb.get("source") not in (None, "random-init")
    out: dict[str, Any] = {
        "mlm:name": re.sub(r"[^a-zA-Z0-9_.\-]", "-", f"geo-dino {bb.get('arch', 'backbone')}"),
        "mlm:architecture": f"Vision Transformer ({bb.get('arch', 'unknown')})", "mlm:framework": "PyTorch",
        "mlm:tasks": sorted({t for o in outputs for t in o["tasks"]}),
        "mlm:pretrained": pretrained,
        "mlm:pretrained_source": (bb.get("training_lineage") or bb.get("source")) if pretrained else None,
        "mlm:input": [{"name": "tile", "bands": bands, "value_scaling": scaling or None,
                       "input": {"shape": [-1, len(bands), tile, tile],
                                 "dim_order": grid, "data_type": "float32"}}],
        "mlm:output": outputs,
        "mlm:hyperparameters": {k: v for k, v in {
            "patch_size": bb.get("patch_size"), "embed_dim": bb.get("embed_dim"),
            "n_registers": bb.get("n_registers"), "kmeans_k": heads.get("kmeans_k"),
            "tile_size": tile, "overlap": (rec.get("pipeline") or {}).get("overlap"),
        }.items() if v is not None},
    }
    torch_v = (rec.get("software") or {}).get("torch")
    if torch_v and re.fullmatch(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]*)?", torch_v):
        out["mlm:framework_version"] = torch_v
    return out


def write_item(run_dir: Path | str, collection: str | None = None) -> Path:
    """Write ``<run_dir>/stac_item.json`` for a finished run and return its path.

    Call it after the last change to ``provenance.json`` (its checksum is in the Item). ``collection``: the
    id of the Collection the run belongs to (:func:`update_collection`); the Item then names it and links to
    ``../collections/<id>/collection.json``. Raises :class:`STACError` when the folder has no provenance
    record or no succeeded run.
    """
    import pystac
    from pystac.extensions.file import FileExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension
    from rasterio.warp import transform_bounds

    run_dir = Path(run_dir).resolve()
    if not (run_dir / RECORD).is_file():
        raise STACError(f"{run_dir}: no {RECORD}; write_item needs a run folder made by geo_dino")
    rec = json.loads((run_dir / RECORD).read_text())
    if rec.get("status") != "succeeded":
        raise STACError(f"{run_dir}: run status is {rec.get('status')!r}; finish (or resume) the run first")
    assets: dict[str, pystac.Asset] = {}
    lons, lats = [], []
    for out in rec.get("outputs") or []:
        if not str(out["path"]).endswith(".tif"):
            continue  # a Zarr cube: listed with the other data folders below
        fields, bounds, crs = _cog_asset(run_dir, out)
        assets[out["name"]] = pystac.Asset(out["path"], title=out["name"], media_type=COG,
                                           roles=_roles(out["name"]), extra_fields=fields)
        w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
        lons += [w, e]
        lats += [s, n]
        if out.get("qml") and (run_dir / out["qml"]).is_file():
            assets[f"{out['name']}_style"] = pystac.Asset(
                out["qml"], title=f"QGIS style for {out['name']}", media_type="text/xml", roles=["metadata"],
                extra_fields=_file_fields(run_dir / out["qml"]))
    for fname, (key, media, roles) in _SIDECARS.items():
        if (run_dir / fname).is_file():
            assets[key] = pystac.Asset(fname, media_type=media, roles=roles,
                                       extra_fields=_file_fields(run_dir / fname))
    for p in sorted(run_dir.glob("*.gpkg")):
        if p.name not in _SIDECARS:
            assets[p.stem] = pystac.Asset(p.name, media_type="application/geopackage+sqlite3",
                                          roles=["data"], extra_fields=_file_fields(p))
    for p in sorted(run_dir.glob("*.zarr")):
        assets[p.stem] = pystac.Asset(p.name, media_type="application/vnd+zarr", roles=["data"])
    mlm = _mlm(rec)
    heads = run_dir / LABEL_FREE_MODEL  # beside the outputs: no asset points into work/
    if heads.is_file():  # the run's own fitted model: MLM requires one asset with the mlm:model role
        names = [{"name": b} for b in mlm["mlm:input"][0]["bands"]]  # and that asset its artifact type
        assets["heads"] = pystac.Asset(LABEL_FREE_MODEL, title="fitted heads (PCA, k-means)",
                                       roles=["mlm:model"],
                                       media_type="application/octet-stream",
                                       extra_fields={**_file_fields(heads), "raster:bands": names,
                                                     "mlm:artifact_type": "numpy.savez"})
    if lons:
        bbox = [min(lons), min(lats), max(lons), max(lats)]
        w, s, e, n = bbox
        ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
        geometry: dict[str, Any] = {"type": "Polygon", "coordinates": [ring]}
    else:  # no raster output: the AOI stands for the footprint
        import shapely.geometry

        geometry = rec["aoi"]["geometry"]
        bbox = list(shapely.geometry.shape(geometry).bounds)
    created = datetime.fromisoformat(rec["created_at"])
    software = {k: str(v) for k, v in (rec.get("software") or {}).items()
                if v is not None and k != "platform"}
    git = rec.get("git") or {}
    if git.get("commit"):
        software["geo_dino (git)"] = git["commit"] + (" (dirty)" if git.get("dirty") else "")
    bb, lic = rec.get("backbone") or {}, rec.get("licence") or {}
    props: dict[str, Any] = {
        "title": f"geo_dino run {rec['run_id']}", "created": rec["created_at"],
        "updated": rec.get("finished_at") or rec["created_at"], "license": "other",
        "processing:level": "L4", "processing:software": software,
        "processing:lineage": (f"DINO-family ViT `{bb.get('arch')}` ({bb.get('source')}) dense features over "
                               f"{len(rec.get('inputs') or [])} input raster(s), then label-free heads "
                               "(PCA, k-means, change); see provenance.json."),
        **mlm,
        "geo_dino:run_id": rec["run_id"],
        "geo_dino:backbone": {k: bb.get(k) for k in ("arch", "sha256", "source", "bands", "mean", "std",
                                                     "patch_size", "embed_dim", "training_lineage")},
        "geo_dino:licence": lic,
    }
    if rec.get("supervised_head"):
        props["geo_dino:supervised_head"] = rec["supervised_head"]
    from geo_dino.governance.deployment import JSON_FILE, MD_FILE, summary

    record_file = run_dir / JSON_FILE
    if record_file.is_file():  # the six parts, summed up; the whole record is an asset
        props["geo_dino:deployment_record"] = summary(json.loads(record_file.read_text()))
        assets["deployment_record"] = pystac.Asset(record_file.name, title="deployment record",
                                                   media_type="application/json", roles=["metadata"],
                                                   extra_fields=_file_fields(record_file))
        md = run_dir / MD_FILE
        if md.is_file():
            assets["deployment_record_md"] = pystac.Asset(md.name, title="deployment record (for people)",
                                                          media_type="text/markdown", roles=["metadata"],
                                                          extra_fields=_file_fields(md))
    acquired = [i["acquired"] for i in rec.get("inputs") or [] if i.get("acquired")]
    when: datetime | None = created
    if acquired and len(acquired) == len(rec.get("inputs") or []):  # every input's date is known
        when = None
        props["start_datetime"] = min(a["start"] for a in acquired) + "T00:00:00Z"
        props["end_datetime"] = max(a["end"] for a in acquired) + "T23:59:59Z"
        props["geo_dino:acquired"] = acquired
    item = pystac.Item(rec["run_id"], geometry, bbox, when, props, assets=assets,
                       collection=_safe_key(collection) if collection else None)
    if collection:
        item.add_link(pystac.Link("collection", collection_href(collection, from_run=True),
                                  media_type="application/json", title=collection))
    if record_file.is_file():
        item.add_link(pystac.Link("describedby", MD_FILE, media_type="text/markdown",
                                  title="deployment record: backbone, lineage, pipeline and evaluation "
                                        "boundaries, people and places, governance route"))
    for asset in item.assets.values():  # register the extensions the asset fields use
        if "proj:shape" in asset.extra_fields:
            ProjectionExtension.ext(asset, add_if_missing=True)
        if "raster:bands" in asset.extra_fields:
            RasterExtension.ext(asset, add_if_missing=True)
        if "file:checksum" in asset.extra_fields:
            FileExtension.ext(asset, add_if_missing=True)
    item.stac_extensions = sorted(set(item.stac_extensions) | {PROCESSING, MLM})
    return write_text_atomic(run_dir / ITEM_FILE, json.dumps(
        item.to_dict(include_self_link=False, transform_hrefs=False), indent=2, allow_nan=False))


def write_collection(sources: Iterable[Path | str], out_dir: Path | str, *, id: str, description: str,
                     license: str = "other", title: str | None = None,
                     providers: list[dict[str, Any]] | None = None) -> Path:
    """Write ``<out_dir>/collection.json`` over run Items and return its path.

    ``sources`` are run folders (their ``stac_item.json`` is written if missing) or Item files. The extent
    covers every Item; links to the Items are relative to ``out_dir``, and the Items are left untouched, so a
    deployment keeps its catalog folder next to (or above) its run folders and can move both together.
    """
    import pystac
    from pystac.utils import str_to_datetime

    out_dir = Path(out_dir).resolve()
    items: list[tuple[Path, dict[str, Any]]] = []
    for src in sources:
        p = Path(src).resolve()
        if p.is_dir():
            p = p / ITEM_FILE if (p / ITEM_FILE).is_file() else write_item(p)
        items.append((p, json.loads(p.read_text())))
    if not items:
        raise STACError("write_collection needs at least one run folder or Item")
    boxes = [d["bbox"] for _, d in items]
    times = sorted(t for _, d in items for t in (d["properties"].get("datetime"),
                                                 d["properties"].get("start_datetime"),
                                                 d["properties"].get("end_datetime")) if t)
    codes = sorted({a["proj:code"] for _, d in items for a in d["assets"].values() if a.get("proj:code")})
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(b[0] for b in boxes), min(b[1] for b in boxes),
                               max(b[2] for b in boxes), max(b[3] for b in boxes)]]),
        pystac.TemporalExtent([[str_to_datetime(times[0]), str_to_datetime(times[-1])]]))
    summaries = pystac.Summaries({
        "datetime": {"minimum": times[0], "maximum": times[-1]},
        "mlm:architecture": sorted({d["properties"].get("mlm:architecture", "") for _, d in items}),
        **({"proj:code": codes} if codes else {})})
    coll = pystac.Collection(id, description, extent, title=title or None,
                             stac_extensions=[PROJECTION] if codes else [], license=license,
                             providers=[pystac.Provider.from_dict(p) for p in providers or []] or None,
                             summaries=summaries)
    for p, d in items:
        coll.add_link(pystac.Link("item", Path(os.path.relpath(p, out_dir)).as_posix(),
                                  media_type="application/geo+json", title=d["id"]))
    doc = coll.to_dict(include_self_link=False, transform_hrefs=False)
    doc.setdefault("stac_extensions", [])  # pystac leaves an empty list out; every Collection has the key
    out_dir.mkdir(parents=True, exist_ok=True)
    # runs finishing together: each replaces a whole file
    return write_text_atomic(out_dir / COLLECTION_FILE, json.dumps(doc, indent=2, allow_nan=False))


def _safe_key(key: str) -> str:
    """A Collection id that is also one safe folder name (Prefect deployment names may hold spaces)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip("-.")[:64]
    if not safe:
        raise STACError(f"{key!r} cannot name a Collection: use letters, digits, '_', '.' or '-'")
    return safe


def collection_href(key: str, *, from_run: bool = False) -> str:
    """``collections/<id>/collection.json`` relative to the output folder (``from_run``: to a run folder)."""
    rel = f"{COLLECTIONS_DIR}/{_safe_key(key)}/{COLLECTION_FILE}"
    return f"../{rel}" if from_run else rel


def collection_key(run_dir: Path | str, record: dict[str, Any] | None = None) -> str:
    """The Collection a run belongs to: its Prefect deployment's name when a deployment started it, else its
    config's ``name`` (so the scheduled runs of one deployment, or the runs of one config, share one).
    ``record``: the run's provenance record when already read."""
    run_dir = Path(run_dir)
    try:
        rec = record if record is not None else json.loads((run_dir / RECORD).read_text())
        key = (rec.get("prefect") or {}).get("deployment")
        if not key:
            key = json.loads((run_dir / CONFIG).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise STACError(f"{run_dir}: cannot tell the run's Collection (no readable record and config): "
                        f"{exc}") from exc
    return _safe_key(key)


def update_collection(output_dir: Path | str, key: str, *, description: str | None = None) -> Path:
    """(Re)write ``<output_dir>/collections/<key>/collection.json`` over every succeeded run folder directly
    in ``output_dir`` that belongs to ``key`` (:func:`collection_key`) and has its Item; return its path.

    Folders that are not readable runs are skipped (a run still going, a failed one, another tool's folder).
    The file is replaced whole, so two runs finishing together leave a valid Collection; the later one
    lists both.
    """
    output_dir = Path(output_dir).resolve()
    key = _safe_key(key)
    items = []
    for item in sorted(output_dir.glob(f"*/{ITEM_FILE}")):
        run = item.parent
        try:
            rec = json.loads((run / RECORD).read_text())
            if rec.get("status") != "succeeded" or collection_key(run, rec) != key:
                continue
        except (OSError, ValueError, STACError):
            continue
        items.append(item)
    if not items:
        raise STACError(f"{output_dir}: no finished run belongs to Collection {key!r}")
    return write_collection(items, output_dir / COLLECTIONS_DIR / key, id=key,
                            description=description or f"geo_dino runs of {key!r} (one Item per run)",
                            title=f"geo_dino: {key}")


def _registry() -> Any:
    """A ``referencing`` registry of the bundled schemas that refuses to retrieve anything else."""
    from jsonschema import Draft7Validator
    from referencing import Registry, Resource
    from referencing.exceptions import NoSuchResource

    def refuse(uri: str) -> Resource:
        raise NoSuchResource(uri)  # positional: mypy does not see the attrs-generated __init__(ref)

    resources = [(url, Resource.from_contents(json.loads((SCHEMA_DIR / rel).read_text())))
                 for url, rel in SCHEMA_FILES.items()]
    meta = Resource.from_contents(Draft7Validator.META_SCHEMA)
    resources.append(("http://json-schema.org/draft-07/schema", meta))
    return Registry(retrieve=refuse).with_resources(resources)  # type: ignore[call-arg]


def _leaves(err: Any, keep: int = 3) -> list[Any]:
    """The deepest sub-errors of a ``oneOf``/``anyOf`` failure (where the document is wrong), else ``err``."""
    leaves, stack = [], [err]
    while stack:
        e = stack.pop()
        stack.extend(e.context) if e.context else leaves.append(e)
    depth = max(len(e.absolute_path) for e in leaves)
    deepest = [e for e in leaves if len(e.absolute_path) == depth]
    return list({e.json_path + e.message: e for e in deepest}.values())[:keep]


def _validate(doc: dict[str, Any], core_url: str, where: str) -> list[str]:
    from jsonschema import Draft7Validator
    from referencing.exceptions import Unresolvable

    urls = [core_url, *doc.get("stac_extensions", [])]
    missing = [u for u in urls if u not in SCHEMA_FILES]
    if missing:
        raise STACError(f"{where}: schema(s) not bundled in geo_dino/schemas, not fetched: {missing}; "
                        "add the file and its URL to geo_dino.outputs.stac.SCHEMA_FILES")
    registry, problems = _registry(), []
    for url in urls:
        validator = Draft7Validator(registry.contents(url), registry=registry)
        try:
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        except Unresolvable as exc:
            raise STACError(f"{where}: schema {url} refers to {exc.ref}, which is not bundled in "
                            "geo_dino/schemas (validation never goes to the network)") from exc
        for err in errors:
            problems += [f"{url}: at {e.json_path}: {e.message[:200]}" for e in _leaves(err)]
    if problems:
        raise STACError(f"{where} does not validate ({len(problems)} error(s)):\n  " + "\n  ".join(problems))
    return urls


def validate_item(path: Path | str) -> list[str]:
    """Validate a STAC Item file offline; return the schema URLs it passed, or raise :class:`STACError`."""
    doc = json.loads(Path(path).read_text())
    return _validate(doc, f"{_CORE}/item-spec/json-schema/item.json", f"Item {path}")


def validate_collection(path: Path | str) -> list[str]:
    """Validate a STAC Collection file offline; return the schema URLs passed, or raise :class:`STACError`."""
    doc = json.loads(Path(path).read_text())
    return _validate(doc, f"{_CORE}/collection-spec/json-schema/collection.json", f"Collection {path}")
