"""Sphinx configuration of mnn's docs: the guide and the API reference. Build them with ``make docs``.

The guide's pages are the Markdown files beside this one (``docs/*.md``, read by
myst-parser), written to read as they are on GitHub too: their links are
relative paths to other ``.md`` files, with ``#anchors`` made from headings as
GitHub makes them. ``index.rst`` lists them.

The API reference shows the docstrings with their math rendered to MathML at
build time (``_ext/mathml.py``): the built pages load no script for it and
read offline, from any folder. At every build this file writes its pages into
``docs/api/`` (not committed):

* one page per layer: each ``Layer`` subclass in ``mnn.__all__``, so a new
  layer gets its page without an edit here;
* one page per module in ``MODULE_PAGES`` below, the one list of the modules
  that are not layers. A layer defined in one of them (the containers of
  ``mnn.seq_layers``) is shown on that module's page instead of its own.
"""

import re
import sys
from importlib.metadata import version as installed_version
from pathlib import Path


import mnn
from mnn.distributed.environment import DISTRIBUTION

project = "mnn"
author = "the mnn developers"
copyright = "2026, the mnn developers"
release = installed_version(DISTRIBUTION)

# The extensions of this project: _ext/mathml.py renders the math.
sys.path.insert(0, str(Path(__file__).parent / "_ext"))
extensions = ["sphinx.ext.autodoc", "mathml", "myst_parser"]
html_math_renderer = "mathml"
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


# A default that is a class shows as its repr, "dtype=<class 'numpy.float32'>":
# it shows as the class's name, "dtype=float32".
_CLASS_REPR = re.compile(r"<class '(?:\w+\.)*(\w+)'>")


def class_defaults_by_name(app, what, name, obj, options, signature, return_annotation):
    if signature:
        signature = _CLASS_REPR.sub(r"\1", signature)
    return signature, return_annotation


def setup(app):
    app.connect("builder-inited", write_pages)
    app.connect("autodoc-process-signature", class_defaults_by_name)
