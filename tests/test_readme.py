"""README.md is the front door: short, and every command, flag, module, file and link it names is real.

docs/*.md get the same checks on commands, modules, paths and links, and neither may point outside the
repository (no ``../`` path, no reference to the design notes that used to live outside it).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from gblrc.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_LINES = 250
QUICKSTART = "bash setup.sh && bash samples/quickstart.sh"
TESTS = "bash setup.sh && .venv/bin/python -m pytest -q -n 2 tests"

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
# `gblrc SUB`, also `.venv/bin/gblrc SUB`; not `gblrc.compress(` or `gblrc::GBLRLinear`; SUB lower case (not CMD)
INVOCATION = re.compile(r"(?<![\w.:-])(?:[\w.-]*/)*gblrc[ \t]+([a-z][\w-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
MODULE = re.compile(r"(?<![\w/])benchmarks\.([a-z_]\w*)")
REPO_PATH = re.compile(r"(?<![\w./-])(?:gblrc|passes|runtime|tests|samples|benchmarks|docs)/[\w./-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _ids(pages):
    return [p.relative_to(ROOT).as_posix() for p in pages]


def _commands(md: str) -> list[str]:
    """Shell-like lines of the page: fenced blocks (continuations joined, comments cut) and inline code."""
    lines = []
    for block in FENCE.findall(md):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"(^|\s)#.*$", "", line))
    lines += [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", md))]
    return lines


def _invocations(md: str) -> list[tuple[str, list[str], str]]:
    """(subcommand, flags used with it, the command text) for every `gblrc SUB ...` of the page."""
    found = []
    for line in _commands(md):
        hits = list(INVOCATION.finditer(line))
        for i, hit in enumerate(hits):
            end = hits[i + 1].start() if i + 1 < len(hits) else len(line)
            segment = re.split(r"\|\s|&&|;", line[hit.end() : end])[0]
            found.append((hit.group(1), FLAG.findall(segment), line.strip()))
    return found


@lru_cache(maxsize=None)
def _help(sub: str) -> tuple[str, frozenset]:
    result = CliRunner().invoke(main, [sub, "--help"])
    assert result.exit_code == 0, result.output
    cmd = main.commands[sub]
    opts = frozenset(o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())))
    return result.output, opts


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: str) -> set[str]:
    seen, out = Counter(), set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", FENCE.sub("", md), flags=re.M):
        s = _slug(heading)
        out.add(s if not seen[s] else f"{s}-{seen[s]}")
        seen[s] += 1
    return out


def test_readme_is_at_most_250_lines():
    n = len(_text(README).splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES} (measurements go to docs/results.md)"


def test_readme_opens_with_the_two_commands():
    md = _text(README)
    first = FENCE.search(md)
    assert first is not None and md.index(first.group(0)) < md.index("\n## "), "no code block before the sections"
    lines = [line.strip() for line in first.group(1).splitlines()]
    assert QUICKSTART in lines and TESTS in lines, first.group(1)


def test_readme_uses_the_cli():
    subs = {sub for sub, _, _ in _invocations(_text(README))}
    assert {"compress", "lower", "bench"} <= subs, subs


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_gblrc_command_and_flag_exists(page):
    bad = []
    for sub, flags, line in _invocations(_text(page)):
        if sub not in main.commands:
            bad.append(f"`gblrc {sub}` is not a subcommand ({sorted(main.commands)}): {line}")
            continue
        help_text, opts = _help(sub)
        bad += [
            f"`gblrc {sub} {f}` is not in `gblrc {sub} --help`: {line}"
            for f in flags
            if f not in opts or f not in help_text
        ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_benchmark_module_exists(page):
    missing = sorted(
        {f"benchmarks.{m}" for m in MODULE.findall(_text(page)) if not (ROOT / "benchmarks" / f"{m}.py").is_file()}
    )
    assert not missing, f"{page.name} names benchmark modules that do not exist: {missing}"


def test_readme_benchmark_commands_run_as_modules():
    md = _text(README) + "".join(_text(p) for p in DOCS)
    assert not re.findall(r"python3?\s+benchmarks/\S+\.py", md), "write benchmark commands as python -m benchmarks.NAME"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_repository_path_exists(page):
    paths = {p.rstrip(".,:;") for p in REPO_PATH.findall(_text(page))}
    paths = {p for p in paths if p.endswith("/") or re.search(r"\.\w+$", p)}  # files and folders, not "samples/s"
    missing = sorted(p for p in paths if "*" not in p and not (ROOT / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_readme_names_samples_that_exist():
    names = set(re.findall(r"samples/([\w.-]+\.\w+)", _text(README)))
    assert names, "the README names no sample"
    assert all((ROOT / "samples" / n).is_file() for n in names), names


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_link_resolves(page):
    bad = []
    for target in LINK.findall(_text(page)):
        if re.match(r"[a-z]+:", target):
            bad.append(f"{target}: a link outside the repository")
            continue
        path, _, anchor = target.partition("#")
        dest = page if not path else (ROOT / path[1:] if path.startswith("/") else page.parent / path)
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(_text(dest)):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def test_readme_links_the_results_and_the_design():
    targets = {t.partition("#")[0] for t in LINK.findall(_text(README))}
    assert {"docs/results.md", "docs/design.md"} <= targets, targets


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_nothing_points_outside_the_repository(page):
    md = _text(page)
    assert "../" not in md, f"{page.name} has a ../ path"
    assert "shared/DESIGN" not in md and "DESIGN.md" not in md, f"{page.name} cites the old outside design notes"
