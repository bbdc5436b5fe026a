"""The project's distribution name: ``mnn`` on PyPI is another project (Alibaba's MNN), so
this one installs as ``mnn-mpi`` (the import name stays ``mnn``), and no hint anywhere tells a
user to ``pip install 'mnn[...]'``, which would fetch that other project."""
import importlib.metadata
import re
import sys
from pathlib import Path

from mnn.distributed.environment import DISTRIBUTION, install_hint

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# pip install mnn, 'mnn[x]', "mnn[x]" or mnn==1: the name alone, as a requirement.
OTHER_PROJECT = re.compile(r"pip install [^\n]*?(?<![\w/.-])['\"]?mnn(\[|['\"\s]|==|$)", re.M)


def test_the_distribution_is_not_the_other_projects_name():
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert name == DISTRIBUTION != "mnn"
    assert importlib.metadata.version(DISTRIBUTION)  # installed under that name


def test_every_install_hint_installs_this_project():
    # run from this checkout (an editable install): the hint names the checkout itself
    assert install_hint("plot") == f"pip install -e '{ROOT}[plot]'"
    files = [path for folder in ("mnn", "distributed", "scripts", "docs", "examples") for path in
             (ROOT / folder).rglob("*") if path.suffix in (".py", ".md", ".toml") and "_build" not in path.parts]
    for path in [*files, ROOT / "README.md", ROOT / "Makefile"]:
        found = OTHER_PROJECT.search(path.read_text())
        assert found is None, f"{path.relative_to(ROOT)}: {found.group(0)!r} would install another project"
