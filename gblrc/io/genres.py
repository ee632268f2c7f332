"""Text of genres the built-in training text does not contain, for judging fidelity (offline).

The built-in mix (:func:`gblrc.io.zoo.package_sentences`) and the standard library sets are docstrings;
a model calibrated on them must also be judged on other kinds of English.  Three genres ship with
every machine this project runs on, read as files (nothing imported):

    readme     the long descriptions (README prose) in installed distributions' METADATA files
    sklearn    scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst), when it is installed
    changelog  Debian package changelog entries (/usr/share/doc/*/changelog.Debian.gz), on Debian-like systems

Markup (Markdown / reStructuredText links, code, tables, headings, HTML) is stripped before the text
is cut into sentences of 6-40 words.  :func:`genre_sentences` returns them in a fixed order.
"""

from __future__ import annotations

import glob
import gzip
import os
import re

from gblrc.errors import GblrcError

__all__ = ["GENRES", "genre_sentences", "strip_markup"]

GENRES = ("readme", "sklearn", "changelog")

_FENCE = re.compile(r"```.*?```|~~~.*?~~~", re.S)
_HTML = re.compile(r"<[^>\n]{1,200}>")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_RST_ROLE = re.compile(r":[a-z:]+:`~?([^`]+)`")
_URL = re.compile(r"https?://\S+")


def strip_markup(text: str) -> str:
    """Prose of a Markdown / reStructuredText document: code blocks, tables, headings, directives,
    HTML tags and URLs removed, links reduced to their text; paragraphs kept apart by blank lines."""
    text = _FENCE.sub("\n\n", text)
    text = _HTML.sub(" ", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_ROLE.sub(r"\1", text)
    text = _URL.sub(" ", text)
    keep, in_literal = [], False
    for line in text.splitlines():
        s = line.strip()
        if in_literal:  # an indented reST literal block (after "::") ends at the first unindented line
            if not s or line[:1] in (" ", "\t"):
                continue
            in_literal = False
        if (
            not s
            or s.startswith(("#", "..", "|", "+-", ">>>", "$ ", "    "))
            or re.fullmatch(r"[=\-~^*+#:`'\"_. ]+", s)  # heading underlines, table rules
            or line.startswith(("    ", "\t"))  # indented code
        ):
            keep.append("")
        else:
            keep.append(s.lstrip("*-+ ").replace("**", "").replace("``", "").replace("`", ""))
        if s.endswith("::"):
            in_literal = True
    return "\n".join(keep)


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _readme_texts() -> list[str]:
    import importlib.metadata as md

    texts = {}
    for dist in md.distributions():
        meta = dist.metadata
        name = meta.get("Name") or ""
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        desc = body or meta.get("Description") or ""
        if name and desc.strip() and name.lower() not in texts:
            texts[name.lower()] = desc
    return [texts[k] for k in sorted(texts)]


def _sklearn_texts() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return []
    files = []
    for root in spec.submodule_search_locations:
        files += glob.glob(os.path.join(root, "datasets", "descr", "*.rst"))
    out = []
    for f in sorted(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            out.append(fh.read())
    return out


def _changelog_texts(root: str = "/usr/share/doc", per_package: int = 40) -> list[str]:
    """Each changelog's newest ``per_package`` bullet entries (continuation lines joined), maintainer and
    version lines dropped (a cap, so that one long changelog, the kernel's, does not make the genre)."""
    out = []
    for f in sorted(glob.glob(os.path.join(root, "*", "changelog.Debian.gz"))):
        try:
            with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except (OSError, EOFError):
            continue
        entries, cur = [], []
        for line in lines:
            s = line.strip()
            if line.startswith("  * ") or line.startswith("    - ") or not s or not line.startswith(" "):
                if cur:
                    entries.append(" ".join(cur))
                cur = [s[2:]] if line.startswith(("  * ", "    - ")) else []
            elif line.startswith(("  [", " -- ")):  # "[ Maintainer ]" headers, " -- Name <mail>  date" trailers
                if cur:
                    entries.append(" ".join(cur))
                cur = []
            else:
                cur.append(s)
        if cur:
            entries.append(" ".join(cur))
        entries = [re.sub(r"\s*\((?:Closes|LP|closes)[^)]*\)", "", e).strip() for e in entries][:per_package]
        out.append("\n\n".join(e if e.endswith((".", "!", "?")) else e + "." for e in entries if e))
    return out


def genre_sentences(genre: str, min_words: int = 6, max_words: int = 40, exclude=()) -> list[str]:
    """Sentences of ``genre`` (one of :data:`GENRES`), markup stripped, in a fixed order; ``exclude``:
    sentences to leave out.  A genre with no text on this machine is a one-line error."""
    from gblrc.io.zoo import _sentences

    if genre not in GENRES:
        raise GblrcError(f"unknown text genre {genre!r}; choose one of {', '.join(GENRES)}")
    texts = {"readme": _readme_texts, "sklearn": _sklearn_texts, "changelog": _changelog_texts}[genre]()
    seen = set(exclude)
    out = []
    for t in texts:
        prose = t if genre == "changelog" else strip_markup(t)
        out += _sentences(_paragraphs(prose), min_words, max_words, seen)
    if not out:
        where = {
            "readme": "installed distributions' METADATA",
            "sklearn": "scikit-learn (pip install scikit-learn)",
            "changelog": "/usr/share/doc/*/changelog.Debian.gz",
        }[genre]
        raise GblrcError(f"no {genre} text on this machine: it comes from {where}; judge on another genre")
    return out
