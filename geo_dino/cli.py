"""The ``geo-dino`` command line. It starts the Prefect flow (ephemeral mode unless configured)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from geo_dino.files import QGIS_PROJECT, RECORD

_T = TypeVar("_T")

app = typer.Typer(help="DINO-family backbones from an area of interest to screened, georeferenced outputs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        from geo_dino import __version__

        typer.echo(f"geo-dino {__version__}")
        raise typer.Exit()


#: set by ``geo-dino --debug``: tracebacks on the console (Prefect's, and the command's own)
_STATE = {"debug": False}


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False,
          debug: Annotated[bool, typer.Option(
              "--debug", help="show tracebacks (a user error is otherwise one line)")] = False) -> None:
    """DINO-family backbones from an area of interest to screened, georeferenced outputs."""
    _STATE["debug"] = debug


def _fail(msg: str, code: int = 2, exc: BaseException | None = None) -> NoReturn:
    if exc is not None and _STATE["debug"]:
        import traceback

        traceback.print_exception(exc)
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _error(exc: BaseException, code: int = 2) -> NoReturn:
    """A project error as one line: its kind and message (the traceback only with --debug)."""
    _fail(f"{type(exc).__name__}: {exc}", code, exc)


def _in_flow(call: Callable[[], _T]) -> _T:
    """Run a Prefect flow from the command line: a temporary server that ends with this command however it
    ends, and no tracebacks on the console for the project's own errors (unless --debug)."""
    from flows.console import flow_session

    with flow_session(_STATE["debug"]):
        return call()


_BandsOpt = Annotated[str | None, typer.Option(
    help="the raster bands the backbone takes, in order: 1-based indexes or descriptions, e.g. 3,2,1")]
_RootsOpt = Annotated[list[Path] | None, typer.Option(
    help="a folder rasters may be read from (repeat); the folders of --raster files are allowed anyway")]
_RegistryOpt = Annotated[Path | None, typer.Option(help="the sensitive-site registry (.gpkg)")]
_PolicyOpt = Annotated[Path | None, typer.Option(help="the screening policy (YAML)")]
_RandomOpt = Annotated[bool, typer.Option(
    help="run random weights on purpose (no --checkpoint): outputs show structure only")]
_WorkersOpt = Annotated[int | None, typer.Option(
    help="run the chunks on a local Dask cluster of N worker processes (execution.engine: dask)")]
_AddressOpt = Annotated[str | None, typer.Option(
    help="run the chunks on the Dask cluster whose scheduler is at tcp://HOST:PORT")]
#: the backbone a command-line run uses when none is named
SHIPPED_ARCH = "vit_tiny_patch8_geo"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "vit_tiny_patch8_geo.safetensors"


def _execution(workers: int | None, dask_address: str | None) -> dict[str, Any] | None:
    """The config's ``execution`` section for ``--workers`` / ``--dask-address`` (None: neither given)."""
    if workers is not None and dask_address is not None:
        _fail("--workers starts a local Dask cluster, --dask-address joins one: give one of them")
    if workers is not None:
        return {"engine": "dask", "workers": workers}
    if dask_address is not None:
        return {"engine": "dask", "address": dask_address}
    return None


