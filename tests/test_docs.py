r"""The docstrings' math and the code that implements it stay matched, and the docs build.

Every ``\tag{n}`` in a class's docstrings (the class's own and its methods')
must be cited by a comment ``# Eq. (n)`` in that class's source; a tag in a
module docstring, somewhere in that module's source. Comments cite
``# Eq. (1)``, ``# Eq. (2), (3)``, ``# Eq. (2)-(4)`` (2, 3 and 4) and may go on
after the numbers (``# Eq. (3): the sum over c``).

The README and the guide's pages (``docs/*.md``) stay true to the code: the
README fits in 300 lines and links every page; every relative link and
``#anchor`` resolves (on GitHub and in the HTML alike: anchors are made from
headings as GitHub makes them); the options the command-line reference lists
are exactly those each program's ``--help`` shows; every ``mnn-*`` command
and ``make`` target written in them exists; the examples run; the layout page
names every module.

The tests after those build the Sphinx docs once (``make docs``) when Sphinx is
installed (the ``docs`` extra) and are skipped otherwise: the math is MathML made at
build time and no page loads anything from elsewhere, so that the docs read offline;
where Chromium is installed, it shows the math typeset.
"""

import ast
import html as html_module
import importlib
import inspect
import io
import json
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
from processes import exit_status, run

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# The guide's pages; the reports in docs/scaling/ and docs/gpt/ are written by the
# experiments (mnn-scaling, mnn-bench) and only their links are checked here.
PAGES = sorted(DOCS.glob("*.md"))
PROGRAMS = ("mnn-train", "mnn-launch", "mnn-generate", "mnn-bench", "mnn-scaling", "mnn-cluster", "mnn-plot")
# Programs whose options belong to their subcommands: their --help is read for each.
SUBCOMMANDS = {"mnn-cluster": ("run", "up", "down", "list")}

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


