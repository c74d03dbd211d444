#!/usr/bin/env python
"""Build the people-and-places context layers ``data/context/people_places.gpkg`` from Natural Earth.

Usage (from the repository root, with the virtualenv active)::

    python scripts/build_context_layers.py                     # source: ../shared/data/vectors/natural_earth
    python scripts/build_context_layers.py /path/to/natural_earth
    python scripts/build_context_layers.py --out /tmp/people_places.gpkg

One GeoPackage in EPSG:4326 with three layers, read by :mod:`geo_dino.governance.people_places`:

* ``urban_areas``: the polygons of ``ne_50m_urban_areas`` (column ``area_sqkm``);
* ``populated_places``: the points of ``ne_50m_populated_places_simple`` (``name``, ``country``,
  ``adm0_a3``, ``pop_max``);
* ``borders``: international land borders, the lines that two countries of ``ne_110m_admin_0_countries``
  share: for every pair of touching country polygons, the intersection of their boundaries (its line parts;
  countries meeting at a single point give no line). Coastlines are therefore left out; the script checks
  it by measuring the part of the border lines on the outline of all countries together (the coast), and
  writes that length (0 for this source) into the README.

Rows are sorted, the GeoPackage timestamps are pinned and the file is vacuumed, so the same inputs give the
same bytes. Geometries are simplified only when the file would exceed ``MAX_BYTES`` (the script says so).
Beside it the script writes ``people_places.gpkg.sha256`` and ``README.md``, and sets the file's line in
``data/SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "vectors" / "natural_earth"
DEFAULT_OUT = REPO / "data" / "context" / "people_places.gpkg"
SHA256SUMS = REPO / "data" / "SHA256SUMS"
PINNED_DATE = "2000-01-01T00:00:00.000Z"  # GeoPackage last_change timestamps, pinned for reproducible bytes
MAX_BYTES = 3_000_000
SIMPLIFY_DEG = 0.001  # about 100 m; used only when the file would exceed MAX_BYTES

URBAN = "ne_50m_urban_areas.geojson"
PLACES = "ne_50m_populated_places_simple.geojson"
COUNTRIES = "ne_110m_admin_0_countries.geojson"


def _read(source: Path, name: str) -> Any:
    import geopandas as gpd

    path = source / name
    if not path.is_file():
        sys.exit(f"missing input {path}: pass the Natural Earth folder holding {URBAN}, {PLACES} and "
                 f"{COUNTRIES} as the first argument")
    gdf = gpd.read_file(path, engine="pyogrio")
    if gdf.crs is None or gdf.crs.to_epsg() != 4326:
        sys.exit(f"{path}: expected EPSG:4326, found {gdf.crs}")
    return gdf.reset_index(drop=True)


def _valid(geoms: Any) -> Any:
    import shapely

    return shapely.make_valid(geoms)


def urban_areas(source: Path) -> Any:
    """The urban-area polygons with their ``area_sqkm``, sorted by area (largest first) then position."""
    import geopandas as gpd
    import shapely

    src = _read(source, URBAN)
    geoms = _valid(src.geometry.values)
    keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    gdf = gpd.GeoDataFrame({"area_sqkm": src["area_sqkm"].astype(float).round(3).values[keep]},
                           geometry=geoms[keep], crs="EPSG:4326")
    order = sorted(range(len(gdf)), key=lambda i: (-gdf["area_sqkm"].iat[i], gdf.geometry.iat[i].bounds))
    return gdf.iloc[order].reset_index(drop=True)


def populated_places(source: Path) -> Any:
    """Populated-place points: ``name``, ``country`` (source ``adm0name``), ``adm0_a3``, ``pop_max``."""
    import geopandas as gpd

    src = _read(source, PLACES)
    pop = src["pop_max"].fillna(-1).astype("int64")
    gdf = gpd.GeoDataFrame({"name": src["name"].fillna("").astype(str).values,
                            "country": src["adm0name"].fillna("").astype(str).values,
                            "adm0_a3": src["adm0_a3"].fillna("").astype(str).values,
                            "pop_max": pop.values},
                           geometry=src.geometry.values, crs="EPSG:4326")
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]
    return gdf.sort_values(["country", "name", "pop_max"]).reset_index(drop=True)


def borders(source: Path) -> Any:
    """The lines two countries share: for each touching pair, the line parts of their boundaries' overlap."""
    import geopandas as gpd
    import shapely

    src = _read(source, COUNTRIES)
    geoms = _valid(src.geometry.values)
    names = src["ADMIN"].astype(str).tolist()
    codes = src["ADM0_A3"].astype(str).tolist()
    bounds = shapely.boundary(geoms)
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    rows = []
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        if i >= j:
            continue
        shared = shapely.intersection(bounds[i], bounds[j])
        lines = [p for p in shapely.get_parts(shared) if p.geom_type == "LineString" and p.length > 0]
        if not lines:
            continue
        line = shapely.line_merge(shapely.union_all(lines))
        a, b = sorted([(names[i], codes[i]), (names[j], codes[j])])
        rows.append({"country_a": a[0], "adm0_a3_a": a[1], "country_b": b[0], "adm0_a3_b": b[1],
                     "geometry": line})
    rows.sort(key=lambda r: (r["country_a"], r["country_b"]))
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")


def coastal_length_deg(lines: Any, source: Path) -> float:
    """Length (degrees) of the border lines that lie on the coast, the outline of all countries together."""
    import shapely

    coast = shapely.boundary(shapely.union_all(_valid(_read(source, COUNTRIES).geometry.values)))
    on_coast = shapely.intersection(lines.geometry.values, coast)
    return float(sum(p.length for g in on_coast for p in shapely.get_parts(g)
                     if p.geom_type in ("LineString", "MultiLineString")))


