r"""The docstrings' math and the code that implements it stay matched, and the docs build.

Every ``\tag{n}`` in a class's docstrings (the class's own and its methods')
must be cited by a comment ``# Eq. (n)`` in that class's source; a tag in a
module docstring, somewhere in that module's source. Comments cite
``# Eq. (1)``, ``# Eq. (2), (3)``, ``# Eq. (2)-(4)`` (2, 3 and 4) and may go on
after the numbers (``# Eq. (3): the sum over c``).

The last test builds the Sphinx docs (``make docs``) when Sphinx is installed
(the ``docs`` extra) and is skipped otherwise.
"""

import importlib
import inspect
import io
import pkgutil
import re
import runpy
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import mnn
import mnn.distributed

DOCS = Path(__file__).resolve().parent.parent / "docs"

_TAG = re.compile(r"\\tag\{(\d+)\}")
# "Eq." and a run of "(n)" joined by commas or dashes; anything may follow.
_CITATION = re.compile(r"#\s*Eq\.\s*(\(\d+\)(?:\s*[,\-–]\s*\(\d+\))*)")
_CITED_NUMBER = re.compile(r"([,\-–]?)\s*\((\d+)\)")


def cited_equations(source):
    """The equation numbers cited by ``# Eq. ...`` comments in ``source``;
    a docstring that mentions "Eq. (4)" cites nothing."""
    comments = (token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT)
    cited = set()
    for comment in comments:
        for citation in _CITATION.finditer(comment):
            previous = None
            for joiner, number in _CITED_NUMBER.findall(citation.group(1)):
                number = int(number)
                first = previous + 1 if joiner in ("-", "–") else number
                cited.update(range(first, number + 1))
                previous = number
    return cited


def _docstrings(cls):
    """(label, docstring) for the class and each of its own methods and properties."""
    yield cls.__qualname__, inspect.getdoc(cls) or ""
    for name, member in vars(cls).items():
        function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if inspect.isfunction(function) or isinstance(function, property):
            yield f"{cls.__qualname__}.{name}", function.__doc__ or ""


def _uncited(labelled_docstrings, source):
    cited = cited_equations(source)
    return [f"{label}: \\tag{{{number}}} is not cited by '# Eq. ({number})'"
            for label, doc in labelled_docstrings
            for number in map(int, _TAG.findall(doc)) if number not in cited]


def uncited_class_tags(cls):
    """One line per ``\\tag{n}`` in ``cls``'s docstrings that its source does not cite."""
    return _uncited(_docstrings(cls), inspect.getsource(cls))


def uncited_module_tags(module):
    """One line per ``\\tag{n}`` in ``module``'s docstring that its source does not cite."""
    return _uncited([(module.__name__, module.__doc__ or "")], inspect.getsource(module))


# What the optional extras bring (mpi, plot); the core imports without them.
OPTIONAL_IMPORTS = ("mpi4py", "matplotlib")


def _modules():
    """Every module of the packages ``mnn`` and ``mnn.distributed`` (and their subpackages)."""
    modules = [mnn, mnn.distributed]
    for package in (mnn, mnn.distributed):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                modules.append(importlib.import_module(info.name))
            except ModuleNotFoundError as error:
                # A module of an optional extra (MPI, the plots) is checked where it is installed.
                if error.name not in OPTIONAL_IMPORTS:
                    raise
    return modules


def _defined_classes(module):
    return [obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == module.__name__]


def test_every_tag_is_cited_by_the_code_that_implements_it():
    modules = _modules()
    assert {"mnn.layer.linear", "mnn.distributed.data_parallel"} <= {m.__name__ for m in modules}
    uncited = []
    for module in modules:
        uncited += uncited_module_tags(module)
        for cls in _defined_classes(module):
            uncited += uncited_class_tags(cls)
    assert not uncited, "\n".join(uncited)


def test_citation_forms():
    source = ("a = 1  # Eq. (1)\n"
              "b = 2  # Eq. (3), (5)\n"
              "c = 3  # Eq. (7)-(9)\n"
              "d = 4  # Eq. (11): the sum over c\n"
              "e = 5  # Eq. (12), first term\n"
              "f = 6  # Eq. (14), (15)-(16)\n"
              "'''Eq. (20), a docstring, and # Eq. (21) inside a string.'''\n")
    assert cited_equations(source) == {1, 3, 5, 7, 8, 9, 11, 12, 14, 15, 16}


class _HalfCited:
    r"""A synthetic class whose backward cites only one of its two tags.

    .. math::
        y = 2 x. \tag{1}
    """

    def forward(self, x):
        return 2 * x  # Eq. (1)

    def backward(self, g):
        r"""
        .. math::
            \nabla_x \ell = 2 g. \tag{2}
        """
        return 2 * g


def test_the_checker_finds_a_missing_citation():
    assert uncited_class_tags(_HalfCited) == [r"_HalfCited.backward: \tag{2} is not cited by '# Eq. (2)'"]


def test_docs_build_with_math_on_every_page(tmp_path):
    """``sphinx-build -W`` succeeds; every layer page shows math and its backward,
    every module page exists; no ``\\tag`` is left inside ``split``/``aligned``,
    where MathJax refuses it."""
    pytest.importorskip("sphinx")
    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "api"))
    html = tmp_path / "html"
    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(source), str(html)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr

    conf = runpy.run_path(str(source / "conf.py"))
    layers = conf["layer_pages"]()
    assert mnn.LinearLayer in layers
    for cls in layers:
        text = (html / "api" / "layers" / f"{cls.__name__}.html").read_text()
        assert 'class="math' in text and ("\\(" in text or "\\[" in text), f"{cls.__name__}: no math"
        if getattr(vars(cls).get("backward"), "__doc__", None):
            assert f'id="mnn.{cls.__name__}.backward"' in text, f"{cls.__name__}: backward's derivation missing"
    for module in conf["MODULE_PAGES"]:
        assert (html / "api" / f"{conf['module_page_name'](module)}.html").is_file(), module
    for page in html.rglob("*.html"):
        for environment, body in re.findall(r"\\begin\{(split|aligned)\}(.*?)\\end\{\1\}", page.read_text(), re.DOTALL):
            assert "\\tag" not in body, f"{page.name}: \\tag inside {environment}"