def test_every_citation_names_a_tag_of_its_class_or_module():
    # Two edits made apart can leave a line citing an equation the docstring renumbered.
    wrong = []
    for module in _modules():
        module_tags = set(map(int, _TAG.findall(module.__doc__ or "")))
        for cls in _defined_classes(module):
            tags = {int(number) for _, doc in _docstrings(cls) for number in _TAG.findall(doc)}
            for number in sorted(cited_equations(inspect.getsource(cls)) - tags - module_tags):
                wrong.append(f"{cls.__qualname__} ({module.__name__}) cites Eq. ({number}), which no \\tag names")
    assert not wrong, "\n".join(wrong)


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


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    """The docs built once for the tests that read them, as ``make docs`` builds them
    (``sphinx-build -W``): (the copy of docs/ they were built from, the HTML)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("latex2mathml", reason="latex2mathml (the docs extra) renders the math")
    tmp_path = tmp_path_factory.mktemp("docs")
    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "api"))
    html = tmp_path / "html"
    build = run(["-W", "-q", "-b", "html", str(source), str(html)], command=[sys.executable, "-m", "sphinx"],
                timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return source, html


@pytest.mark.slow  # a whole Sphinx build: 5 s on an idle 2-core machine, 20 s under load
def test_docs_build_with_math_on_every_page(built_docs):
    """``sphinx-build -W`` succeeds; every layer page shows math (MathML) and its
    backward, every module page exists."""
    source, html = built_docs
    conf = runpy.run_path(str(source / "conf.py"))
    layers = conf["layer_pages"]()
    assert mnn.LinearLayer in layers
    for cls in layers:
        text = (html / "api" / "layers" / f"{cls.__name__}.html").read_text()
        assert "<math" in text, f"{cls.__name__}: no math"
        if getattr(vars(cls).get("backward"), "__doc__", None):
            assert f'id="mnn.{cls.__name__}.backward"' in text, f"{cls.__name__}: backward's derivation missing"
    for module in conf["MODULE_PAGES"]:
        assert (html / "api" / f"{conf['module_page_name'](module)}.html").is_file(), module
    # The guide's pages: each one rendered, and every link and image of it found in the HTML.
    unresolved = []
    for name in [page.relative_to(DOCS).with_suffix(".html") for page in PAGES]:
        rendered = html / name
        assert rendered.is_file(), f"{name}: not rendered"
        for target in re.findall(r'(?:href|src)="([^"]+)"', rendered.read_text()):
            file, _, anchor = target.partition("#")
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or file.startswith("_static"):
                continue
            linked = (rendered.parent / file).resolve() if file else rendered
            if not linked.is_file():
                unresolved.append(f"{name}: {target}: no file")
            elif anchor and f'id="{anchor}"' not in linked.read_text():
                unresolved.append(f"{name}: {target}: no id {anchor}")
    assert not unresolved, "\n".join(unresolved)


# What a reader sees offline: the math is MathML made at build time, and no page loads
# anything from elsewhere (MathJax from a CDN showed raw TeX without a network).
_ANNOTATION = re.compile(r"<annotation\b.*?</annotation>", re.S)
_CODE = re.compile(r"<(code|pre)\b.*?</\1>", re.S)
_REMOTE = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)


def _shown_text(page):
    """A page's HTML less the math's TeX annotations (not displayed) and the code."""
    return _CODE.sub("", _ANNOTATION.sub("", page.read_text()))


@pytest.mark.slow  # shares the build of the test above
def test_the_math_is_mathml_and_no_page_loads_anything_from_elsewhere(built_docs):
    _, html = built_docs
    linear = html / "api" / "layers" / "LinearLayer.html"
    text = linear.read_text()
    assert '<math display="block"' in text or re.search(r'<math [^>]*display="block"', text)
    # The derivation's \tag{2}, beside its equation, and its TeX kept as the annotation.
    assert '<span class="eqno">(2)</span>' in text
    assert '<annotation encoding="application/x-tex">' in text
    problems = []
    for page in sorted(html.rglob("*.html")):
        shown, name = _shown_text(page), page.relative_to(html)
        problems += [f"{name}: raw TeX {tex}" for tex in ("\\frac", "\\partial", "\\(", "\\[") if tex in shown]
        problems += [f"{name}: a formula left as TeX" for _ in re.findall(r'class="math-tex"', shown)]
        problems += [f"{name}: mentions MathJax or a CDN" for _ in re.findall(r"mathjax|\bcdn\b", page.read_text(), re.I)]
        problems += [f"{name}: loads {tag}" for tag in _REMOTE.findall(page.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # shares the build of the test above
def test_signatures_name_classes_and_the_index_does_not_repeat_the_sidebar(built_docs):
    _, html = built_docs
    linear = (html / "api" / "layers" / "LinearLayer.html").read_text()
    signature = re.sub(r"<[^>]+>", "", linear.split('id="mnn.LinearLayer"', 1)[1].split("</dt>", 1)[0])
    assert "dtype=float32" in signature and "&lt;class" not in signature, signature
    assert not [page.name for page in html.rglob("*.html") if "&lt;class &#39;" in page.read_text()]
    # The toctrees make the sidebar; the index's body lists none of them in full.
    index = (html / "index.html").read_text()
    body = index.split('<div class="body"', 1)[1].split('<div class="sphinxsidebar"', 1)[0]
    assert "toctree-l1" not in body


def test_the_math_extension_converts_what_the_docstrings_use_and_refuses_the_rest():
    """docs/_ext/mathml.py: a tag is taken out and shown beside its equation, a line
    break outside an environment makes a split, the sized delimiters and \\arg that
    latex2mathml gets wrong are rewritten, and a command it does not know is refused
    (the build warns, and -W fails it) instead of shown as the text "\\foo"."""
    pytest.importorskip("latex2mathml")
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        mathml = importlib.import_module("mathml")
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert mathml._equation(r"a = b \\ c = d \tag{3}") == (r"\begin{split}a = b \\ c = d\end{split}", ["3"])
    cases = r"x = \begin{cases} 1 & a \\ 0 & b \end{cases} \tag{4}"
    assert mathml._equation(cases) == (cases.replace(r" \tag{4}", ""), ["4"])
    for latex in (r"\big\lfloor j/2 \big\rfloor", r"\arg\min_\theta f", r"\frac{\partial \ell}{\partial W_{jk}}"):
        converted = mathml.to_mathml(latex, "block")
        assert converted.startswith("<math") and "<semantics>" in converted, latex
        assert "\\" not in converted.split("<annotation", 1)[0], converted
    with pytest.raises(mathml.UnconvertedMath, match=r"\\foo"):
        mathml.to_mathml(r"\foo{x} + y", "inline")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


# Run in the page (a copy of it) after it is laid out: what the browser made of the math.
_PROBE = """<script>
const fraction = document.querySelector("math mfrac");
const [numerator, denominator] = fraction ? fraction.children : [];
document.body.setAttribute("data-probe", JSON.stringify({
  maths: document.querySelectorAll("math").length,
  display: getComputedStyle(document.querySelector('math[display="block"]')).display,
  stacked: Boolean(fraction) && numerator.getBoundingClientRect().bottom <= denominator.getBoundingClientRect().top + 1,
  shownTeX: document.body.innerText.includes("\\\\frac"),
}));
</script>
"""


@pytest.mark.slow  # shares the build of the test above
def test_chromium_typesets_the_math_of_moved_docs(built_docs, tmp_path):
    """A headless Chromium opens a layer page of the docs moved to another folder, with
    no network, and lays its fractions out as fractions: MathML, typeset, not TeX."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed: the MathML is checked in the HTML only")
    moved = tmp_path / "moved"
    shutil.copytree(built_docs[1], moved)
    page = moved / "api" / "layers" / "LinearLayer.html"
    page.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dump = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1240,1600",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', dump.stdout)
    assert found, f"chromium did not run the page (exit {dump.returncode}): {dump.stderr[-2000:]}"
    probe = json.loads(html_module.unescape(found.group(1)))
    assert probe["maths"] > 10 and probe["display"] == "block math", probe
    assert probe["stacked"] and not probe["shownTeX"], probe


