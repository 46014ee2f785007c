"""Architecture and security boundaries, checked on the source itself (AST, not grep).

* the engine never imports qgis; the plugin never imports torch, transformers or the engine;
* no `eval`/`exec`, no `pickle`/`marshal`/`shelve`, no `shell=True`, no `os.system`, anywhere;
* `torch.load` only with `weights_only=True`;
* every module starts with a docstring saying its role.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = sorted((REPO / "engine").rglob("*.py"))
PLUGIN = sorted((REPO / "qgis_plugin").rglob("*.py"))
SCRIPTS = sorted((REPO / "scripts").rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_roots(tree: ast.Module) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_there_is_code_to_check():
    assert len(ENGINE) > 20 and len(PLUGIN) > 10


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(REPO)))
def test_engine_never_imports_qgis(path):
    bad = _imported_roots(_tree(path)) & {"qgis", "PyQt5", "PyQt6", "osgeo"}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", PLUGIN, ids=lambda p: str(p.relative_to(REPO)))
def test_plugin_never_imports_torch_or_engine(path):
    bad = _imported_roots(_tree(path)) & {"torch", "transformers", "engine", "rasterio", "numpy2"}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", ENGINE + PLUGIN + SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_eval_pickle_or_shell(path):
    tree = _tree(path)
    assert not (_imported_roots(tree) & {"pickle", "marshal", "shelve", "dill", "cloudpickle"})
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if isinstance(f, ast.Name):  # builtins; `model.eval()` (torch train/eval mode) is fine
                assert name not in ("eval", "exec", "compile"), f"{path}:{node.lineno} calls {name}"
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "os":
                assert name not in ("system", "popen"), f"{path}:{node.lineno} calls os.{name}"
            for kw in node.keywords:
                if kw.arg == "shell":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, \
                        f"{path}:{node.lineno} uses shell="
            if name == "load" and isinstance(f, ast.Attribute) and \
                    isinstance(f.value, ast.Name) and f.value.id == "torch":
                wo = [kw for kw in node.keywords if kw.arg == "weights_only"]
                assert wo and isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True, \
                    f"{path}:{node.lineno} torch.load without weights_only=True"


@pytest.mark.parametrize("path", ENGINE + PLUGIN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_has_a_docstring(path):
    tree = _tree(path)
    if not tree.body:  # an empty __init__.py
        return
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 3, f"{path} needs a short docstring saying its role"
