"""Judging text of other genres (gblrc.io.genres): markup stripped, genres found offline, clear errors."""

from __future__ import annotations

import gzip

import pytest

from gblrc.errors import GblrcError
from gblrc.io import genres
from gblrc.io.genres import genre_sentences, strip_markup

README = """# Fastlib

[![build](https://ci.example/badge.svg)](https://ci.example)

Fastlib makes **array programs** run faster on [every machine](https://example.org) you own.

```python
import fastlib
fastlib.run()
```

| option | meaning |
|--------|---------|
| fast   | yes     |

Installation
============

Use ``pip install fastlib`` and read the :ref:`tutorial <intro>` before your first program runs.

Example::

    fastlib.compile(x)

It was written by volunteers who care about clear documentation.
"""


def test_strip_markup_keeps_the_prose_and_drops_code_tables_links_and_headings():
    text = strip_markup(README)
    assert "Fastlib makes array programs run faster on every machine you own." in " ".join(text.split())
    assert "It was written by volunteers who care about clear documentation." in text
    for gone in ("import fastlib", "| fast", "https://", "=====", "# Fastlib", "fastlib.compile", "badge.svg"):
        assert gone not in text, gone


def test_changelog_entries_join_lines_and_drop_maintainers(tmp_path):
    d = tmp_path / "doc" / "pkg"
    d.mkdir(parents=True)
    with gzip.open(d / "changelog.Debian.gz", "wt") as f:
        f.write(
            "pkg (1.2-1) unstable; urgency=medium\n\n"
            "  [ Jane Doe ]\n"
            "  * Fix a crash when the configuration file is empty or missing\n"
            "    entirely on first start (Closes: #12345).\n"
            "  * New upstream release.\n\n"
            " -- Jane Doe <jane@example.org>  Mon, 01 Jan 2024 10:00:00 +0000\n"
        )
    texts = genres._changelog_texts(str(tmp_path / "doc"))
    assert texts == [
        "Fix a crash when the configuration file is empty or missing entirely on first start.\n\nNew upstream release."
    ]


def test_readme_genre_is_found_offline_in_a_fixed_order():
    a = genre_sentences("readme")
    assert len(a) > 100 and a == genre_sentences("readme")
    assert not any("```" in s or "http://" in s or "https://" in s for s in a)
    assert set(genre_sentences("readme", exclude=a[:10])).isdisjoint(a[:10])


def test_unknown_or_missing_genre_is_a_one_line_error(monkeypatch):
    with pytest.raises(GblrcError, match="unknown text genre 'poetry'"):
        genre_sentences("poetry")
    monkeypatch.setattr(genres, "_changelog_texts", lambda: [])
    with pytest.raises(GblrcError, match="no changelog text on this machine") as e:
        genre_sentences("changelog")
    assert "\n" not in str(e.value)
