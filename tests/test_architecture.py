"""The package's shape: no import cycle (imports inside functions count), no module reaching into another's
private names, and the subpackages' layering (inputs never import outputs, models never import a run)."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arch)
PKG = ROOT / "geo_dino"

# a subpackage may import only those before it (errors, config and files are the shared bottom)
LAYERS = ["inputs", "governance", "models", "evaluation", "outputs", "run", "training"]


def test_no_import_cycle_in_the_package():
    assert arch.cycles(arch.imports(PKG)) == []


def test_no_module_uses_another_modules_private_names():
    assert arch.private_reach_ins(PKG) == []


def test_subpackages_import_only_layers_below_them():
    wrong = []
    for mod, targets in arch.imports(PKG).items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        mine = LAYERS.index(parts[1])
        for t in targets:
            tp = t.split(".")
            if len(tp) >= 2 and tp[1] in LAYERS and LAYERS.index(tp[1]) > mine:
                wrong.append(f"{mod} -> {t}")
    assert wrong == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """The analysis itself: a cycle through a function-local import and a private reach-in are found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text(textwrap.dedent("""
        def f():
            from pkg import a
            from pkg.c import _hidden
            return a, _hidden
    """))
    (pkg / "c.py").write_text("_hidden = 1\n")
    assert arch.cycles(arch.imports(pkg)) == [["pkg.a", "pkg.sub.b"]]
    assert arch.private_reach_ins(pkg) == ["pkg.sub.b imports pkg.c._hidden"]


def test_run_folder_file_names_are_spelled_once():
    """The run folder's file names live in geo_dino.files; any other module uses the constants (docstrings,
    messages and f-strings aside), so renaming a file is a one-line change."""
    import ast

    from geo_dino import files

    names = {files.CONFIG, files.PLAN, files.RECORD, files.SCREENING, files.TILE_INDEX, files.QGIS_PROJECT,
             files.HEADS, files.CHANGE_MODEL, files.FEATURE_CACHE, files.RUN_LOG}
    spelled = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "files.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        in_fstrings = {id(c) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for c in n.values}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
                    and id(node) not in in_fstrings):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert spelled == []
