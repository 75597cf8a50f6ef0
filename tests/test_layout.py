"""The source layout: imports point one way, no cycles, small modules that say what they are.

Read with ``ast`` over the repository (function-level imports count too), so a cycle hidden
inside a function body fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.sd_layout import ROOT

# model/'s packages, bottom to top: each may import only those before it (and itself).
MODEL_LAYERS = ["weights", "diffusion", "nets", "encoders", "metrics", "sd", "editing", "training"]
SIBLINGS = {("editing", "training"), ("training", "editing")}  # neither imports the other
SOURCE_DIRS = ("model", "data", "jobs")
ENTRY_POINTS = ("train.py", "infer.py", "eval.py", "release.py", "demo.py", "shard.py")
MAX_LINES = 400


def source_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    return files + [ROOT / name for name in ENTRY_POINTS]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (``from a.b import c`` counts
    as ``a.b.c`` when that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in source_files()}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if dep.startswith(name + "."):  # a package importing its own modules
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_model_imports_only_downward_and_never_data():
    problems = []
    for name, deps in import_graph().items():
        if not name.startswith("model."):
            continue
        layer = name.split(".")[1]
        for dep in deps:
            if not dep.startswith("model."):
                problems.append(f"{name} imports {dep} (model/ imports only model/)")
                continue
            other = dep.split(".")[1]
            if other == layer or dep == "model":
                continue
            if (layer, other) in SIBLINGS or MODEL_LAYERS.index(other) > MODEL_LAYERS.index(layer):
                problems.append(f"{name} imports {dep} ({other} is not below {layer})")
    assert not problems, "\n".join(sorted(problems))


def test_data_never_imports_jobs_or_entry_points():
    entry = {Path(e).stem for e in ENTRY_POINTS}
    problems = [
        f"{name} imports {dep}"
        for name, deps in import_graph().items()
        if name.startswith(("model.", "data."))
        for dep in deps
        if dep.startswith("jobs") or dep in entry
    ]
    assert not problems, "\n".join(problems)


def test_modules_are_small_and_open_with_a_docstring():
    problems = []
    for path in source_files():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {lines} lines (> {MAX_LINES})")
        if text.strip() and not ast.get_docstring(ast.parse(text)):
            problems.append(f"{path.relative_to(ROOT)}: no module docstring")
    assert not problems, "\n".join(problems)


def test_nothing_reads_outside_the_repository():
    """A user's clone has no ``../shared`` beside it: code, configs and build files name only
    paths inside the repository."""
    patterns = ("../shared", "/work/", '"shared"', "'shared'")
    checked = [*source_files(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    checked += [*(ROOT / "configs").rglob("*.yaml"), ROOT / "Makefile", ROOT / "pyproject.toml"]
    checked += [*(ROOT / ".ci").iterdir()]
    problems = [
        f"{path.relative_to(ROOT)}: {pattern}"
        for path in checked
        if path != Path(__file__)
        for pattern in patterns
        if pattern in path.read_text()
    ]
    assert not problems, "\n".join(problems)
