r"""Math rendered to MathML when the docs are built, so that the pages need no script.

Sphinx's HTML shows the docstrings' TeX (``\frac{\partial \ell}{\partial W}``)
to a script, MathJax, that typesets it in the reader's browser; a browser that
cannot fetch it (no network, a firewall) shows the TeX as it is. This extension
converts every formula to MathML with latex2mathml at build time instead:
browsers display MathML themselves, so the built pages work offline, from any
folder, and load nothing from anywhere.

* Inline math (``:math:``) becomes ``<math>``; displayed math (``.. math::``)
  one ``<math display="block">`` per equation, equations being separated by
  blank lines, as Sphinx separates them.
* An equation's ``\tag{n}`` (which latex2mathml does not know) is taken out of
  the TeX and shown as ``(n)`` at the right of the equation, where LaTeX puts
  it; so is the number Sphinx gives an equation with a ``:label:``.
* An equation with line breaks ``\\`` outside an environment (``cases``) is
  set in a ``split``, as Sphinx does for MathJax, so that its lines become the
  rows of a table (MathML Core ignores line breaks).
* Each ``<math>`` carries its TeX as an ``annotation`` (not displayed), for
  copying and for screen readers that read TeX.

A formula that latex2mathml cannot convert, or converts only in part (an
unknown command comes out as the literal ``\name``), is shown as its TeX in a
``<code>`` and logged as a warning with its location: ``make docs`` builds with
``-W``, so the build fails rather than publish a formula rendered wrong.
"""

import html
import re
import shutil
from pathlib import Path

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)

CSS = Path(__file__).with_name("mathml.css")

_TAG = re.compile(r"\\tag\*?\{([^{}]*)\}")
_ENVIRONMENT = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)
# What latex2mathml leaves of a command it does not know: the command itself.
_UNCONVERTED = re.compile(r"\\[A-Za-z]+|\\[^A-Za-z\s]")
_MATH_OPEN = re.compile(r"<math\b[^>]*>")

# What latex2mathml (3.81) gets wrong, written in TeX it gets right: a sized
# delimiter that is a command (\big\lfloor comes out as the text "\lfloor"), and
# \arg, the one named operator of LaTeX's that it does not know.
_DELIMITERS = {"lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉", "langle": "⟨", "rangle": "⟩",
               "{": "{", "}": "}", "|": "‖", "vert": "|", "Vert": "‖"}
_SIZED_DELIMITER = re.compile(r"(\\[bB]igg?[lmr]?)\s*\\(lfloor|rfloor|lceil|rceil|langle|rangle|Vert|vert"
                              r"(?![A-Za-z])|[{}|])")
_ARG = re.compile(r"\\arg(?![A-Za-z])")


def _rewrite(latex):
    latex = _SIZED_DELIMITER.sub(lambda match: match.group(1) + _DELIMITERS[match.group(2)], latex)
    return _ARG.sub(r"\\operatorname{arg}", latex)


class UnconvertedMath(ValueError):
    """latex2mathml failed on a formula, or left part of it as TeX."""


def to_mathml(latex, display):
    """``latex`` as a ``<math>`` element (text), ``display`` "block" or "inline",
    with the TeX as its annotation. Raises ``UnconvertedMath`` where the
    conversion fails or leaves a command unconverted."""
    try:
        mathml = convert(_rewrite(latex), display=display)
    except Exception as error:  # latex2mathml raises many kinds on bad input
        raise UnconvertedMath(f"latex2mathml cannot convert it ({type(error).__name__}: {error})") from error
    left = _UNCONVERTED.findall(mathml)
    if left:
        raise UnconvertedMath(f"latex2mathml does not know {', '.join(sorted(set(left)))}")
    opening = _MATH_OPEN.match(mathml)
    body = mathml[opening.end():-len("</math>")]
    annotation = f'<annotation encoding="application/x-tex">{html.escape(latex, quote=False)}</annotation>'
    return f"{opening.group(0)}<semantics>{body}{annotation}</semantics></math>"


def _fallback(translator, node, latex, error):
    logger.warning("math not rendered: %s; shown as TeX: %s", error, latex.strip(), location=node)
    return f'<code class="math-tex">{translator.encode(latex)}</code>'


def _equation(latex):
    """One displayed equation: (the TeX to convert, the tags taken out of it)."""
    tags = _TAG.findall(latex)
    latex = _TAG.sub("", latex).strip()
    if "\\\\" in _ENVIRONMENT.sub("", latex):
        latex = rf"\begin{{split}}{latex}\end{{split}}"
    return latex, tags


def visit_math(translator, node):
    latex = node.astext()
    try:
        translator.body.append(to_mathml(latex, "inline"))
    except UnconvertedMath as error:
        translator.body.append(_fallback(translator, node, latex, error))
    raise nodes.SkipNode


def visit_displaymath(translator, node):
    translator.body.append(translator.starttag(node, "div", CLASS="math"))
    if node["number"]:
        # An equation with a :label: (Sphinx's number, with its permalink).
        translator.body.append(f'<span class="eqno">({get_node_equation_number(translator, node)})')
        translator.add_permalink_ref(node, "Link to this equation")
        translator.body.append("</span>")
    parts = [part for part in node.astext().split("\n\n") if part.strip()]
    for part in parts:
        latex, tags = _equation(part)
        translator.body.append('<div class="math-equation">')
        if tags:
            translator.body.append(f'<span class="eqno">{" ".join(f"({translator.encode(tag)})" for tag in tags)}</span>')
        try:
            translator.body.append(to_mathml(latex, "block"))
        except UnconvertedMath as error:
            translator.body.append(_fallback(translator, node, part, error))
        translator.body.append("</div>")
    translator.body.append("</div>\n")
    raise nodes.SkipNode


def copy_css(app, exception):
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CSS, static / CSS.name)


def setup(app):
    app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None),
                               block_renderers=(visit_displaymath, None))
    app.add_css_file(CSS.name)
    app.connect("build-finished", copy_css)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
