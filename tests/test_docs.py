"""References to sections point at sections that exist.

docs/design.md is the only page with numbered sections ("## 1. The GBLR matrix"), and the docs and the
code cite it as ``docs/design.md §N`` (README, docs/*.md, docstrings and comments of gblrc/, passes/,
runtime/, benchmarks/, samples/, tests/): every such number must be a numbered heading of design.md, a
link whose text says §N must point at heading N, and a quotation given with a reference
(``docs/design.md §3: "pick per layer by timing"``, ``docs/results.md, "Block-level refinement"``) must be
found there.  Markdown links with anchors in README.md and docs/*.md are checked by
tests/test_readme.py (``test_every_link_resolves``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("gblrc", "passes", "runtime", "benchmarks", "samples", "tests")
CODE = sorted(
    p
    for d in CODE_DIRS
    for p in (ROOT / d).rglob("*")
    if p.suffix in (".py", ".sh", ".md") and p.is_file() and p.name != Path(__file__).name and ".venv" not in p.parts
)
SOURCES = PAGES + CODE

FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*$", re.M)
NUMBERED = re.compile(r"^(\d+)\.\s")
SECTION_REF = re.compile(r"§\s*(\d+)")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
# `docs/design.md §3: "quote"`, `docs/design.md §1, "Training"`, `docs/results.md, "Name"`, `README, "Name"`
QUOTED = re.compile(r"(?:docs/)?(design\.md|results\.md|usage\.md|README(?:\.md)?)(?:\s*§\s*(\d+))?[,:]\s*\"([^\"]+)\"")


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _text(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def _norm(s: str) -> str:
    """Lower case, markdown emphasis and code marks dropped, whitespace (and comment marks at line starts)
    collapsed: a quotation wrapped over lines of a docstring or comment compares with the page's text."""
    s = re.sub(r"\n[ \t]*#+[ \t]?", "\n", s)
    return " ".join(re.sub(r"[*`]", "", s).lower().split())


def _headings(md: str) -> list[tuple[int, str, int]]:
    """(level, text, offset) of the page's headings, outside code fences."""
    body = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), md)  # blanked, offsets kept
    return [(len(m.group(1)), m.group(2), m.start()) for m in HEADING.finditer(body)]


def _sections(md: str) -> dict[int, str]:
    """Number -> text (its heading and body up to the next heading of the same or a higher level) of
    the page's numbered sections."""
    heads = _headings(md)
    out = {}
    for i, (level, text, start) in enumerate(heads):
        m = NUMBERED.match(text)
        if not m:
            continue
        end = next((s for lv, _, s in heads[i + 1 :] if lv <= level), len(md))
        out[int(m.group(1))] = md[start:end]
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", re.sub(r"[*`]", "", heading).strip().lower()).replace(" ", "-")


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _page_of(name: str) -> Path:
    return ROOT / "README.md" if name.startswith("README") else ROOT / "docs" / name


def test_design_has_numbered_sections_and_is_the_only_page_that_does():
    assert _sections(_text(DESIGN)), "docs/design.md has no numbered section (## 1. ...)"
    others = [_rel(p) for p in PAGES if p != DESIGN and _sections(_text(p))]
    assert not others, f"numbered sections outside docs/design.md make § references ambiguous: {others}"


def test_design_sections_are_numbered_in_order():
    numbers = list(_sections(_text(DESIGN)))
    assert numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("src", SOURCES, ids=[_rel(p) for p in SOURCES])
def test_every_section_reference_names_a_section_of_design(src):
    numbers = set(_sections(_text(DESIGN)))
    text = _text(src)
    bad = [
        f"{_rel(src)}:{_line(text, m.start())}: {m.group(0)!r}: docs/design.md has no section {m.group(1)} "
        f"(it has {sorted(numbers)})"
        for m in SECTION_REF.finditer(text)
        if int(m.group(1)) not in numbers
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_a_link_that_says_a_section_points_at_it(page):
    heads = {int(m.group(1)): _slug(text) for _, text, _ in _headings(_text(DESIGN)) if (m := NUMBERED.match(text))}
    text = _text(page)
    bad = []
    for m in LINK.finditer(text):
        label, target = m.groups()
        path, _, anchor = target.partition("#")
        ref = SECTION_REF.search(label)
        if ref is None or not path.endswith("design.md"):
            continue
        want = heads.get(int(ref.group(1)))
        if anchor != want:
            bad.append(f"{_rel(page)}:{_line(text, m.start())}: [{label}]({target}) should point at #{want}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("src", SOURCES, ids=[_rel(p) for p in SOURCES])
def test_every_quoted_section_or_passage_is_there(src):
    text = _text(src)
    sections = _sections(_text(DESIGN))
    bad = []
    for m in QUOTED.finditer(text):
        name, number, quote = m.groups()
        page = _page_of(name)
        where = f"{_rel(src)}:{_line(text, m.start())}: {' '.join(m.group(0).split())}"
        if not page.is_file():
            bad.append(f"{where}: no {_rel(page)}")
        elif number is not None:  # a heading or a passage of that section of design.md
            if _norm(quote) not in _norm(sections.get(int(number), "")):
                bad.append(f"{where}: not in section {number} of docs/design.md")
        elif not any(_norm(h).startswith(_norm(quote)) for _, h, _ in _headings(_text(page))):
            bad.append(f"{where}: no heading of {_rel(page)} starts with it")
    assert not bad, "\n".join(bad)


def test_the_references_are_found():
    """The patterns above still see the references the code makes (a guard against a test that checks nothing)."""
    refs = sum(len(SECTION_REF.findall(_text(p))) for p in CODE)
    quoted = sum(len(QUOTED.findall(_text(p))) for p in CODE)
    assert refs >= 10 and quoted >= 5, (refs, quoted)
