#!/usr/bin/env python
"""Build the sensitive-site registry ``data/registry/sensitive_sites.gpkg`` from the shared vector data.

Usage (from the repository root, with the virtualenv active)::

    python scripts/build_registry.py                       # source: ../shared/data/vectors
    python scripts/build_registry.py /path/to/vectors      # another copy of the same files
    python scripts/build_registry.py --out /tmp/sites.gpkg

The output is one layer ``sites`` in EPSG:4326 with the columns ``site_id`` (stable: dataset prefix and the
source's own identifier or feature index), ``name``, ``category``, ``source``, ``licence`` and the geometry.
Rows are sorted by ``site_id`` and the GeoPackage timestamps are pinned, so the same inputs give the same
bytes. Beside it the script writes ``sensitive_sites.gpkg.sha256`` (checked by
:func:`geo_dino.governance.screening.load_registry`) and ``README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "vectors"
DEFAULT_OUT = REPO / "data" / "registry" / "sensitive_sites.gpkg"
LAYER = "sites"
PINNED_DATE = "2000-01-01T00:00:00.000Z"  # GeoPackage last_change timestamps, pinned for reproducible bytes

LICENCE_NE = "public domain (Natural Earth)"
LICENCE_GEONUCLEAR = "ODbL-1.0 (GeoNuclearData, cristianst85/GeoNuclearData)"
LICENCE_OSM = "ODbL-1.0, (c) OpenStreetMap contributors"

# The OSM extract's own category labels, mapped to the registry's short snake_case names.
OSM_CATEGORY = {
    "healthcare": "health",
    "education": "education",
    "emergency_services": "emergency",
    "government": "government",
    "religious": "religious",
    "energy": "energy",
    "water_infrastructure": "water",
    "aviation": "aviation",
}


@dataclass(frozen=True)
class SourceFile:
    """One input file, relative to the source folder."""

    rel: str
    dataset: str


AIRPORTS = SourceFile("natural_earth/ne_10m_airports.geojson", "natural_earth/ne_10m_airports")
PORTS = SourceFile("natural_earth/ne_10m_ports.geojson", "natural_earth/ne_10m_ports")
PARKS = SourceFile("natural_earth/ne_10m_parks_and_protected_lands_area.geojson",
                   "natural_earth/ne_10m_parks_and_protected_lands_area")
NUCLEAR = SourceFile("geonuclear_power_plants/nuclear_power_plants.geojson",
                     "geonuclear_power_plants/nuclear_power_plants")
OSM = SourceFile("osm_liechtenstein_2013/liechtenstein_sensitive_sites_osm2013.geojson",
                 "osm_liechtenstein_2013/liechtenstein_sensitive_sites_osm2013")


def _read(source: Path, f: SourceFile):
    import geopandas as gpd

    path = source / f.rel
    if not path.is_file():
        sys.exit(f"missing input {path}: pass the folder holding natural_earth/, geonuclear_power_plants/ "
                 f"and osm_liechtenstein_2013/ as the first argument")
    gdf = gpd.read_file(path, engine="pyogrio")
    if gdf.crs is None or gdf.crs.to_epsg() != 4326:
        sys.exit(f"{path}: expected EPSG:4326, found {gdf.crs}")
    return gdf.reset_index(drop=True)


def _text(value: object) -> str:
    """A clean string from a possibly missing property."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _rows(gdf, dataset: str, licence: str, ids, names, categories) -> list[dict]:
    return [
        {"site_id": i, "name": n, "category": c, "source": dataset, "licence": licence, "geometry": g}
        for i, n, c, g in zip(ids, names, categories, gdf.geometry, strict=True)
    ]


def collect(source: Path) -> list[dict]:
    """Every candidate row from the five source files (geometry not yet cleaned)."""
    rows: list[dict] = []

    ap = _read(source, AIRPORTS)
    kinds = [_text(t).lower() for t in ap["type"]]  # "mid and military", "military major", ... (44 of 891)
    rows += _rows(ap, AIRPORTS.dataset, LICENCE_NE, [f"ne_airports:{i}" for i in ap.index],
                  [_text(n) for n in ap["name"]],
                  ["military" if "military" in k else "airport" for k in kinds])

    po = _read(source, PORTS)
    rows += _rows(po, PORTS.dataset, LICENCE_NE, [f"ne_ports:{i}" for i in po.index],
                  [_text(n) for n in po["name"]], ["port"] * len(po))

    pa = _read(source, PARKS)
    rows += _rows(pa, PARKS.dataset, LICENCE_NE, [f"ne_parks:{_text(c)}" for c in pa["unit_code"]],
                  [_text(n) for n in pa["unit_name"]], ["protected_area"] * len(pa))

    nu = _read(source, NUCLEAR)
    # Every plant with valid coordinates, whatever its status: shut-down, planned and cancelled sites are
    # still physical sites, and a screen should err on the side of inclusion.
    rows += _rows(nu, NUCLEAR.dataset, LICENCE_GEONUCLEAR, [f"geonuclear:{int(i)}" for i in nu["Id"]],
                  [_text(n) for n in nu["Name"]], ["nuclear"] * len(nu))

    osm = _read(source, OSM)
    unknown = sorted(set(osm["category"]) - set(OSM_CATEGORY))
    if unknown:
        sys.exit(f"{OSM.rel}: unknown categories {unknown}; add them to OSM_CATEGORY in {__file__}")
    ids = []
    for layer, oid in zip(osm["osm_layer"], osm["osm_id"], strict=True):
        oid = _text(oid)
        ids.append(f"osm_li2013:{oid if '/' in oid else ('node/' + oid if layer == 'points' else oid)}")
    names = [_text(n) or f"({_text(t)})" for n, t in zip(osm["name"], osm["osm_tag"], strict=True)]
    rows += _rows(osm, OSM.dataset, LICENCE_OSM, ids, names, [OSM_CATEGORY[c] for c in osm["category"]])
    return rows