def write(layers: dict[str, Any], out: Path) -> str:
    """Write the layers into one GeoPackage atomically and reproducibly; returns its sha256."""
    import pyogrio

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".gpkg", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    old = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": PINNED_DATE})
    try:
        for name, gdf in layers.items():
            pyogrio.write_dataframe(gdf, tmp, layer=name, driver="GPKG", SPATIAL_INDEX="YES", append=True)
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": old})
    con = sqlite3.connect(tmp)
    try:
        con.execute("VACUUM")
    finally:
        con.close()
    os.replace(tmp, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return digest


def set_sha256sums(out: Path, digest: str, sums: Path = SHA256SUMS) -> None:
    """Put ``<digest>  <path relative to data/>`` in ``data/SHA256SUMS``, replacing the file's old line."""
    try:
        rel = out.resolve().relative_to(sums.parent.resolve()).as_posix()
    except ValueError:
        return  # written outside data/: nothing to record
    lines = sums.read_text().splitlines() if sums.is_file() else []
    kept = [ln for ln in lines if ln.split()[-1:] != [rel]]
    kept.append(f"{digest}  {rel}")
    sums.write_text("\n".join(kept) + "\n")


README = """# People and places: context layers

`people_places.gpkg` (EPSG:4326) holds the open layers from which `geo_dino.governance.people_places`
answers what a run's area of interest touches: urban areas, populated places and international borders.
Schools, health and religious sites, protected areas, airports and the other sensitive sites are not here:
they are in the sensitive-site registry `../registry/sensitive_sites.gpkg`.

`people_places.gpkg.sha256` holds the file's digest (`<hex>  <file name>`); the reader refuses a file whose
bytes do not match it. The same digest is in `../SHA256SUMS`.

sha256 `{sha}` ({size} bytes)

| layer | geometry | features | columns |
|---|---|---:|---|
| `urban_areas` | Polygon | {n_urban} | `area_sqkm` |
| `populated_places` | Point | {n_places} | `name`, `country`, `adm0_a3`, `pop_max` |
| `borders` | LineString, MultiLineString | {n_borders} | `country_a`, `adm0_a3_a`, `country_b`, `adm0_a3_b` |

## How it was built

- `urban_areas`: Natural Earth 1:50m urban areas (`ne_50m_urban_areas`), the polygons (repaired with
  `make_valid` where needed) with only `area_sqkm` kept (the source has no names); largest first.
- `populated_places`: Natural Earth 1:50m populated places, simple (`ne_50m_populated_places_simple`), the
  points with `name`, `country` (the source's `adm0name`), `adm0_a3` and `pop_max` (the largest population
  estimate Natural Earth gives; -1 where missing); sorted by country and name.
- `borders`: from Natural Earth 1:110m admin 0 countries (`ne_110m_admin_0_countries`): for every pair of
  country polygons that touch, the line parts of the intersection of their two boundaries, i.e. the border
  the two countries share, named by both (in alphabetical order). Coastlines are not in this layer, because
  a coast is the boundary of one country only; two countries that meet at a single point give no line.
  Checked: the length of border line lying on the outline of all countries together (the coast) is
  {coastal} degrees. At 1:110m a border can lie a few kilometres from the true one, and small countries
  (for example Andorra, Liechtenstein, Monaco) are not in the source at all, so their borders are missing.
- Geometries are {simplified}.

## Source and licence

Natural Earth (naturalearthdata.com), public domain ("Made with Natural Earth"). The GeoJSON files are from
martynafford/natural-earth-geojson (repository CC0-1.0).

## Rebuild

```sh
. .venv/bin/activate
python scripts/build_context_layers.py                       # reads ../shared/data/vectors/natural_earth
python scripts/build_context_layers.py /other/natural_earth  # another copy of the same inputs
```

The build sorts rows and pins the GeoPackage timestamps, so unchanged inputs give the same sha256. It also
updates the file's line in `data/SHA256SUMS`.
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    import shapely

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                    help=f"Natural Earth folder with {URBAN}, {PLACES} and {COUNTRIES}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output GeoPackage")
    args = ap.parse_args(argv)

    source = args.source.resolve()
    layers = {"urban_areas": urban_areas(source), "populated_places": populated_places(source),
              "borders": borders(source)}
    digest = write(layers, args.out)
    simplified = "not simplified: they are as in the source"
    if args.out.stat().st_size > MAX_BYTES:
        for name in ("urban_areas", "borders"):
            gdf = layers[name]
            layers[name] = gdf.set_geometry(shapely.simplify(gdf.geometry.values, SIMPLIFY_DEG,
                                                             preserve_topology=True))
        digest = write(layers, args.out)
        simplified = (f"simplified (urban areas and borders, tolerance {SIMPLIFY_DEG} degrees, topology "
                      f"preserved) because the unsimplified file would exceed {MAX_BYTES} bytes")
        print(f"file over {MAX_BYTES} bytes: geometries {simplified}")
    size = args.out.stat().st_size
    args.out.with_name("README.md").write_text(README.format(
        sha=digest, size=size, n_urban=len(layers["urban_areas"]), n_places=len(layers["populated_places"]),
        n_borders=len(layers["borders"]), simplified=simplified,
        coastal=f"{coastal_length_deg(layers['borders'], source):.6f}"))
    set_sha256sums(args.out, digest)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)\nsha256 {digest}")
    for name, gdf in layers.items():
        print(f"  {name:18s} {len(gdf)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