# --- The README and the guide's pages ---------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`]+`")  # a span may go on over a line break
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _prose(text):
    """The text without code: fenced blocks and inline code spans blanked."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _code(text):
    """Every piece of code in a Markdown text: the lines of fenced blocks (with shell
    continuations joined) and the inline code spans."""
    pieces = []
    for block in _FENCE.finditer(text):
        body = block.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        pieces += body.replace("\\\n", " ").splitlines()
    pieces += [" ".join(span.strip("`").split()) for span in _INLINE_CODE.findall(_FENCE.sub("", text))]
    return pieces


def github_anchor(heading):
    """The anchor GitHub (and myst-parser's ``myst_heading_anchors``) gives a heading:
    its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[`*]{1,2}(?=\S)|(?<=\S)[`*]{1,2}", "", text)
    text = re.sub(r"(?<!\w)_{1,2}(?=\S)|(?<=\S)_{1,2}(?!\w)", "", text)  # no_grad keeps its _
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen = {}
    result = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        anchor = github_anchor(heading)
        result.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return result


def broken_links(path, root=ROOT):
    """One line per relative link of ``path`` whose file, or ``#anchor`` in it, does not exist."""
    broken = []
    for target in _LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{path.relative_to(root)}: {target}: no file {file}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{path.relative_to(root)}: {target}: no heading with anchor #{anchor}")
    return broken


def test_github_anchors():
    assert github_anchor("The cost model (`mnn.distributed.experiments.costmodel`)") == \
        "the-cost-model-mnndistributedexperimentscostmodel"
    assert github_anchor("What happens when…") == "what-happens-when"
    assert github_anchor("`distributed/`: four parts") == "distributed-four-parts"
    assert github_anchor("Any net, from Python") == "any-net-from-python"
    assert github_anchor("Beside PyTorch's no_grad, _emphasis_") == "beside-pytorchs-no_grad-emphasis"


def test_the_readme_is_short_and_links_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the rest belongs in a page of docs/"
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in _LINK.findall(_prose(README.read_text()))}
    assert {page.resolve() for page in PAGES} <= linked, "pages the README does not link: " + \
        ", ".join(page.name for page in PAGES if page.resolve() not in linked)


