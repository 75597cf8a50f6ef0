"""The bench scripts import names from the project inside functions (so ``--help`` stays
fast): every such name must still exist, or a benchmark breaks only when someone runs it
(``bench/edit_profile.py`` once imported ``write_outputs`` after it was renamed)."""

import ast
import importlib
from pathlib import Path

import pytest

from tests.sd_layout import ROOT

PACKAGES = ("bench", "data", "jobs", "model", "tests")
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def project_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from project.module import name`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                found += [(node.module, alias.name) for alias in node.names]
    return found


def exists(module: str, name: str) -> bool:
    """``name`` is an attribute of ``module`` or a submodule of it (``from bench import x``)."""
    if hasattr(importlib.import_module(module), name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_scripts_import_names_that_exist(script):
    missing = [f"{m}.{n}" for m, n in project_imports(script) if not exists(m, n)]
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
