"""The README's "Production on a Prefect server" walk, word for word, against a real server: its commands are
read from the README (so they cannot go stale) and run in one shell from the repository root, with only the
port, the output folder and ``PREFECT_HOME`` changed to this test's; then the submitted AOI must run to the
end on the walk's worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import PREFECT, ROOT, free_port, run_folders

pytestmark = pytest.mark.slow


def walk() -> list[str]:
    """The commands of the first ``sh`` block under the README's "Production on a Prefect server"."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Production on a Prefect server")
    block = text[text.index("```sh\n", start) + 6:]
    return [ln for ln in block[:block.index("```")].splitlines() if ln.strip()]


def test_the_readme_walk_sets_up_a_server_and_runs_a_submitted_aoi(tmp_path) -> None:
    lines = walk()
    assert any("server start" in ln for ln in lines) and any("geo-dino submit" in ln for ln in lines)
    port, out = free_port(), tmp_path / "submitted"
    script = "\n".join(["set -e"] + [ln.replace("4200", str(port)).replace("runs/submitted", str(out))
                                     for ln in lines])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    # the scheduler off: the walk's scheduled deployments (nightly, the inbox every minute) would otherwise
    # start runs over the repository's own folders
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    log = (tmp_path / "walk.log").open("w")
    shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    stop_env = env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    try:
        assert shell.wait(timeout=600) == 0, (tmp_path / "walk.log").read_text()[-4000:]
        said = (tmp_path / "walk.log").read_text()
        assert "submitted: flow run" in said, said[-3000:]
        end, rec = time.monotonic() + 600, {}
        while time.monotonic() < end:  # the walk's worker runs it
            dirs = run_folders(out) if out.is_dir() else []
            if dirs:
                rec = json.loads((dirs[0] / "provenance.json").read_text())
                if rec.get("status") != "started" and (dirs[0] / "stac_item.json").exists():
                    break
            time.sleep(1)
        assert rec.get("status") == "succeeded", (rec.get("error"),
                                                  (tmp_path / "walk.log").read_text()[-3000:])
        (run_dir,) = run_folders(out)
        assert (run_dir / "aoi.geojson").read_bytes() == (ROOT / "aoi/bahamas_andros.geojson").read_bytes()
        assert rec["prefect"]["deployment"] == "aoi-submissions"
        assert rec["execution_slot"]["limit"] == "cpu"
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)  # the walk's worker
        except ProcessLookupError:
            pass
        subprocess.run([PREFECT, "server", "stop"], env=stop_env, cwd=ROOT, capture_output=True, timeout=60)
