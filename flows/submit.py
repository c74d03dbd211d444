"""AOI submissions to a Prefect server: by content, once.

:func:`submit_aoi` validates an AOI here (the messages of ``geo-dino validate-aoi``), then creates a flow run
of a ``run_aoi`` deployment through the Prefect API with the AOI's GeoJSON *text* as the ``aoi_geojson``
parameter, so the worker never needs the submitter's files. The flow run's idempotency key is made from the
AOI's sha256 and the sha256 of the deployment's parameters as this submission sets them
(:func:`submission_key`): the server keeps one flow run per key, so the same submission twice — from one
process or from many at once — runs once, and the second is told so (HTTP 200, not 201: the flow run
existed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from geo_dino.config import AOIOptions
from geo_dino.errors import AOIError, ConfigError, GeoDinoError

#: the biggest AOI accepted for a submission (it travels as a flow run parameter)
MAX_AOI_BYTES = 5_000_000


class SubmissionError(GeoDinoError):
    """A submission the Prefect server could not take (no server, no such deployment)."""


@dataclass(frozen=True)
class Submission:
    """What a submission made: the flow run (new, or the one this AOI and config already had)."""

    flow_run_id: str
    flow_run_name: str
    deployment: str
    key: str
    created: bool
    state: str | None
    aoi_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return asdict(self)


def read_aoi_text(path: Path, options: AOIOptions | None = None) -> tuple[str, str]:
    """The AOI file's text and sha256 after validating it as a run would (:func:`load_aoi`); GeoJSON only
    (a GeoPackage or Shapefile is converted first: ``ogr2ogr -f GeoJSON -t_srs EPSG:4326 out.geojson in``)."""
    from geo_dino.inputs.aoi import load_aoi

    path = Path(path)
    if path.suffix.lower() not in (".geojson", ".json"):
        raise AOIError(f"{path}: submit a GeoJSON AOI (convert it: ogr2ogr -f GeoJSON -t_srs EPSG:4326 "
                       f"-lco RFC7946=YES {path.with_suffix('.geojson').name} {path.name})")
    if not path.is_file():
        raise AOIError(f"{path}: no such AOI file")
    if path.stat().st_size > MAX_AOI_BYTES:
        raise AOIError(f"{path}: {path.stat().st_size} bytes; a submitted AOI may have at most "
                       f"{MAX_AOI_BYTES} (simplify it)")
    aoi = load_aoi(path, options)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AOIError(f"{path}: not UTF-8 text ({exc}); GeoJSON is UTF-8") from None
    return text, aoi.sha256


def submission_key(aoi_sha256: str, deployment_id: str, parameters: dict[str, Any]) -> str:
    """``geo-dino-<aoi sha256>-<config sha256>``: the config's sha256 over the deployment and its parameters
    as the submission sets them (without the AOI text), canonical JSON."""
    params = {k: v for k, v in parameters.items() if k != "aoi_geojson"}
    blob = json.dumps({"deployment": str(deployment_id), "parameters": params}, sort_keys=True, default=str)
    return f"geo-dino-{aoi_sha256}-{hashlib.sha256(blob.encode()).hexdigest()}"


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``k=v`` pairs: ``v`` as JSON when it parses (numbers, objects), else as text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: give KEY=VALUE (VALUE may be JSON, e.g. "
                              "overrides='{\"output_dir\": \"runs/x\"}')")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise SubmissionError("submissions go to a Prefect server: start one (prefect server start) and set "
                              "PREFECT_API_URL=http://HOST:4200/api")
    return str(url)


def submit_text(aoi_text: str, aoi_sha256: str, deployment: str, params: dict[str, Any] | None = None,
                client: Any = None) -> Submission:
    """Create (once) a flow run of ``deployment`` (``flow/deployment``, e.g. ``run_aoi/aoi-submissions``)
    for the AOI given as its GeoJSON text."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    url = _api_url()
    if client is None:
        try:
            with get_client(sync_client=True) as own:
                return submit_text(aoi_text, aoi_sha256, deployment, params, own)
        except httpx.HTTPError as exc:
            raise SubmissionError(f"cannot reach the Prefect server at {url} ({type(exc).__name__}: {exc}); "
                                  "is it running, and is PREFECT_API_URL right?") from None
    try:
        dep = client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise SubmissionError(f"no deployment {deployment!r} on {_api_url()} (names are FLOW/DEPLOYMENT, "
                              "e.g. run_aoi/aoi-submissions; `prefect deployment ls` lists them)") from None
    parameters = dict(params or {})
    key = submission_key(aoi_sha256, str(dep.id), dict(dep.parameters or {}) | parameters)
    body = {"parameters": parameters | {"aoi_geojson": aoi_text}, "idempotency_key": key,
            "state": {"type": "SCHEDULED", "name": "Scheduled"}, "tags": ["geo-dino", "submission"]}
    response = client.request("POST", "/deployments/{id}/create_flow_run", path_params={"id": dep.id},
                              json=body)
    run = response.json()
    state = (run.get("state") or {}).get("name")
    return Submission(flow_run_id=str(run["id"]), flow_run_name=str(run.get("name")), deployment=deployment,
                      key=key, created=response.status_code == 201, state=state, aoi_sha256=aoi_sha256)


def submit_aoi(path: Path, deployment: str, params: dict[str, Any] | None = None,
               client: Any = None) -> Submission:
    """Validate the AOI file, then submit it by content (:func:`submit_text`)."""
    text, sha = read_aoi_text(path)
    return submit_text(text, sha, deployment, params, client)