def clean(rows: list[dict]):
    """A sorted GeoDataFrame without null, empty, invalid or out-of-range geometries."""
    import geopandas as gpd
    import numpy as np
    import shapely

    kept, dropped = [], 0
    for r in rows:
        g = r["geometry"]
        if g is None or g.is_empty:
            dropped += 1
            continue
        if not g.is_valid:
            g = shapely.make_valid(g)
            if g.geom_type == "GeometryCollection":  # keep the parts of the original dimension
                parts = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon", "Point")]
                g = shapely.union_all(parts) if parts else shapely.Point()
        xy = shapely.get_coordinates(g)
        if g.is_empty or not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() \
                or (np.abs(xy[:, 1]) > 90).any() or (xy == 0).all():
            dropped += 1
            continue
        kept.append({**r, "geometry": g})
    ids = [r["site_id"] for r in kept]
    if len(ids) != len(set(ids)):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        sys.exit(f"duplicate site_id values {dup[:5]}: fix the id scheme in {__file__}")
    kept.sort(key=lambda r: r["site_id"])
    gdf = gpd.GeoDataFrame(kept, geometry="geometry", crs="EPSG:4326")
    return gdf, dropped


def write(gdf, out: Path) -> str:
    """Write the GeoPackage atomically and reproducibly; returns its sha256."""
    import pyogrio

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".gpkg", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    old = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": PINNED_DATE})
    try:
        pyogrio.write_dataframe(gdf, tmp, layer=LAYER, driver="GPKG", SPATIAL_INDEX="YES")
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": old})
    con = sqlite3.connect(tmp)
    try:
        con.execute("VACUUM")
    finally:
        con.close()
    os.replace(tmp, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    sidecar = out.with_name(out.name + ".sha256")
    sidecar.write_text(f"{digest}  {out.name}\n")
    return digest


README = """# Sensitive-site registry

`sensitive_sites.gpkg` (layer `sites`, EPSG:4326) is what `geo_dino.governance.screening` checks every area
of interest
against before a run. `sensitive_sites.gpkg.sha256` holds its digest (`<hex>  <file name>`); the loader
refuses a registry whose bytes do not match it. What each category triggers (record, mask, require
approval, deny) and within what buffer is set in `configs/screening_policy.yaml`, not here.

Columns: `site_id` (stable: dataset prefix + the source's identifier or 0-based feature index), `name`,
`category`, `source` (dataset), `licence`, geometry.

## Contents ({n} sites, sha256 `{sha}`)

| category | sites | source | licence |
|---|---:|---|---|
{table}

- `military`: Natural Earth airports whose `type` contains "military" (e.g. "mid and military");
  `airport`: every other Natural Earth airport (including the three typed "spaceport").
- `nuclear`: every GeoNuclearData reactor with valid coordinates, whatever its status (operational, shut down,
  under construction, planned, cancelled...): the site exists or is reserved either way.
- `protected_area`: Natural Earth parks and protected lands (US National Park Service units), polygons
  repaired with `make_valid` where needed.
- `health`, `education`, `emergency`, `government`, `religious`, `energy`, `water`, `aviation`: the 2013
  OpenStreetMap extract of Liechtenstein; its labels `healthcare`, `emergency_services` and
  `water_infrastructure` are shortened to `health`, `emergency` and `water`. Unnamed features are named by
  their OSM tag, e.g. `(amenity=school)`.

Rows with a null, empty, non-finite or out-of-range geometry are dropped ({dropped} this build).

## Sources and licences

- Natural Earth (airports, ports, parks and protected lands, 10m): public domain. Files from
  martynafford/natural-earth-geojson (repository CC0-1.0).
- GeoNuclearData (cristianst85/GeoNuclearData): database ODbL-1.0, contents DbCL-1.0. Derived databases must
  stay under ODbL and credit the source.
- OpenStreetMap extract of Liechtenstein, 2013-08-03 (from osm2pgsql-dev/osm2pgsql test data): ODbL-1.0,
  (c) OpenStreetMap contributors.

Because it contains ODbL data, this registry as a whole is distributed under ODbL-1.0 with the attributions
above.

## Rebuild

```sh
. .venv/bin/activate
python scripts/build_registry.py                 # reads ../shared/data/vectors, writes this folder
python scripts/build_registry.py /other/vectors  # another copy of the same inputs
```

The build sorts rows by `site_id` and pins the GeoPackage timestamps, so unchanged inputs give the same
sha256. A run configuration can pin it with `screening.registry_sha256`.
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                    help="folder with natural_earth/, geonuclear_power_plants/, osm_liechtenstein_2013/")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output GeoPackage")
    args = ap.parse_args(argv)

    gdf, dropped = clean(collect(args.source.resolve()))
    digest = write(gdf, args.out)
    counts = gdf.groupby("category").agg(n=("site_id", "size"), source=("source", "first"),
                                         licence=("licence", "first")).sort_index()
    table = "\n".join(f"| `{c}` | {r.n} | {r.source} | {r.licence} |" for c, r in counts.iterrows())
    args.out.with_name("README.md").write_text(
        README.format(n=len(gdf), sha=digest, table=table, dropped=dropped))
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({len(gdf)} sites, {size / 1e6:.2f} MB, dropped {dropped})\nsha256 {digest}")
    for c, r in counts.iterrows():
        print(f"  {c:16s} {r.n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
