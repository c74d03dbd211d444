"""Every command the README shows, run as a user would (a fresh ``geo-dino`` process from the repository
root), on bundled data; the few that cannot run here are listed with the reason and where they are tested
instead.

The commands are read from the README itself: a new or changed command fails here until it runs, or until it
is added to :data:`NOT_RUN` with its reason. Outputs go to this test's folder (``--output-dir``), never to
``runs/``; placeholders (``runs/<run folder>``, ``runs/floods-water-…/``, ``my_polygon.geojson``) stand for
what the commands before them made.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_folders

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("geo-dino"))

#: commands not run here: a prefix of the command → why, and where it is tested
NOT_RUN = {
    "make demo": "sets up and runs the three demo jobs; their commands are run here one by one",
    "make test": "the test suite itself (.ci/run runs it)",
    ".venv/bin/prefect ": "the server walk: tests/test_readme_server_walk.py runs it against a real server",
    "export PREFECT_API_URL": "the server walk: tests/test_readme_server_walk.py",
    "GEO_DINO_REPO=$PWD .venv/bin/prefect": "the server walk: tests/test_readme_server_walk.py",
    ".venv/bin/geo-dino submit": "the server walk: tests/test_readme_server_walk.py",
    ".venv/bin/dask scheduler --host 10.0.0.5": "a site's machines: tests/test_scale_out.py starts `dask "
                                                "scheduler` and `dask worker` on 127.0.0.1",
    "OMP_NUM_THREADS=1 .venv/bin/dask worker": "a site's machines: tests/test_scale_out.py",
    ".venv/bin/geo-dino run --config configs/demo.yaml --dask-address tcp://10.0.0.5":
        "a site's scheduler: tests/test_scale_out.py joins one on 127.0.0.1",
    ".venv/bin/geo-dino checkpoint inspect /data/weights/": "licence-gated DINOv3 weights are not here: "
                                                           "tests/test_checkpoints.py inspects and converts "
                                                           "random weights in the same layouts",
    ".venv/bin/geo-dino checkpoint convert /data/weights/": "as above",
    ".venv/bin/geo-dino pretrain my.yaml --nproc 4": "a user's config; tests/test_pretrain.py runs two "
                                                     "processes through torchrun",
    "torchrun --nproc_per_node 8": "started by hand; tests/test_pretrain.py",
    ".venv/bin/geo-dino eval linear DATA": "a placeholder for the user's data; tests/test_evaluation.py",
    ".venv/bin/geo-dino pretrain configs/pretrain_default.yaml": "23 minutes on 2 cores: run below with "
                                                                  "--steps 4",
}


def readme_commands() -> list[str]:
    """The shell commands of the README's ``sh``/``bash`` blocks, continuation lines joined, comments off."""
    out: list[str] = []
    inside, lang, buf = False, "", ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside, lang = (not inside), line[3:].strip()
            continue
        if not inside or lang not in ("sh", "bash"):
            continue
        text = line.rstrip()
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        full = " ".join((buf + text).split())
        buf = ""
        full = re.sub(r"\s+#\s.*$", "", full).strip()
        if full and not full.startswith("#"):
            out.append(full)
    return out


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_readme_lists_commands_and_every_skip_names_one() -> None:
    cmds = readme_commands()
    assert len(cmds) > 20
    for prefix in NOT_RUN:  # no stale skip: each names a command the README still shows
        assert any(c.startswith(prefix) for c in cmds), prefix


def test_every_readme_command_runs(tmp_path) -> None:
    out = tmp_path / "runs"
    made: dict[str, Path] = {}

    def geo(cmd: str) -> str:
        """Run a README command (``geo-dino …`` or ``.venv/bin/geo-dino …``), placeholders filled."""
        fill = {"runs/<run folder>": made.get("demo"), "runs/floods-water-…/head.safetensors":
                made.get("floods_head"), "runs/demo-bahamas-…": made.get("demo"),
                "my_polygon.geojson": made.get("example"),
                "runs/pretrain_default/vit_tiny_patch8_geo.safetensors": made.get("pretrained")}
        for placeholder, path in fill.items():
            if placeholder in cmd:
                assert path is not None, f"{cmd}: nothing made yet stands for {placeholder}"
                cmd = cmd.replace(placeholder, shlex.quote(str(path)))
        args = shlex.split(cmd)
        args[0] = CLI
        sub = args[1]
        if sub in ("run", "change", "train-head", "pretrain") and "--output-dir" not in args:
            args += ["--output-dir", str(out / sub)]
        if sub == "pretrain":
            args += ["--steps", "4"]  # the README's run is 23 minutes: the same command, 4 steps
        res = _run(args)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout + res.stderr

    cmds = readme_commands()
    ran, skipped = [], []
    # the order the README tells a user: a demo run first (later commands use its folder)
    order = sorted(cmds, key=lambda c: (0 if "run --config configs/demo.yaml" in c and "--workers" not in c
                                        else 1 if "train-head" in c or "pretrain" in c else 2))
    for cmd in order:
        if any(cmd.startswith(p) for p in NOT_RUN):
            if cmd.startswith(".venv/bin/geo-dino pretrain configs/pretrain_default.yaml"):
                geo(cmd)
                made["pretrained"] = next((out / "pretrain").rglob("vit_tiny_patch8_geo.safetensors"))
                ran.append(cmd)
                continue
            skipped.append(cmd)
            continue
        if not re.match(r"^(\.venv/bin/)?geo-dino ", cmd):
            raise AssertionError(f"a README command this test does not know how to run: {cmd!r}")
        before = set(run_folders(out / cmd.split()[1])) if (out / cmd.split()[1]).is_dir() else set()
        text = geo(cmd)
        ran.append(cmd)
        sub = cmd.split()[1]
        if sub in ("run", "change") and (out / sub).is_dir():
            new = sorted(set(run_folders(out / sub)) - before)
            assert len(new) == 1, (cmd, text[-2000:])
            rec = json.loads((new[0] / "provenance.json").read_text())
            assert rec["status"] == "succeeded", cmd
            if cmd.split()[1:3] == ["run", "--config"] and "demo" not in made:
                made["demo"] = new[0]
                example = tmp_path / "example.geojson"  # a polygon inside the demo's output
                import rasterio
                from rasterio.warp import transform_bounds

                with rasterio.open(new[0] / "classes.tif") as src:
                    w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
                cx, cy, dx, dy = (w + e) / 2, (s + n) / 2, (e - w) / 20, (n - s) / 20
                ring = [[cx, cy], [cx + dx, cy], [cx + dx, cy + dy], [cx, cy + dy], [cx, cy]]
                example.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
                made["example"] = example
        if sub == "train-head" and "floods" in cmd:
            made["floods_head"] = next((out / "train-head").rglob("floods-water-*/head.safetensors"))
    assert len(ran) >= 15 and all(any(c.startswith(p) for p in NOT_RUN) for c in skipped)
    assert {c for c in cmds} == set(ran) | set(skipped)