def test_every_page_is_in_the_docs_index():
    index = (DOCS / "index.rst").read_text()
    entries = set(re.findall(r"^   (?:.*<)?([\w/]+)>?$", index, re.M))
    missing = [page.name for page in PAGES if page.stem not in entries]
    assert not missing, f"pages that docs/index.rst does not list (make docs would fail): {missing}"


def test_links_resolve():
    files = [README, *sorted(DOCS.rglob("*.md"))]
    assert len(files) > 10
    broken = [line for path in files if "_build" not in path.parts for line in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# A page\n\n[ok](#a-page) [gone](b.md) [no such heading](a.md#nowhere) "
                    "`[in code](c.md)` [web](https://example.org)\n")
    assert broken_links(page, tmp_path) == ["a.md: b.md: no file b.md",
                                            "a.md: a.md#nowhere: no heading with anchor #nowhere"]


def _help_options(program, capsys):
    """The options ``program --help`` lists (its option lines, indented by two spaces), less -h/--help.
    Its ``main`` runs in this process: --help needs no process of its own."""
    module = importlib.import_module(f"mnn.scripts.{program.removeprefix('mnn-')}")
    options = set()
    for subcommand in SUBCOMMANDS.get(program, [None]):
        capsys.readouterr()
        assert exit_status(module.main, [subcommand, "--help"] if subcommand else ["--help"]) == 0
        for line in capsys.readouterr().out.splitlines():
            if re.match(r"  -", line):
                options.update(_OPTION.findall(re.split(r"\s{2,}", line.strip())[0]))
    return options - {"-h", "--help"}


@pytest.fixture
def accepted_options(capsys):
    """Each program's options, read from its ``--help``."""
    return {program: _help_options(program, capsys) for program in PROGRAMS}


def _sections(text, level="## "):
    """A Markdown text's sections at one heading level: title -> body."""
    parts = re.split(rf"^{level}(.+)$", _FENCE.sub("", text), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_cli_reference_lists_exactly_the_options_of_each_program(accepted_options):
    sections = _sections((DOCS / "cli.md").read_text())
    assert set(PROGRAMS) <= set(sections), f"docs/cli.md has no section for {set(PROGRAMS) - set(sections)}"
    differences = []
    for program in PROGRAMS:
        first_cells = re.findall(r"^\| ([^|]*(?:\\\|[^|]*)*) \|", sections[program], re.M)
        documented = {option for cell in first_cells for option in _OPTION.findall(cell)}
        if documented != accepted_options[program]:
            differences.append(f"{program}: documented but not accepted: "
                               f"{sorted(documented - accepted_options[program])}; "
                               f"accepted but not documented: {sorted(accepted_options[program] - documented)}")
    assert not differences, "\n".join(differences)


def test_commands_in_the_docs_use_options_that_exist(accepted_options):
    """Every ``mnn-*`` command written in the README or a page (in code) passes only
    options its program takes; ``mnn-launch ... -- mnn-train ...`` is two commands."""
    wrong = []
    for path in [README, *PAGES]:
        for piece in _code(path.read_text()):
            for command in re.split(r"\s--\s|\||;|&&|#", piece):
                match = re.search(rf"(?<![\w/.-])({'|'.join(PROGRAMS)})(?=\s|$)", command)
                if match is None:
                    continue
                words = command[match.end():].split()
                for option in (word for word in words if _OPTION.fullmatch(word.split("=")[0])):
                    if option.split("=")[0] not in accepted_options[match.group(1)] | {"-h", "--help"}:
                        wrong.append(f"{path.name}: {match.group(1)} has no option {option}: {piece.strip()}")
    assert not wrong, "\n".join(wrong)


def test_make_targets_in_the_docs_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = {target for line in re.findall(r"^([\w. \t-]+):(?!=)", makefile, re.M) for target in line.split()}
    named = {(path.name, target) for path in [README, *PAGES] for piece in _code(path.read_text())
             for target in re.findall(r"(?<![\w-])make ([a-z][\w-]*)", piece)}
    assert ("README.md", "train") in named and ("README.md", "test") in named
    missing = sorted(f"{name}: make {target}" for name, target in named if target not in targets)
    assert not missing, "\n".join(missing)


def _blocks(path, language):
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.M | re.S)