def _bands(text: str) -> list[int | str]:
    """``3,2,1`` or ``red,green,blue`` (descriptions) → the config's ``sources.bands``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        _fail("--bands: give the bands in order, e.g. --bands 3,2,1 or --bands red,green,blue")
    return [int(t) if t.isdigit() else t for t in items]


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run configuration")] = None,
    aoi: Annotated[Path | None, typer.Option(help="GeoJSON area of interest (instead of a config)")] = None,
    raster: Annotated[list[Path] | None, typer.Option(help="one raster, or two for change (repeat)")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="where run folders are created")] = None,
    approve_by: Annotated[str | None, typer.Option(help="approver's name for require_approval sites")] = None,
    approve_reason: Annotated[str | None, typer.Option(help="reason for the approval")] = None,
    arch: Annotated[str | None, typer.Option(help="backbone architecture")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local checkpoint file")] = None,
    accept_licence: Annotated[str | None, typer.Option(
        help="accept the weights' licence, by its exact name (e.g. 'DINOv3 License')")] = None,
    head: Annotated[Path | None, typer.Option(
        help="a trained head (head.safetensors of geo-dino train-head)")] = None,
    cube: Annotated[bool, typer.Option(
        help="also write the feature cube (features.zarr) for geo-dino similar")] = False,
    workers: _WorkersOpt = None, dask_address: _AddressOpt = None,
    bands: _BandsOpt = None, allow_root: _RootsOpt = None, registry: _RegistryOpt = None,
    policy: _PolicyOpt = None, random_init: _RandomOpt = False,
) -> None:
    """Run the pipeline on an AOI and one or two rasters (the shipped backbone unless told otherwise)."""
    _run(config, aoi, raster, output_dir, approve_by, approve_reason, arch, checkpoint, accept_licence, head,
         cube, workers=workers, dask_address=dask_address, bands=bands, allow_root=allow_root,
         registry=registry, policy=policy, random_init=random_init)


def _run(config, aoi, raster, output_dir, approve_by, approve_reason, arch, checkpoint,  # noqa: ANN001
         accept_licence, head, cube, need_two: bool = False, workers: int | None = None,  # noqa: ANN001
         dask_address: str | None = None, bands: str | None = None, allow_root: list[Path] | None = None,
         registry: Path | None = None, policy: Path | None = None, random_init: bool = False) -> None:
    from geo_dino.errors import GeoDinoError, RunRefused

    overrides: dict = {}
    if random_init and checkpoint is not None:
        _fail("--random-init runs random weights; --checkpoint names weights: give one of them")
    if config is None and head is None and checkpoint is None and not random_init:
        if arch is not None and arch != SHIPPED_ARCH:
            _fail(f"--arch {arch} without --checkpoint would run random weights; give --checkpoint FILE "
                  "(local weights for that architecture), or --random-init to run random weights on purpose")
        if not SHIPPED_CHECKPOINT.is_file():
            _fail(f"the shipped backbone {SHIPPED_CHECKPOINT} is missing; give --arch and --checkpoint")
        arch, checkpoint = SHIPPED_ARCH, SHIPPED_CHECKPOINT
    if bands:
        overrides["sources"] = {"bands": _bands(bands)}
    screening = {k: str(v) for k, v in (("registry", registry), ("policy", policy)) if v is not None}
    if screening:
        overrides["screening"] = screening
    execution = _execution(workers, dask_address)
    if execution is not None:
        overrides["execution"] = execution
    if aoi is not None:
        overrides["aoi"] = str(aoi)
    if raster:
        overrides["rasters"] = [str(r) for r in raster]
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    if approve_by or approve_reason:
        if not (approve_by and approve_reason):
            _fail("--approve-by and --approve-reason go together")
        overrides["screening"] = overrides.get("screening", {}) | {
            "approval": {"approver": approve_by, "reason": approve_reason}}
    if head is not None and not (arch or checkpoint):
        # --head alone: the backbone, checkpoint and bands it was trained on (its metadata says which)
        from geo_dino.errors import GeoDinoError as _Err
        from geo_dino.run.heads import settings_from_head

        try:
            from_head = settings_from_head(head)
        except _Err as exc:
            _fail(str(exc), exc=exc)
        overrides["backbone"] = from_head["backbone"]
        if from_head["sources"]:
            overrides["sources"] = from_head["sources"] | overrides.get("sources", {})
        typer.echo(f"from the head: backbone {from_head['backbone'].get('arch')} "
                   f"({from_head['backbone'].get('checkpoint') or 'random-init'}), "
                   f"bands {from_head['sources'].get('bands')}, "
                   f"spectral bands {from_head['sources'].get('spectral_bands')}")
    if arch or checkpoint or accept_licence:
        overrides["backbone"] = overrides.get("backbone", {}) | {
            k: str(v) for k, v in (("arch", arch), ("checkpoint", checkpoint),
                                   ("accept_licence", accept_licence)) if v}
    if head is not None or cube:
        overrides["heads"] = ({"supervised": {"path": str(head)}} if head is not None else {}) | (
            {"cube": True} if cube else {})
    if config is None and not (aoi and raster):
        _fail("give --config FILE, or --aoi FILE with " + ("two --raster FILE (the dates)" if need_two else
                                                           "one or two --raster FILE"))

    from geo_dino.config import load_config, parse_config

    try:
        cfg = load_config(config, overrides) if config else parse_config(overrides)
    except GeoDinoError as exc:
        _fail(str(exc), exc=exc)
    if need_two and len(cfg.rasters) != 2:
        _fail(f"change needs two rasters (two dates); got {len(cfg.rasters)}")
    roots = [p.resolve() for p in (allow_root or [])] + [Path(r).resolve().parent for r in (raster or [])]
    if roots:  # the folder of a raster named on the command line is allowed: the user named that file
        known = list(cfg.sources.allowed_roots)
        cfg = cfg.model_copy(update={"sources": cfg.sources.model_copy(
            update={"allowed_roots": known + [p for p in roots if p not in known]})})
    if cfg.backbone.checkpoint is None:
        typer.secho(f"backbone: {cfg.backbone.arch} with RANDOM weights (seed {cfg.backbone.seed}), no "
                    "pretrained checkpoint: the outputs show the image's structure only",
                    fg=typer.colors.YELLOW, err=True)
    from geo_dino.run.plan import preflight

    try:  # everything that can be checked before a run folder exists: a bad input is one line, no folder
        preflight(cfg)
    except GeoDinoError as exc:
        _error(exc)
    from flows.run_aoi import run_aoi
    from geo_dino.run.console_progress import console_progress

    try:
        with console_progress():  # stage lines and the tiles' bar on stderr
            run_dir = Path(_in_flow(lambda: run_aoi(config=json.loads(cfg.model_dump_json()))))
    except RunRefused as exc:
        _fail(f"run refused by the sensitive-site screen: {exc}\n(the decision and the provenance record are "
              f"in the run folder under {cfg.output_dir})", 3, exc)
    except GeoDinoError as exc:
        _error(exc)
    typer.echo("")
    typer.secho(f"Outputs in {run_dir}", fg=typer.colors.GREEN, bold=True)
    for p in sorted(run_dir.glob("*")):
        if p.is_file():
            typer.echo(f"  {p.name}")
    if (run_dir / QGIS_PROJECT).exists():
        typer.echo(f"\nOpen in QGIS: Project > Open… {run_dir / QGIS_PROJECT} "
                   "(every output, grouped and styled).")
    typer.echo("Or add the .tif files as layers (each .qml style beside a raster is applied automatically). "
               "provenance.json is the run's record, stac_item.json its STAC Item, "
               "screening.json the decision.")


@app.command()
def change(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run configuration")] = None,
    aoi: Annotated[Path | None, typer.Option(help="GeoJSON area of interest (instead of a config)")] = None,
    raster: Annotated[list[Path] | None, typer.Option(
        help="the two dates: --raster BEFORE --raster AFTER")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="where run folders are created")] = None,
    approve_by: Annotated[str | None, typer.Option(help="approver's name for require_approval sites")] = None,
    approve_reason: Annotated[str | None, typer.Option(help="reason for the approval")] = None,
    arch: Annotated[str | None, typer.Option(help="backbone architecture")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local checkpoint file")] = None,
    accept_licence: Annotated[str | None, typer.Option(help="accept the weights' licence by name")] = None,
    head: Annotated[Path | None, typer.Option(
        help="a trained change head (else label-free change only)")] = None,
    workers: _WorkersOpt = None, dask_address: _AddressOpt = None,
    bands: _BandsOpt = None, allow_root: _RootsOpt = None, registry: _RegistryOpt = None,
    policy: _PolicyOpt = None, random_init: _RandomOpt = False,
) -> None:
    """Change between two dates: label-free change (the spectrum and the features fused, minimum-error
    threshold), and a trained change head's probability and binary change when --head is given (its
    backbone, checkpoint and bands come with it)."""
    _run(config, aoi, raster, output_dir, approve_by, approve_reason, arch, checkpoint, accept_licence, head,
         False, need_two=True, workers=workers, dask_address=dask_address, bands=bands,
         allow_root=allow_root, registry=registry, policy=policy, random_init=random_init)


@app.command("train-head")
def train_head_cmd(
    config: Annotated[Path, typer.Argument(help="YAML head training configuration")],
    output_dir: Annotated[Path | None, typer.Option(help="where the run folder is created")] = None,
    head_type: Annotated[str | None, typer.Option("--type", help="linear or dpt")] = None,
) -> None:
    """Train a segmentation or change head on frozen backbone features from georeferenced labels."""
    from geo_dino.errors import GeoDinoError
    from geo_dino.training.head_config import load_head_config

    overrides: dict = {}
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    if head_type is not None:
        overrides["head"] = {"type": head_type}
    try:
        cfg = load_head_config(config, overrides)
    except GeoDinoError as exc:
        _fail(str(exc), exc=exc)
    from flows.train_head import train_head_flow

    try:
        res = _in_flow(lambda: train_head_flow(config=json.loads(cfg.model_dump_json())))
    except GeoDinoError as exc:
        _error(exc)
    typer.secho(f"Head: {res['head']}", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"Held-out test mIoU {res['test_miou']:.3f}, macro F1 {res['test_macro_f1']:.3f} "
               f"(metrics.json and split.gpkg in {res['run_dir']}). "
               f"Use it with: geo-dino run --head {res['head']} …")


@app.command()
def similar(
    cube: Annotated[Path, typer.Option(
        help="a run folder with features.zarr (geo-dino run --cube), or the cube")],
    example: Annotated[Path, typer.Option(help="GeoJSON polygon(s) of the example (EPSG:4326)")],
    top_k: Annotated[int, typer.Option(help="how many matching places")] = 10,
    min_separation: Annotated[int, typer.Option(help="cells between matches")] = 4,
    name: Annotated[str, typer.Option(help="output name in the run folder")] = "similarity",
) -> None:
    """Search by example: cosine similarity of every place's features to the example's mean feature (a COG)
    and the top-k matching places (a GeoPackage), written into the cube's run folder."""
    from geo_dino.errors import GeoDinoError

    cube_path = cube / "features.zarr" if (cube / "features.zarr").exists() else cube
    try:
        from geo_dino.outputs.similar import load_example, similarity

        res = similarity(cube_path, load_example(example), run_dir=cube_path.parent, name=name, top_k=top_k,
                         min_separation_cells=min_separation)
    except GeoDinoError as exc:
        _error(exc)
    typer.secho(f"Similarity: {cube_path.parent / (name + '.tif')}", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"Top {res['matches']['count']} places in {res['matches']['path']}; best scores "
               f"{', '.join(f'{s:.3f}' for s in res['top_scores'][:5])}")
    if res.get("project"):
        typer.echo(f"Open {cube_path.parent / res['project']} in QGIS: the similarity and its matches are "
                   "shown, styled.")


