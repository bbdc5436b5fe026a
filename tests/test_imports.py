"""Imports point one way, and nobody imports another package's privates.

scripts/ -> distributed/ -> mnn/, and inside distributed/ its five parts:
experiments -> training -> the core -> mnn, launch -> the core's ``environment``
only, and cluster -> nothing of mnn. No two modules import each other, directly or round a longer circle.

The source folders install as ``mnn``, ``mnn.distributed`` and ``mnn.scripts``.
Every ``import`` and ``from ... import`` of every module is read with ``ast``
(without importing anything), so a wrong import anywhere, even inside a
function, fails here.
"""
import ast
import subprocess
import sys
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


def within(name, package):
    return name == package or name.startswith(package + ".")


# The parts of mnn.distributed, as (importer's part, the parts it may import). A part
# is a package; the core is mnn.distributed's own modules. The layer library ``mnn``
# may be imported by every part but the launcher.
CORE = "mnn.distributed"
PARTS = {
    "mnn.distributed.experiments": {"mnn.distributed.training", "mnn.distributed.launch", CORE},
    "mnn.distributed.training": {CORE},
    "mnn.distributed.launch": {"mnn.distributed.environment"},
    "mnn.distributed.cluster": set(),
    CORE: {CORE},
}


def part_of(name):
    """The part of mnn.distributed that ``name`` belongs to, or None outside it."""
    for part in PARTS:
        if part != CORE and within(name, part):
            return part
    return CORE if within(name, CORE) else None


def import_problems(importer, imported):
    """Why ``importer`` may not import ``imported`` (a list, empty when it may)."""
    problems = []
    in_library = within(importer, "mnn") and part_of(importer) is None and not within(importer, "mnn.scripts")
    if in_library and (within(imported, "mnn.distributed") or within(imported, "mnn.scripts")
                       or within(imported, "mpi4py")):
        problems.append("the layer library mnn/ must not know about ranks or entry points")
    importer_part, imported_part = part_of(importer), part_of(imported)
    if importer_part and within(imported, "mnn.scripts"):
        problems.append("distributed/ must not import the entry points in scripts/")
    allowed = PARTS.get(importer_part, ())
    # An entry of PARTS that is not itself a part is a single module (the launcher's environment).
    may = imported_part in allowed or any(within(imported, module) for module in allowed if module not in PARTS)
    if importer_part and imported_part and imported_part != importer_part and not may:
        problems.append(f"{importer_part} may import only {sorted(PARTS[importer_part])}")
    if importer_part == "mnn.distributed.launch" and within(imported, "mnn") and imported_part is None:
        problems.append("the launcher must not load the layer library (nor NumPy with it)")
    if importer_part == "mnn.distributed.cluster" and within(imported, "mnn") and imported_part is None:
        problems.append("the test cluster stands alone: the standard library only")
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
    assert {"mnn.layer._base", "mnn.distributed.training.trainer", "mnn.scripts.train"} <= set(modules)
    found = [f"{importer} imports {imported}: {problem}"
             for importer, path in modules.items()
             for imported in imported_modules(path)
             for problem in import_problems(importer, imported)]
    assert not found, "\n".join(found)


def import_graph():
    """Each source module -> the source modules it imports (submodules, not the names in them)."""
    modules = dict(source_modules())
    return {importer: {imported for imported in imported_modules(path)
                       if imported in modules and imported != importer}
            for importer, path in modules.items()}


def find_cycle(graph):
    """One circle of imports in ``graph`` as a list of modules, or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_no_module_imports_round_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_launcher_starts_without_numpy():
    # The launcher must come up fast and hold signals early: it needs no array library.
    code = "import sys, mnn.distributed.launch, mnn.scripts.launch; print(sorted({'numpy', 'tqdm', 'threadpoolctl'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("importer, imported, problem", [
    ("mnn.seq_layers", "mnn.distributed.comm", "must not know about ranks"),
    ("mnn.layer.linear", "mpi4py.MPI", "must not know about ranks"),
    ("mnn.distributed.training.trainer", "mnn.scripts.launch", "must not import the entry points"),
    ("mnn.distributed.training.config", "mnn.layer._base", "mnn.layer._base is private to mnn.layer"),
    ("mnn.scripts.bench", "mnn.distributed.launch._hidden", "private to mnn.distributed.launch"),
    ("mnn.distributed.training.trainer", "mnn.layer.softmax._check_axis", "private to mnn.layer"),
    ("mnn.distributed.launch.plan", "mnn.distributed.training.ranks", "may import only"),
    ("mnn.distributed.launch.plan", "mnn.distributed.comm", "may import only"),
    ("mnn.distributed.launch.plan", "mnn.text", "must not load the layer library"),
    ("mnn.distributed.comm", "mnn.distributed.training.position", "may import only"),
    ("mnn.distributed.training.config", "mnn.distributed.experiments.bench", "may import only"),
    ("mnn.distributed.training.trainer", "mnn.distributed.launch.plan", "may import only"),
])
def test_the_checker_finds_wrong_imports(importer, imported, problem):
    assert any(problem in found for found in import_problems(importer, imported))


@pytest.mark.parametrize("importer, imported", [
    ("mnn.layer.linear", "mnn.layer._base"),       # a package's own private module
    ("mnn.distributed.training.trainer", "mnn.checks"),
    ("mnn.scripts.train", "mnn.distributed.training.trainer"),
    ("mnn.distributed.launch.plan", "mnn.distributed.launch.hosts"),
    ("mnn.distributed.launch.plan", "mnn.distributed.environment"),
    ("mnn.distributed.training.config", "mnn.distributed.data_parallel"),
    ("mnn.distributed.experiments.scaling.settings", "mnn.distributed.launch.plan"),
    ("mnn.distributed.experiments.bench", "mnn.distributed.training.task"),
    ("mnn.distributed.comm", "mnn.checks"),
    ("mnn.layer.loss", "mnn.layer.softmax._check_axis"),  # a private name of a sibling module
])
def test_the_checker_allows_right_imports(importer, imported):
    assert import_problems(importer, imported) == []
