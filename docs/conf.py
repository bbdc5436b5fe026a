"""Sphinx configuration of mnn's docs: the guide and the API reference. Build them with ``make docs``.

The guide's pages are the Markdown files beside this one (``docs/*.md``, read by
myst-parser), written to read as they are on GitHub too: their links are
relative paths to other ``.md`` files, with ``#anchors`` made from headings as
GitHub makes them. ``index.rst`` lists them.

The API reference shows the docstrings with their math rendered by MathJax. At
every build this file writes its pages into ``docs/api/`` (not committed):

* one page per layer: each ``Layer`` subclass in ``mnn.__all__``, so a new
  layer gets its page without an edit here;
* one page per module in ``MODULE_PAGES`` below, the one list of the modules
  that are not layers. A layer defined in one of them (the containers of
  ``mnn.seq_layers``) is shown on that module's page instead of its own.

MathJax is loaded from a CDN unless ``MNN_MATHJAX_PATH`` names a local copy of
MathJax 3's ``tex-mml-chtml.js`` (a file path or a URL), for reading offline::

    MNN_MATHJAX_PATH=/path/to/mathjax/es5/tex-mml-chtml.js make docs
"""

import os
import re
from importlib.metadata import version as installed_version
from pathlib import Path

from docutils import nodes

import mnn
from mnn.distributed.environment import DISTRIBUTION

project = "mnn"
author = "the mnn developers"
copyright = "2026, the mnn developers"
release = installed_version(DISTRIBUTION)

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
# "cli.md#mnn-launch" as on GitHub: every heading down to ### gets the anchor
# GitHub gives it, so that a link works in both places.
myst_heading_anchors = 3
# Source order is the order of the derivation: forward, then backward.
autodoc_member_order = "bysource"
html_theme = "alabaster"
# The sidebar lists every page, and only pages: a class per line would make it
# as long as the reference.
html_theme_options = {"sidebar_collapse": False,
                      # The guide's tables (the failures, the options) and commands are wide.
                      "page_width": "1240px"}
toc_object_entries = False

if os.environ.get("MNN_MATHJAX_PATH"):
    mathjax_path = os.environ["MNN_MATHJAX_PATH"]
    if Path(mathjax_path).is_file():
        # Sphinx reads a bare path as relative to _static; a file URI works from any page.
        mathjax_path = Path(mathjax_path).resolve().as_uri()

# The modules with a page of their own, module: title, in the order of the
# reading order in index.rst (after the layers). A new module goes here.
MODULE_PAGES = {
    "mnn.seq_layers": "Containers",
    "mnn.model": "Model descriptions",
    "mnn.optim": "Optimizers",
    "mnn.distributed.data_parallel": "DataParallel",
    "mnn.distributed.sampler": "Global batch sampler",
    "mnn.distributed.comm": "Communicators",
    "mnn.text": "Character-level text",
    "mnn.distributed.ring": "Ring all-reduce",
    "mnn.distributed.experiments.costmodel": "Cost model",
    "mnn.distributed.training.trainer": "Trainer",
    "mnn.distributed.timeline": "Timeline",
    "mnn.distributed.watchdog": "Stall watchdog",
}

GENERATED = Path(__file__).parent / "api"


def layer_pages():
    """The layers with a page of their own: the ``Layer`` subclasses exported by
    ``mnn`` that no module page shows, in the order of ``mnn.__all__``."""
    exported = [getattr(mnn, name) for name in mnn.__all__]
    return [cls for cls in exported
            if isinstance(cls, type) and issubclass(cls, mnn.Layer) and cls.__module__ not in MODULE_PAGES]


def module_page_name(module):
    return module.rsplit(".", 1)[-1]


def _heading(title):
    return f"{title}\n{'=' * len(title)}\n"


def _layer_page(cls):
    """A layer's page: its module's notes, then the class with the derivations in its methods."""
    return f"""{_heading(cls.__name__)}
Module ``{cls.__module__}``:

.. automodule:: {cls.__module__}
   :no-index:

.. autoclass:: mnn.{cls.__name__}
   :members:
"""


def _module_page(module, title):
    # What the module defines, not its __all__: mnn.seq_layers re-exports every
    # layer for the seed's star import, and those have their own pages.
    return f"""{_heading(title)}
.. automodule:: {module}
   :members:
   :ignore-module-all:
"""


def _toctree(title, intro, entries):
    lines = "\n".join(f"   {entry}" for entry in entries)
    return f"""{_heading(title)}
{intro}

.. toctree::

{lines}
"""


def _pages():
    """Every generated page, path relative to ``GENERATED``: text."""
    layers = layer_pages()
    pages = {f"layers/{cls.__name__}.rst": _layer_page(cls) for cls in layers}
    pages["layers/index.rst"] = _toctree(
        "Layers",
        "One page per layer: its module's notes, then the class. The derivations\n"
        "are in the docstrings of ``forward`` and ``backward``.",
        [cls.__name__ for cls in layers])
    for module, title in MODULE_PAGES.items():
        pages[f"{module_page_name(module)}.rst"] = _module_page(module, title)
    pages["index.rst"] = _toctree(
        "API reference", "Layers first, then the modules in reading order.",
        ["layers/index", *map(module_page_name, MODULE_PAGES)])
    return pages


def write_pages(app):
    """Write the generated pages and remove those of layers or modules that are gone.
    An unchanged page is not rewritten, or Sphinx would read it again on every build."""
    pages = _pages()
    for stale in {str(p.relative_to(GENERATED)) for p in GENERATED.rglob("*.rst")} - set(pages):
        (GENERATED / stale).unlink()
    for relative, text in pages.items():
        path = GENERATED / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


_TAG = re.compile(r"\\tag\{[^}]*\}")


def tags_outside_split(app, doctree):
    r"""Write each displayed equation that has a ``\tag`` and a line break ``\\`` as
    ``\begin{split}...\end{split}\tag{n}``.

    Sphinx wraps an equation with a ``\\`` anywhere in it (even inside ``cases``)
    in ``\begin{split}``, where MathJax, like LaTeX, refuses ``\tag``: the tag
    numbers the whole display, so it goes after the ``split``. A block of several
    equations (blank lines between them) is left to Sphinx; the docs test checks
    that no tag ends up inside a ``split`` or ``aligned``.
    """
    display_open, display_close = app.config.mathjax_display
    for block in doctree.findall(nodes.math_block):
        latex = block.astext()
        tags = _TAG.findall(latex)
        if len(tags) != 1 or "\\\\" not in latex or "\n\n" in latex.strip():
            continue
        if block.get("no-wrap", block.get("nowrap", False)):
            continue
        body = _TAG.sub("", latex).strip()
        block["no-wrap"] = block["nowrap"] = True
        block[:] = [nodes.Text(display_open + rf"\begin{{split}}{body}\end{{split}}{tags[0]}" + display_close)]


def setup(app):
    app.connect("builder-inited", write_pages)
    app.connect("doctree-read", tags_outside_split)