@app.command()
def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML pretraining configuration")],
    nproc: Annotated[int, typer.Option(
        help="processes (DDP through torchrun: gloo on CPU, NCCL on GPUs)")] = 1,
    steps: Annotated[int | None, typer.Option(help="override recipe.steps")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="where the run folder is created")] = None,
    name: Annotated[str | None, typer.Option(help="override the run name")] = None,
) -> None:
    """
    DINO self-supervised pretraining on rasters; resumes from the run folder's checkpoint when there is one.
    """
    from geo_dino.errors import GeoDinoError
    from geo_dino.training.pretrain_config import load_pretrain_config

    overrides: dict = {}
    if steps is not None:
        overrides["recipe"] = {"steps": steps}
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    if name is not None:
        overrides["name"] = name
    if nproc < 1:
        _fail("--nproc must be at least 1")
    try:
        cfg = load_pretrain_config(config, overrides)
    except GeoDinoError as exc:
        _fail(str(exc), exc=exc)
    from flows.pretrain import pretrain_flow

    try:
        res = _in_flow(lambda: pretrain_flow(config=json.loads(cfg.model_dump_json()), nproc=nproc,
                                             config_file=str(config)))
    except GeoDinoError as exc:
        _error(exc)
    typer.secho(f"Backbone: {res['checkpoint']} (sha256 {res['sha256']})", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"Model card, metrics and checkpoint in {Path(res['checkpoint']).parent}. Use it with "
               f"backbone.checkpoint: {res['checkpoint']} and backbone.arch: {cfg.backbone.arch}.")


