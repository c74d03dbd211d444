"""A disk that fills during a run, for real: a small tmpfs mounted as the output folder (in a private mount
namespace, so no privileges are needed where user namespaces are allowed). The run ends ``failed`` with
ENOSPC named, one error line, no temporary files left; after the disk grows, ``geo-dino resume`` finishes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from geo_dino.run.folder import disk_full, remove_temp_files, reserve_space
from tests.conftest import ROOT

CLI = str(Path(sys.executable).with_name("geo-dino"))


def _namespace() -> list[str]:
    """The command prefix that runs a shell in a private mount namespace where tmpfs can be mounted."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if shutil.which(prefix[0]) and subprocess.run(
                [*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                capture_output=True).returncode == 0:
            return prefix
    raise AssertionError("this machine cannot mount a tmpfs in a private mount namespace (unshare): the "
                         "disk-full tests need one (user namespaces, or root)")


def _config(tmp_path: Path, out: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"name: t\naoi: aoi/bahamas_andros.geojson\n"
                   f"rasters: [data/rasters/landsat7_bahamas_RGB.byte.tif]\noutput_dir: {out}\n"
                   "backbone: {arch: vit_tiny_patch16_dinov3_test, batch_size: 16}\n"
                   "tiling: {size: 64, overlap: 16, chunk_tiles: 16}\n"
                   "heads: {kmeans: {k: 4, fit_tiles: 16}}\n")
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("size", ["300k", "4700k", "5500k"])
def test_a_full_disk_fails_the_run_cleanly_and_resume_finishes_it(tmp_path, size) -> None:
    """300 kB: too full for the space reserve at planning (start again); 4.7 and 5.5 MB: full during the
    chunks or the COGs (resume after freeing space)."""
    out, keep = tmp_path / "full", tmp_path / "kept"
    out.mkdir()
    keep.mkdir()
    cfg = _config(tmp_path, out)
    script = f"""
    set -u
    mount -t tmpfs -o size={size} tmpfs {out}
    {CLI} run --config {cfg} --random-init > {keep}/run.txt 2>&1; echo $? > {keep}/run.rc
    run=$(ls -d {out}/t-*)
    cp $run/provenance.json {keep}/failed.json; cp $run/deployment_record.json {keep}/deployment.json
    (cd $run && find . -name '.*' -type f ! -path './work/outputs.zarr/*' | sort) > {keep}/hidden.txt
    mount -o remount,size=64m {out}
    {CLI} resume $run > {keep}/resume.txt 2>&1; echo $? > {keep}/resume.rc
    cp $run/provenance.json {keep}/resumed.json
    cp $run/classes.tif {keep}/ 2>/dev/null || true
    """
    subprocess.run([*_namespace(), "sh", "-c", script], cwd=ROOT, timeout=600, check=True)
    said = (keep / "run.txt").read_text()
    assert (keep / "run.rc").read_text().strip() == "2", said
    errors = [ln for ln in said.splitlines() if "OutputError" in ln]
    assert len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in said, said
    rec = json.loads((keep / "failed.json").read_text())
    assert rec["status"] == "failed" and "disk full" in rec["error"]
    assert rec["disk_full"]["errno"] == "ENOSPC" and "(ENOSPC)" in rec["error"]
    assert json.loads((keep / "deployment.json").read_text())["run_status"] == "failed"
    assert (keep / "hidden.txt").read_text().split() == []  # no temporary files, no space reserve left
    if rec["disk_full"]["resumable"]:
        assert "geo-dino resume" in errors[0]
        assert (keep / "resume.rc").read_text().strip() == "0", (keep / "resume.txt").read_text()
        assert json.loads((keep / "resumed.json").read_text())["status"] == "succeeded"
        with rasterio.open(keep / "classes.tif") as ds:
            assert ds.crs is not None and ds.read(1).size > 0
    else:
        assert size == "300k" and "start the run again" in errors[0]


def test_disk_full_is_told_apart(tmp_path) -> None:
    import errno

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    wrapped = RuntimeError("Write failed. See previous exception for details.")
    wrapped.__cause__ = RuntimeError("TIFFAppendToStrip:Write error at scanline 0")
    assert not disk_full(wrapped, tmp_path)  # a write error with room on the disk is not a full disk
    assert not disk_full(ValueError("bad value"), tmp_path)


def test_temp_files_and_the_reserve(tmp_path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / ".classes.tif.tmp.tif").write_bytes(b"")
    (tmp_path / "work" / ".heads.npz.tmp.npz").write_bytes(b"x")
    (tmp_path / "classes.tif").write_bytes(b"kept")
    assert remove_temp_files(tmp_path) == [".classes.tif.tmp.tif", "work/.heads.npz.tmp.npz"]
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["classes.tif"]
    reserve_space(tmp_path)
    assert (tmp_path / "work" / ".space_reserve").stat().st_blocks * 512 >= 4 << 20  # real blocks
