"""The house style is checked by tools: ruff (the rule set of ``[tool.ruff.lint]``) and mypy
(``[tool.mypy]``), both configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_ruff_finds_nothing():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "geo_dino", "flows", "tests",
                          "bench"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_ruff_catches_what_it_is_configured_for(tmp_path):
    """The check is live: an unused import, an unannotated and undocumented library function and an assert
    are reported."""
    pkg = tmp_path / "geo_dino"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import os\n\n\ndef f(x):\n    assert x\n    return x\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "geo_dino"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1
    assert all(code in res.stdout for code in ("F401", "ANN001", "ANN201", "S101", "D103"))


@pytest.mark.slow
def test_mypy_finds_nothing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Success: no issues found" in res.stdout
