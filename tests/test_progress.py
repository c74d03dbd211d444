"""Progress people can see: the event bus, ``run.log`` of a real run, the command line's progress lines and
the flow's Prefect artifacts (progress, final report)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from geo_dino.config import parse_config
from geo_dino.run import progress
from geo_dino.run import stages as pl
from geo_dino.run.runlog import run_log
from tests.conftest import ROOT, run_folders

CLI = str(Path(sys.executable).with_name("geo-dino"))
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .+$")


# ------------------------------------------------------------------------------------------------ the bus
def test_events_reach_listeners_only_while_they_listen(tmp_path):
    run = tmp_path / "r"
    progress.stage(run, "screening")  # nobody listens: dropped, nothing counted
    progress.advance(run, 5, 10)
    assert not progress.active() and progress.tiles_done(run) == (0, 0)
    got: list[progress.Event] = []
    with progress.listening(got.append):
        assert progress.active()
        progress.stage(run, "screening", "the AOI against the registry")
        progress.stage(run, "screening", "again")  # the stage it is in: one event
        progress.stage(str(run), "inference", "30 tiles")  # a str path is the same run
        progress.tiles(run, 0, 30)
        progress.advance(run, 16)
        progress.advance(run, 16)  # past the total: capped
        progress.tiles(tmp_path / "other", 3)
        assert progress.tiles_done(run) == (30, 30)
    progress.stage(run, "done")  # after the block: not delivered
    assert [(e.kind, e.name, e.message) for e in got if e.kind == "stage"] == [
        ("stage", "screening", "the AOI against the registry"), ("stage", "inference", "30 tiles")]
    tiles = [(e.run_dir.name, e.done, e.total) for e in got if e.kind == "tiles"]
    assert tiles == [("r", 0, 30), ("r", 16, 30), ("r", 30, 30), ("other", 3, 0)]
    assert got[-2].fraction == 1.0 and got[-1].fraction is None
    assert all(e.run_dir.is_absolute() for e in got)
    assert progress.tiles_done(run) == (0, 0)  # the last listener left: the counts are forgotten


def test_a_failing_listener_stops_neither_the_run_nor_the_others(tmp_path, caplog):
    def broken(event):
        raise RuntimeError("display gone")

    got = []
    with progress.listening(broken), progress.listening(got.append), \
            caplog.at_level(logging.WARNING, "geo_dino.run.progress"):
        progress.advance(tmp_path, 3, 9)
    assert [(e.done, e.total) for e in got] == [(3, 9)]
    assert "display gone" in caplog.text


def test_counting_from_many_threads_loses_nothing_and_arrives_in_order(tmp_path):
    """Eight threads advance one run 500 times each: the count is 4000, every event is delivered once, in
    the order the counts were made (each listener sees 1, 2, …, 4000), and listeners come and go meanwhile."""
    run = tmp_path / "r"
    seen: list[int] = []
    with progress.listening(lambda e: seen.append(e.done) if e.kind == "tiles" else None):
        stop = threading.Event()

        def churn():
            while not stop.is_set():
                with progress.listening(lambda e: None):
                    pass

        def work():
            for _ in range(500):
                progress.advance(run, 1)

        churner = threading.Thread(target=churn)
        churner.start()
        workers = [threading.Thread(target=work) for _ in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        churner.join()
        assert progress.tiles_done(run) == (4000, 0)
    assert seen == list(range(1, 4001))


# ---------------------------------------------------------------------------------------------- run.log
def test_run_log_lines_the_throttle_and_a_full_disk(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    with run_log(run, every_s=3600) as handler:
        progress.stage(run, "inference", "30 tiles in 3 chunks")
        for _ in range(3):
            progress.advance(run, 10, 30)  # the first line, then nothing until the last tile
        progress.advance(tmp_path / "other", 1, 2)  # another run's: not in this log
        logging.getLogger("geo_dino.run.somewhere").warning("a library warning")
        logging.getLogger("prefect.flow_runs").warning("a flow run's line")
        logging.getLogger("prefect.task_runs").error("a task run's line")
        logging.getLogger("rasterio").warning("not ours")
    logging.getLogger("geo_dino").warning("after the block")
    assert handler not in logging.getLogger("geo_dino").handlers
    lines = (run / "run.log").read_text(encoding="utf-8").splitlines()
    assert all(LINE.match(ln) for ln in lines), lines
    body = [ln.split(" ", 2)[2] for ln in lines]
    assert body[:2] == ["geo_dino.progress: run r: log opened",
                        "geo_dino.progress: stage inference: 30 tiles in 3 chunks"]
    assert re.fullmatch(r"geo_dino\.progress: tiles 10/30 \(33\.3 %\)(, [\d.]+ tiles/s)?", body[2])
    assert re.fullmatch(r"geo_dino\.progress: tiles 30/30 \(100\.0 %\)(, [\d.]+ tiles/s)?", body[3])
    assert body[4:] == ["geo_dino.run.somewhere: a library warning", "prefect.flow_runs: a flow run's line",
                        "prefect.task_runs: a task run's line"]
    with run_log(run, every_s=0):  # appended; every tile event a line
        progress.advance(run, 1, 3)
        progress.advance(run, 1)
    assert (run / "run.log").read_text(encoding="utf-8").count("progress: tiles ") == 4
    # a full disk (writes to /dev/full fail with ENOSPC) or a log that cannot be opened: lines are lost,
    # nothing is raised and nothing is printed
    full, gone = tmp_path / "full", tmp_path / "gone"
    full.mkdir()
    (full / "run.log").symlink_to("/dev/full")
    capsys.readouterr()
    for where in (full, gone):
        with run_log(where):
            progress.stage(where, "inference")
            logging.getLogger("geo_dino").error("lost")
    # (other handlers — Prefect's console, once an earlier test set it up — may print "lost"; the run log's
    # own handler must print nothing: no traceback of its failed writes)
    err = capsys.readouterr().err
    assert "runlog.py" not in err and "No space left" not in err and "/dev/full" not in err
    assert not gone.exists()


def test_a_real_run_writes_stage_and_tile_lines_to_run_log(tiny_config):
    """The stages of run_local, in a run_log block from the moment the folder exists: the inference and
    writing stages, the tiles to the last, Prefect's loggers attached without Prefect."""
    cfg = parse_config(tiny_config())
    run_dir = pl.prepare_run(cfg)
    events: list[progress.Event] = []
    with run_log(run_dir), progress.listening(events.append):
        pl.screen_aoi(run_dir)
        pl.plan_run(run_dir)
        pl.fit_heads(run_dir)
        pl.init_outputs(run_dir)
        pl.infer_chunks(run_dir)
        pl.finalize_outputs(run_dir)
        pl.complete_run(run_dir)
    n = json.loads((run_dir / "plan.json").read_text())["tiling"]["n_tiles"]
    text = (run_dir / "run.log").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert all(LINE.match(ln) for ln in lines), lines
    stages = [ln.split("stage ", 1)[1] for ln in lines if " geo_dino.progress: stage " in ln]
    names = [s.split(":")[0] for s in stages]
    assert names.index("inference") < names.index("writing outputs")
    assert f"inference: {n} tiles in " in "\n".join(stages)
    tile_lines = [ln for ln in lines if " geo_dino.progress: tiles " in ln]
    assert tile_lines and tile_lines[-1].split("progress: ")[1].startswith(f"tiles {n}/{n} (100.0 %)")
    tile_events = [e for e in events if e.kind == "tiles"]
    assert tile_events[-1].done == n and len(tile_lines) < len(tile_events)  # at most one line per 10 s
    assert [e.done for e in tile_events] == sorted(e.done for e in tile_events)
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "succeeded"


