"""The ``geo-dino`` command line. It starts the Prefect flow (ephemeral mode unless configured)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="DINO-family backbones from an area of interest to screened, georeferenced outputs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run configuration")] = None,
    aoi: Annotated[Optional[Path], typer.Option(help="GeoJSON area of interest (instead of a config)")] = None,
    raster: Annotated[Optional[list[Path]], typer.Option(help="one raster, or two for change (repeat)")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="where run folders are created")] = None,
    approve_by: Annotated[Optional[str], typer.Option(help="approver's name for require_approval sites")] = None,
    approve_reason: Annotated[Optional[str], typer.Option(help="reason for the approval")] = None,
    arch: Annotated[Optional[str], typer.Option(help="backbone architecture")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="local checkpoint file")] = None,
    accept_licence: Annotated[Optional[str], typer.Option(
        help="accept the weights' licence, by its exact name (e.g. 'DINOv3 License')")] = None,
) -> None:
    """Run the pipeline on an AOI and one or two rasters."""
    from geo_dino.errors import GeoDinoError, RunRefused

    overrides: dict = {}
    if aoi is not None:
        overrides["aoi"] = str(aoi)
    if raster:
        overrides["rasters"] = [str(r) for r in raster]
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    if approve_by or approve_reason:
        if not (approve_by and approve_reason):
            _fail("--approve-by and --approve-reason go together")
        overrides["screening"] = {"approval": {"approver": approve_by, "reason": approve_reason}}
    if arch or checkpoint or accept_licence:
        overrides["backbone"] = {k: str(v) for k, v in (("arch", arch), ("checkpoint", checkpoint),
                                                         ("accept_licence", accept_licence)) if v}
    if config is None and not (aoi and raster):
        _fail("give --config FILE, or --aoi FILE with one or two --raster FILE")

    from geo_dino.config import load_config, parse_config

    try:
        cfg = load_config(config, overrides) if config else parse_config(overrides)
    except GeoDinoError as exc:
        _fail(str(exc))
    from flows.run_aoi import run_aoi

    try:
        run_dir = run_aoi(config=json.loads(cfg.model_dump_json()))
    except RunRefused as exc:
        _fail(f"run refused by the sensitive-site screen: {exc}\n(the decision and the provenance record are "
              f"in the run folder under {cfg.output_dir})", 3)
    except GeoDinoError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    run_dir = Path(run_dir)
    typer.echo("")
    typer.secho(f"Outputs in {run_dir}", fg=typer.colors.GREEN, bold=True)
    for p in sorted(run_dir.glob("*")):
        if p.is_file():
            typer.echo(f"  {p.name}")
    typer.echo("\nOpen in QGIS: Layer > Add Layer > Add Raster Layer… and pick the .tif files (each .qml style "
               "beside a class raster is applied automatically), or drag the folder's .tif files onto the map. "
               "tiles.gpkg holds the tile index; provenance.json and screening.json the record and decision.")


@app.command()
def resume(run_dir: Path) -> None:
    """Finish a run that was killed during inference, from its last chunk checkpoint."""
    from geo_dino.errors import GeoDinoError

    if not (run_dir / "provenance.json").is_file():
        _fail(f"{run_dir} is not a run folder (no provenance.json)")
    from flows.run_aoi import resume_run

    try:
        out = resume_run(str(run_dir.resolve()))
    except (GeoDinoError, RuntimeError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    typer.secho(f"Outputs in {out}", fg=typer.colors.GREEN, bold=True)


@app.command("validate-aoi")
def validate_aoi(path: Path, repair: bool = typer.Option(False, help="repair self-intersections")) -> None:
    """Validate a GeoJSON AOI (RFC 7946) and print a summary."""
    from geo_dino.aoi import load_aoi
    from geo_dino.config import AOIOptions
    from geo_dino.errors import GeoDinoError

    try:
        aoi = load_aoi(path, AOIOptions(repair=repair))
    except GeoDinoError as exc:
        _fail(f"invalid AOI: {exc}")
    rec = aoi.to_record()
    rec.pop("geometry", None)
    typer.echo(json.dumps(rec, indent=2, default=str))


checkpoint_app = typer.Typer(help="Inspect and convert backbone checkpoints (never downloaded).",
                             no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("inspect")
def checkpoint_inspect(path: Path) -> None:
    """Detected layout and architecture, parameter count, sha256, licence and preprocessing of a file."""
    from geo_dino.checkpoints import inspect_file
    from geo_dino.errors import GeoDinoError

    try:
        info = inspect_file(path)
    except GeoDinoError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    typer.echo(json.dumps(info, indent=2, default=str))


@checkpoint_app.command("convert")
def checkpoint_convert(path: Path, out: Path,
                       arch: Annotated[Optional[str], typer.Option(help="registry architecture")] = None) -> None:
    """Convert any readable layout to timm-layout safetensors with metadata (and OUT.json)."""
    from geo_dino.checkpoints import convert_file
    from geo_dino.errors import GeoDinoError

    try:
        rec = convert_file(path, out, arch)
    except GeoDinoError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    typer.echo(json.dumps(rec, indent=2))


def main() -> None:  # pragma: no cover
    sys.exit(app())