@app.command()
def resume(
    run_dir: Path,
    workers: _WorkersOpt = None, dask_address: _AddressOpt = None,
) -> None:
    """Finish a run that was killed during inference: the chunks that have no result, then the outputs (on
    the run's own engine, or on --workers / --dask-address)."""
    from geo_dino.errors import GeoDinoError

    if not (run_dir / RECORD).is_file():
        _fail(f"{run_dir} is not a run folder (no provenance.json)")
    from flows.run_aoi import resume_run

    execution = _execution(workers, dask_address)
    if execution is not None:
        from pydantic import ValidationError

        from geo_dino.config import ExecutionConfig

        try:
            ExecutionConfig.model_validate(execution)
        except ValidationError as exc:
            _fail(f"{'; '.join(e['msg'] for e in exc.errors())}")
    try:
        out = _in_flow(lambda: resume_run(str(run_dir.resolve()), execution))
    except (GeoDinoError, RuntimeError) as exc:
        _error(exc)
    typer.secho(f"Outputs in {out}", fg=typer.colors.GREEN, bold=True)


@app.command()
def submit(
    aoi: Annotated[Path, typer.Argument(help="the AOI (GeoJSON): validated here, sent by content")],
    deployment: Annotated[str, typer.Option(
        help="the run_aoi deployment, FLOW/NAME (e.g. run_aoi/aoi-submissions)")],
    param: Annotated[list[str] | None, typer.Option(
        help="a flow-run parameter KEY=VALUE (VALUE may be JSON; repeat)")] = None,
) -> None:
    """Submit an AOI to a deployment on the Prefect server (PREFECT_API_URL): one flow run per AOI and
    config — the same submission again is told it exists and runs once."""
    from geo_dino.errors import GeoDinoError

    try:
        from flows.submit import parse_params, submit_aoi

        sub = submit_aoi(aoi, deployment, parse_params(param))
    except GeoDinoError as exc:
        _error(exc)
    if sub.created:
        typer.secho(f"submitted: flow run {sub.flow_run_name} ({sub.flow_run_id}) of {deployment}, "
                    f"{sub.state}", fg=typer.colors.GREEN)
    else:
        typer.secho(f"already submitted: this AOI and config are flow run {sub.flow_run_name} "
                    f"({sub.flow_run_id}), {sub.state}; it runs once, not again", fg=typer.colors.YELLOW)


