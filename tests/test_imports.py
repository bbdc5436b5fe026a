"""Imports point one way: scripts/ -> distributed/ -> mnn/, and nobody imports another package's privates.

The source folders install as ``mnn``, ``mnn.distributed`` and ``mnn.scripts``.
Every ``import`` and ``from ... import`` of every module is read with ``ast``
(without importing anything), so a wrong import anywhere, even inside a
function, fails here.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as.
PACKAGES = {"mnn": "mnn", "distributed": "mnn.distributed", "scripts": "mnn.scripts"}


def module_name(path):
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = PACKAGES[folder].split(".") + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules():
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield module_name(path), path


PACKAGE_NAMES = {module_name(path) for folder in PACKAGES for path in (ROOT / folder).rglob("__init__.py")}


def imported_modules(path):
    """Every module named by an import in ``path``: ``import a.b`` gives a.b,
    ``from a.b import c`` gives a.b and a.b.c (c may be a submodule)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")


def import_problems(importer, imported):
    """Why ``importer`` may not import ``imported`` (a list, empty when it may)."""
    problems = []
    within = lambda name, package: name == package or name.startswith(package + ".")  # noqa: E731
    in_library = within(importer, "mnn") and not within(importer, "mnn.distributed") \
        and not within(importer, "mnn.scripts")
    if in_library and (within(imported, "mnn.distributed") or within(imported, "mnn.scripts")
                       or within(imported, "mpi4py")):
        problems.append("the layer library mnn/ must not know about ranks or entry points")
    if within(importer, "mnn.distributed") and within(imported, "mnn.scripts"):
        problems.append("distributed/ must not import the entry points in scripts/")
    parts = imported.split(".")
    for depth, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            # The package that holds the private module, or the module with the private name.
            owner = ".".join(parts[:depth])
            if owner not in PACKAGE_NAMES:
                owner = owner.rpartition(".")[0]
            if within(imported, "mnn") and not within(importer, owner):
                problems.append(f"{'.'.join(parts[:depth + 1])} is private to {owner}")
            break
    return problems


def test_every_import_points_the_right_way():
    modules = dict(source_modules())
    assert {"mnn.layer._base", "mnn.distributed.trainer", "mnn.scripts.train"} <= set(modules)
    found = [f"{importer} imports {imported}: {problem}"
             for importer, path in modules.items()
             for imported in imported_modules(path)
             for problem in import_problems(importer, imported)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("importer, imported, problem", [
    ("mnn.seq_layers", "mnn.distributed.comm", "must not know about ranks"),
    ("mnn.layer.linear", "mpi4py.MPI", "must not know about ranks"),
    ("mnn.distributed.trainer", "mnn.scripts.launch", "must not import the entry points"),
    ("mnn.distributed.config", "mnn.layer._base", "mnn.layer._base is private to mnn.layer"),
    ("mnn.scripts.bench", "mnn.distributed.launch._hidden", "private to mnn.distributed.launch"),
    ("mnn.distributed.trainer", "mnn.layer.softmax._check_axis", "private to mnn.layer"),
])
def test_the_checker_finds_wrong_imports(importer, imported, problem):
    assert any(problem in found for found in import_problems(importer, imported))


@pytest.mark.parametrize("importer, imported", [
    ("mnn.layer.linear", "mnn.layer._base"),       # a package's own private module
    ("mnn.distributed.trainer", "mnn.checks"),
    ("mnn.scripts.train", "mnn.distributed.trainer"),
    ("mnn.distributed.launch.plan", "mnn.distributed.launch.hosts"),
    ("mnn.layer.loss", "mnn.layer.softmax._check_axis"),  # a private name of a sibling module
])
def test_the_checker_allows_right_imports(importer, imported):
    assert import_problems(importer, imported) == []