def test_progress_modules_do_not_import_prefect():
    code = ("import sys, geo_dino.run.progress, geo_dino.run.runlog, geo_dino.run.console_progress, "
            "geo_dino.run.chunks, geo_dino.run.engine; print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ the console
def _feed(run):
    progress.stage(run, "fitting label-free heads", "16 tiles")
    progress.stage(run, "inference", "100 tiles in 7 chunks")
    progress.tiles(run, 0, 100)
    for _ in range(50):
        progress.advance(run, 2)
    progress.stage(run, "writing outputs")


def test_plain_progress_lines_off_a_terminal(tmp_path):
    from geo_dino.run.console_progress import console_progress

    out = io.StringIO()
    with console_progress(out):
        _feed(tmp_path)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["fitting label-free heads: 16 tiles", "inference: 100 tiles in 7 chunks"]
    assert lines[-1] == "writing outputs"
    tiles = lines[2:-1]
    assert len(tiles) == 11  # 0 %, then each further tenth: 10 % … 100 %
    assert [int(t.split("/")[0]) for t in tiles] == list(range(0, 101, 10))
    assert tiles[-1].startswith("100/100 tiles (100 %)") and "tiles/s" in tiles[-1]
    assert "left" in tiles[5]


def test_the_bar_on_a_terminal(tmp_path):
    from rich.console import Console

    from geo_dino.run.console_progress import console_progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with console_progress(console=console):
        _feed(tmp_path)
    text = out.getvalue()
    assert "fitting label-free heads: 16 tiles" in text and "writing outputs" in text
    assert "100/100 tiles" in text and "tiles/s" in text and "━" in text


@pytest.mark.slow
def test_the_command_line_shows_stages_and_tiles(tmp_path):
    """`geo-dino run` in a fresh process whose stderr is not a terminal: plain stage lines, tiles lines at
    most every tenth, the last one N/N tiles."""
    res = subprocess.run([CLI, "run", "--aoi", "aoi/bahamas_andros.geojson",
                          "--raster", "data/rasters/landsat7_bahamas_RGB.byte.tif",
                          "--arch", "vit_tiny_patch16_dinov3_test", "--random-init",
                          "--output-dir", str(tmp_path / "runs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = run_folders(tmp_path / "runs")
    n = json.loads((run_dir / "plan.json").read_text())["tiling"]["n_tiles"]
    lines = res.stderr.splitlines()
    at = {name: next(i for i, ln in enumerate(lines) if ln.startswith(f"{name}:"))
          for name in ("inference", "writing outputs")}
    assert lines[at["inference"]].startswith(f"inference: {n} tiles in ")
    tiles = [ln for ln in lines if re.match(r"^\d+/\d+ tiles \(", ln)]
    assert 1 <= len(tiles) <= 11
    assert tiles[-1].startswith(f"{n}/{n} tiles (100 %)")
    assert at["inference"] < lines.index(tiles[-1]) < at["writing outputs"]
    assert f"Outputs in {run_dir}" in res.stdout


# ----------------------------------------------------------------------------------------- the artifacts
def test_artifacts_are_nothing_outside_a_flow_run(tmp_path):
    from flows.progress import final_report, progress_artifact

    with progress_artifact(tmp_path, 10) as art:
        progress.advance(tmp_path, 10, 10)
    assert art is None and final_report(tmp_path) is None


def test_artifact_keys_are_what_prefect_accepts():
    from flows.progress import artifact_key

    assert artifact_key("geo-dino-run", Path("/x/Demo_Run-20260501T120000Z-A1b2")) == \
        "geo-dino-run-demo-run-20260501t120000z-a1b2"


@pytest.mark.slow
def test_the_flow_publishes_progress_and_report_artifacts(tiny_config, tmp_path):
    """A real finished run (Nassau: an airport masked) and a flow in ephemeral mode that follows tiles with
    a progress artifact and publishes the report: read back from the API, the progress reached 100 (and one
    that ended with an error did not), the report has the decision, the site and the outputs."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from flows.progress import final_report, progress_artifact, report_markdown

    run_dir = pl.run_local(parse_config(tiny_config("aoi/bahamas_nassau.geojson")))
    broken = tmp_path / "broken-run"

    @task(name="count-tiles", cache_policy=NO_CACHE)
    def count(run_dir: str, n: int, total: int) -> None:  # as the chunk tasks do: counted inside a task
        for _ in range(n):
            progress.advance(run_dir, 1, total)

    @flow(name="progress-artifacts")
    def publish(run_dir: str, total: int) -> list[str]:
        with progress_artifact(run_dir, total, every_s=0) as art:
            count(run_dir, total // 2, total)
            assert progress.tiles_done(run_dir) == (total // 2, total)
            count(run_dir, total - total // 2, total)
        try:
            with progress_artifact(broken, 10, every_s=0) as failed:
                progress.advance(broken, 4, 10)
                raise RuntimeError("the chunks failed")
        except RuntimeError:
            pass
        return [str(art), str(failed), str(final_report(run_dir))]

    art, failed, report = publish(str(run_dir), 30)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[
            art, failed, report])))
    by_id = {str(a.id): a for a in found}
    assert by_id[art].type == "progress" and by_id[art].data == 100
    assert by_id[art].key == f"geo-dino-progress-{run_dir.name.lower()}"
    assert by_id[failed].data == 40
    md = by_id[report]
    assert md.type == "markdown" and md.key == f"geo-dino-run-{run_dir.name.lower()}"
    assert md.data == report_markdown(run_dir)
    text = str(md.data)
    rec = json.loads((run_dir / "provenance.json").read_text())
    dec = json.loads((run_dir / "screening.json").read_text())
    assert dec["action"] == "mask" and dec["hits"]
    assert f"**Decision:** {dec['action']} (allowed)" in text
    assert f"**Sites hit:** {len(dec['hits'])}" in text
    assert all(h["name"] in text for h in dec["hits"])
    for o in rec["outputs"]:
        assert f"`{o['path']}`" in text
    assert "**Status:** succeeded" in text and str(run_dir / "run.qgs") in text
    assert all(f"| {k} |" in text for k in rec["timings"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*chunks for 1 workers:UserWarning")
def test_chunks_on_dask_workers_are_counted_when_they_finish(tiny_config):
    """On a Dask engine the chunks count their tiles in the workers' processes, where nobody listens; the
    run's process counts each chunk's tiles as it finishes, so the total still arrives."""
    events: list[progress.Event] = []
    with progress.listening(events.append):
        run_dir = pl.run_local(parse_config(tiny_config(execution={"engine": "dask", "workers": 1})))
    n = json.loads((run_dir / "plan.json").read_text())["tiling"]["n_tiles"]
    n_chunks = json.loads((run_dir / "plan.json").read_text())["tiling"]["n_chunks"]
    tiles = [(e.done, e.total) for e in events if e.run_dir == run_dir and e.kind == "tiles"]
    assert tiles[0] == (0, n) and tiles[-1] == (n, n)
    assert len(tiles) == 1 + n_chunks  # the start, then one per chunk (none from the workers' batches)
    names = [e.name for e in events if e.kind == "stage" and e.run_dir == run_dir]
    assert names.index("inference") < names.index("writing outputs")