def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    example, *_ = [block for block in _blocks(README, "python") if "net.backward()" in block]
    monkeypatch.chdir(tmp_path)  # it saves model.npz
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (64, 10) and (tmp_path / "model.npz").is_file()


@pytest.mark.parametrize("number", range(len(_blocks(README, "python"))), ids=lambda number: f"block{number + 1}")
def test_every_python_block_of_the_readme_runs_as_shown(number, tmp_path, monkeypatch):
    """Each ``python`` block of the README is a whole program: copied into a file, it runs in a
    process of its own (one, without MPI) from an empty directory, with nothing defined
    before it, and what it writes (model.npz, runs/custom-net) lands in that directory."""
    block = _blocks(README, "python")[number]
    script = tmp_path / f"readme_block{number + 1}.py"
    script.write_text(block)
    monkeypatch.chdir(tmp_path)  # the process starts where the test is
    result = run([str(script)], command=[sys.executable], timeout=120, MNN_NO_MPI="1")
    assert result.returncode == 0, f"README.md's python block {number + 1} failed:\n{block}\n{result.stderr[-4000:]}"


def test_the_dataparallel_loop_of_the_training_page_runs():
    example, = [block for block in _blocks(DOCS / "training.md", "python") if "GlobalBatchSampler" in block]
    namespace = {}
    exec(compile(example, "docs/training.md", "exec"), namespace)  # one process here; the same on N ranks
    assert namespace["dp"].timings["steps"] == 3 * namespace["sampler"].steps_per_epoch


def test_the_python_examples_import_what_exists():
    """Every import in a Python example of the README or a page works (the old paths, such as
    ``mnn.distributed.trainer``, do not)."""
    for path in [README, *PAGES]:
        for block in _blocks(path, "python"):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name) or importlib.util.find_spec(
                            f"{node.module}.{alias.name}"), f"{path.name}: from {node.module} import {alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)


def test_the_described_job_of_the_readme_is_the_example_file():
    """The README's TOML is examples/attention.toml's model, and it builds."""
    from mnn.model import build_net
    shown, = _blocks(README, "toml")
    with open(ROOT / "examples" / "attention.toml", "rb") as file:
        example = tomllib.load(file)
    assert tomllib.loads(shown)["model"] == example["model"]
    assert isinstance(build_net(example["model"]), mnn.SequentialLayers)


def test_the_library_page_lists_every_layer():
    table = (DOCS / "library.md").read_text()
    layers = [name for name in mnn.__all__ if isinstance(getattr(mnn, name), type)
              and issubclass(getattr(mnn, name), mnn.Layer) and name not in ("Layer", "LossLayer")]
    missing = [name for name in layers if not re.search(rf"^\| `{name}\(", table, re.M)
               and not re.search(rf"^\|[^|\n]*`{name}\(", table, re.M)]
    assert not missing, f"layers without a row in docs/library.md: {missing}"


def test_the_layout_page_names_every_module():
    """docs/layout.md has a row for each module of mnn/, distributed/ and scripts/, and no other."""
    sections = _sections((DOCS / "layout.md").read_text())
    differences = []
    for folder in ("mnn", "distributed", "scripts"):
        title, = [title for title in sections if title.startswith(f"`{folder}/`")]
        named = set(re.findall(r"^\| `([\w/]+\.py)` \|", sections[title], re.M))
        modules = {str(path.relative_to(ROOT / folder)) for path in (ROOT / folder).rglob("*.py")
                   if path.name != "__init__.py"}
        if named != modules:
            differences.append(f"{folder}/: not in docs/layout.md: {sorted(modules - named)}; "
                               f"named but gone: {sorted(named - modules)}")
    assert not differences, "\n".join(differences)


def test_the_api_pages_name_modules_that_import():
    """conf.py's MODULE_PAGES (read without Sphinx) names modules that exist."""
    tree = ast.parse((DOCS / "conf.py").read_text())
    pages, = [ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MODULE_PAGES"]
    for module in pages:
        importlib.import_module(module)