@app.command("validate-aoi")
def validate_aoi(path: Path, repair: bool = typer.Option(False, help="repair self-intersections")) -> None:
    """Validate a GeoJSON AOI (RFC 7946) and print a summary."""
    from geo_dino.config import AOIOptions
    from geo_dino.errors import GeoDinoError
    from geo_dino.inputs.aoi import load_aoi

    try:
        aoi = load_aoi(path, AOIOptions(repair=repair))
    except GeoDinoError as exc:
        _fail(f"invalid AOI: {exc}", exc=exc)
    rec = aoi.to_record()
    rec.pop("geometry", None)
    typer.echo(json.dumps(rec, indent=2, default=str))


checkpoint_app = typer.Typer(help="Inspect and convert backbone checkpoints (never downloaded).",
                             no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("inspect")
def checkpoint_inspect(path: Path) -> None:
    """Detected layout and architecture, parameter count, sha256, licence and preprocessing of a file."""
    from geo_dino.errors import GeoDinoError
    from geo_dino.models.checkpoints import inspect_file

    try:
        info = inspect_file(path)
    except GeoDinoError as exc:
        _error(exc)
    typer.echo(json.dumps(info, indent=2, default=str))


@checkpoint_app.command("convert")
def checkpoint_convert(
    path: Path, out: Path, arch: Annotated[str | None, typer.Option(help="registry architecture")] = None,
) -> None:
    """Convert any readable layout to timm-layout safetensors with metadata (and OUT.json)."""
    from geo_dino.errors import GeoDinoError
    from geo_dino.models.backbone import convert_file

    try:
        rec = convert_file(path, out, arch)
    except GeoDinoError as exc:
        _error(exc)
    typer.echo(json.dumps(rec, indent=2))


eval_app = typer.Typer(help="Evaluate frozen features on labelled images: weighted k-NN and linear probe.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

_DataArg = Annotated[Path, typer.Argument(
    help="labels CSV (path,class[,class_index],split) or an image folder "
         "(ROOT/train|test/<class>/ or ROOT/<class>/)")]
_Arch = Annotated[str | None, typer.Option(help="backbone architecture (registry name)")]
_Ckpt = Annotated[Path | None, typer.Option(help="local checkpoint file (default: seeded random init)")]
_Sha = Annotated[str | None, typer.Option(help="expected sha256 of the checkpoint")]
_Licence = Annotated[str | None, typer.Option(help="accept the weights' licence, by its exact name")]
_Raw = Annotated[bool, typer.Option("--raw-pixels", help="evaluate raw pixels instead of a backbone")]
_Size = Annotated[int | None, typer.Option(
    help="resize to SIZE x SIZE (a multiple of the patch size); default: the images' own size rounded up")]
_Pool = Annotated[str, typer.Option(help="features: cls | mean (of patch tokens) | cls+mean")]
_Batch = Annotated[int, typer.Option(help="images per forward pass")]
_Bands = Annotated[str | None, typer.Option(help="1-based bands to use, comma-separated (e.g. 4,3,2)")]
_Range = Annotated[str | None, typer.Option(
    help="LOW,HIGH pixel values mapped to 0 and 1 (needed for non-uint8 images)")]
_Frac = Annotated[float, typer.Option(help="test share per class for ROOT/<class>/ folders (seeded split)")]
_Seed = Annotated[int, typer.Option(help="seed of random init, folder split and held-out split")]
_Device = Annotated[str, typer.Option(help="torch device for the backbone")]
_Out = Annotated[Path | None, typer.Option(help="write the result as JSON here")]


def _numbers(text: str | None, kind: type, what: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        _fail(f"{what} {text!r}: give comma-separated numbers")
    return None


def _eval(method: str, data: Path, arch: str | None, checkpoint: Path | None, checkpoint_sha256: str | None,
          accept_licence: str | None, raw_pixels: bool, size: int | None, pool: str, batch_size: int,
          bands: str | None, value_range: str | None, test_fraction: float, seed: int, device: str,
          out: Path | None, **method_opts: Any) -> None:
    from geo_dino.errors import GeoDinoError

    if raw_pixels == bool(arch):
        _fail("give --arch ARCH (a backbone) or --raw-pixels (the raw-pixel baseline), one of them")
    if raw_pixels and (checkpoint or checkpoint_sha256 or accept_licence):
        _fail("--checkpoint, --checkpoint-sha256 and --accept-licence belong to --arch, not --raw-pixels")
    band_list = _numbers(bands, int, "--bands")
    vrange = _numbers(value_range, float, "--value-range")
    if vrange is not None and len(vrange) != 2:
        _fail(f"--value-range {value_range!r}: give LOW,HIGH")
    from geo_dino.evaluation import probes as ev
    try:
        ds = ev.load_labelled(data, test_fraction=test_fraction, seed=seed)
        common: dict[str, Any] = {"size": size, "bands": band_list, "value_range": vrange}
        if raw_pixels:
            fs = ev.pixel_features(ds, **common)
        else:
            if arch is None:  # unreachable after the check above; keeps the types exact
                _fail("give --arch (a backbone) or --raw-pixels")
            fs = ev.backbone_features(ds, arch=arch, checkpoint=checkpoint,
                                      checkpoint_sha256=checkpoint_sha256, accept_licence=accept_licence,
                                      seed=seed, device=device, pool=pool, batch_size=batch_size, **common)
        res = ev.evaluate_features(fs, method, seed=seed, **method_opts)
        if out is not None:
            res.write_json(out)
    except GeoDinoError as exc:
        _error(exc)
    typer.echo(res.summary() + (f" -> {out}" if out is not None else ""))


@eval_app.command("knn")
def eval_knn(data: _DataArg, arch: _Arch = None, checkpoint: _Ckpt = None, checkpoint_sha256: _Sha = None,
             accept_licence: _Licence = None, raw_pixels: _Raw = False, size: _Size = None,
             pool: _Pool = "cls",
             k: Annotated[int, typer.Option(help="neighbours")] = 20,
             temperature: Annotated[float, typer.Option(help="vote weight exp(similarity / T)")] = 0.07,
             batch_size: _Batch = 64, bands: _Bands = None, value_range: _Range = None,
             test_fraction: _Frac = 0.25, seed: _Seed = 0, device: _Device = "cpu", out: _Out = None) -> None:
    """Weighted k-NN accuracy (DINO's eval_knn: cosine similarity, top-k votes weighted exp(sim / T))."""
    _eval("knn", data, arch, checkpoint, checkpoint_sha256, accept_licence, raw_pixels, size, pool,
          batch_size, bands, value_range, test_fraction, seed, device, out, k=k, temperature=temperature)


@eval_app.command("linear")
def eval_linear(data: _DataArg, arch: _Arch = None, checkpoint: _Ckpt = None, checkpoint_sha256: _Sha = None,
                accept_licence: _Licence = None, raw_pixels: _Raw = False, size: _Size = None,
                pool: _Pool = "cls",
                val_fraction: Annotated[float, typer.Option(
                    help="share of each training class held out to choose the regularisation")] = 0.2,
                batch_size: _Batch = 64, bands: _Bands = None, value_range: _Range = None,
                test_fraction: _Frac = 0.25, seed: _Seed = 0, device: _Device = "cpu",
                out: _Out = None) -> None:
    """
    Linear-probe accuracy (logistic regression on frozen, standardised features; C chosen on held-out data).
    """
    _eval("linear", data, arch, checkpoint, checkpoint_sha256, accept_licence, raw_pixels, size, pool,
          batch_size, bands, value_range, test_fraction, seed, device, out, val_fraction=val_fraction)


record_app = typer.Typer(help="A run's deployment record: the six parts, who decided, what is missing.",
                         no_args_is_help=True)
app.add_typer(record_app, name="record")


def _record_of(run_dir: Path) -> dict[str, Any]:
    from geo_dino.errors import GeoDinoError
    from geo_dino.run.deployment import make_record

    if not (run_dir / RECORD).is_file():
        _fail(f"{run_dir} is not a run folder (no provenance.json)")
    try:
        return make_record(run_dir)
    except GeoDinoError as exc:
        _error(exc)


@record_app.command("show")
def record_show(run_dir: Path, as_json: Annotated[bool, typer.Option(
        "--json", help="the JSON record instead of the tables")] = False) -> None:
    """Print the run's deployment record as it stands now (made from its folder)."""
    from geo_dino.governance.deployment import to_markdown

    rec = _record_of(run_dir)
    typer.echo(json.dumps(rec, indent=2, ensure_ascii=False) if as_json else to_markdown(rec))


@record_app.command("check")
def record_check(run_dir: Path) -> None:
    """Say what the run's deployment record lacks (unknown fields) or what is stale (a checkpoint past its
    retirement); exit 1 when anything is, 0 when the record is complete."""
    from geo_dino.errors import GeoDinoError
    from geo_dino.governance.deployment import incomplete, validate

    rec = _record_of(run_dir)
    try:
        validate(rec)
    except GeoDinoError as exc:
        _fail(f"{type(exc).__name__}: {exc}", 1)
    missing = incomplete(rec)
    retire = rec["governance_route"]["retirement"]
    stale = isinstance(retire.get("value"), dict) and retire["value"].get("stale")
    for name in missing:
        part, field = name.split(".", 1)
        why = rec[part][field].get("value")
        typer.echo(f"unknown: {name}" + (f" ({why})" if why else "") + f" — decided by: "
                   f"{rec[part][field]['decided_by']}")
    if stale:
        typer.echo(f"stale: governance_route.retirement (due {retire['value'].get('due')})")
    if missing or stale:
        typer.secho(f"{run_dir.name}: the deployment record is incomplete ({len(missing)} unknown"
                    + (", checkpoint stale" if stale else "") + ")", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.secho(f"{run_dir.name}: the deployment record is complete (every field filled or not applicable)",
                fg=typer.colors.GREEN)


governance_app = typer.Typer(help="The governance fields a run or a deployment must fill.",
                             no_args_is_help=True)
app.add_typer(governance_app, name="governance")


@governance_app.command("check")
def governance_check(path: Path, deployment: Annotated[bool, typer.Option(
        help="check a run config as a deployment's (a prefect.yaml's always are)")] = False) -> None:
    """Check a run config, or every run_aoi deployment of a prefect.yaml, against its governance policy:
    exit 1 naming each missing field. flows/prefect.yaml runs this as a build step, so `prefect deploy`
    refuses a deployment that lacks them."""
    import yaml

    from geo_dino.config import load_config
    from geo_dino.errors import GeoDinoError
    from geo_dino.governance.deployment import check_governance

    if not path.is_file():
        _fail(f"{path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        _fail(f"{path}: not YAML ({exc})")
    targets: list[tuple[str, Path, bool]] = []
    if isinstance(doc, dict) and "deployments" in doc:
        for dep in doc.get("deployments") or []:
            if str(dep.get("entrypoint", "")).endswith(":run_aoi"):
                cfg_path = (dep.get("parameters") or {}).get("config_path")
                if not cfg_path:
                    _fail(f"deployment {dep.get('name')}: run_aoi without parameters.config_path", 1)
                targets.append((f"deployment {dep.get('name')}", Path(cfg_path), True))
    else:
        targets.append((str(path), path, deployment))
    failed = 0
    for where, cfg_path, as_deployment in targets:
        try:
            check_governance(load_config(cfg_path).governance, deployment=as_deployment, where=where)
            typer.echo(f"{where}: governance fields complete")
        except GeoDinoError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            failed += 1
    if failed:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    """Run the ``geo-dino`` command line and exit with its status."""
    sys.exit(app())
