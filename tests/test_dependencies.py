"""Declared dependencies match the code: every third-party package that geo_dino/ or flows/ imports (at the
top of a module or inside a function) is declared in ``[project].dependencies``, every declared one is
imported, each is a lower bound (``>=``), and requirements.lock pins an exact version of every declared
package."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OWN = {"geo_dino", "flows"}
# declared in [project].dependencies although no module imports it: distribution -> why (none today)
NOT_IMPORTED: dict[str, str] = {}
# exact pins kept on purpose: distribution -> why (the reasons are the comments in pyproject.toml)
EXACT_ON_PURPOSE = {
    "ruff": "tests/test_lint.py checks its rule set; a new ruff adds rules",
    "mypy": "tests/test_lint.py runs it; a new mypy finds new errors",
}


def top_level_imports(path: Path) -> set[str]:
    """Top-level module names of the absolute imports anywhere in ``path`` (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, list[str]]:
    """``{module: [files importing it]}`` over the .py files of geo_dino/ and flows/ (no stdlib, no own)."""
    found: dict[str, list[str]] = {}
    for folder in OWN:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in top_level_imports(path) - OWN - set(sys.stdlib_module_names):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def requirements(group: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    return [Requirement(r) for r in (project["dependencies"] if group is None
                                     else project["optional-dependencies"][group])]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_scan_finds_imports_in_functions_and_skips_relative_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nimport a.b as ab\nfrom c.d import e\nfrom . import f\nfrom .g import h\n\n\n"
                   "def k():\n    import PIL.Image\n    from yaml import safe_load\n")
    assert top_level_imports(src) == {"os", "a", "c", "PIL", "yaml"}


def test_every_third_party_import_is_declared():
    imports = third_party_imports()
    assert {"numpy", "rasterio", "PIL", "threadpoolctl"} <= set(imports)  # PIL: imported inside a function
    declared = {canonicalize_name(r.name) for r in requirements()}
    dists = packages_distributions()
    missing = {}
    for module, files in sorted(imports.items()):
        candidates = {canonicalize_name(d) for d in dists.get(module, [])}
        if not candidates & declared:
            missing[module] = (sorted(candidates) or ["not installed"], files[:3])
    assert not missing, f"imported but not declared in [project].dependencies: {missing}"


def test_every_declared_dependency_is_imported():
    dists = packages_distributions()
    imported = {canonicalize_name(d) for module in third_party_imports() for d in dists.get(module, [])}
    unused = {r.name for r in requirements() if canonicalize_name(r.name) not in imported} - set(NOT_IMPORTED)
    assert not unused, f"declared in [project].dependencies, imported nowhere in geo_dino/, flows/: {unused}"


@pytest.mark.parametrize("group", [None, "dev", "bench"])
def test_declarations_are_lower_bounds_with_a_reason(group):
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for req in requirements(group):
        ops = {spec.operator for spec in req.specifier}
        if req.name in EXACT_ON_PURPOSE and group is not None:
            assert ops == {"=="}, req
        else:
            assert ops == {">="}, f"{req}: give a lower bound (>=); exact versions go in requirements.lock"
        line = re.search(rf'^\s*"{re.escape(str(req))}",\s*#\s*(\S.*)$', text, re.M)
        assert line, f"{req}: no comment giving the reason for its bound in pyproject.toml"


def test_the_lock_pins_every_declared_package_within_its_bound():
    pins = lock()
    groups = [None, *PYPROJECT["project"]["optional-dependencies"]]
    for req in (r for g in groups for r in requirements(g)):
        version = pins.get(canonicalize_name(req.name))
        assert version, f"{req.name} is declared but has no exact version in requirements.lock"
        assert req.specifier.contains(version, prereleases=True), f"lock {req.name}=={version} outside {req}"
    assert "psutil" not in pins  # nothing imports it: it left the declarations and the lock


def test_the_makefile_installs_the_locked_torch_first():
    pins = lock()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    line = next(ln for ln in makefile.splitlines() if "pip install" in ln and "torch==" in ln)
    assert f"torch=={pins['torch']}" in line and f"torchvision=={pins['torchvision']}" in line, line
    assert "-c requirements.lock" in makefile and "[dev,bench]" in makefile


def test_a_skip_for_an_unlisted_reason_fails(tmp_path):
    """tests/conftest.py lets only the QGIS skip through: a dev package missing behind importorskip or any
    other skipif fails the run (so a missing dependency or bundled file cannot pass by skipping)."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport  # noqa\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "def test_missing_package():\n    pytest.importorskip('no_such_module_for_geo_dino')\n\n"
        "@pytest.mark.skipif(True, reason='sample raster not available')\n"
        "def test_missing_file():\n    pass\n\n"
        "def test_qgis():\n    pytest.skip('QGIS (python3-qgis) not installed; .ci/run installs it')\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "1 failed, 1 skipped, 1 error" in res.stdout, res.stdout[-3000:]
    assert "no_such_module_for_geo_dino" in res.stdout and "ALLOWED_SKIPS" in res.stdout
