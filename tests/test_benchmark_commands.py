"""Every benchmark command written down runs: those in the docstrings of benchmarks/*.py, in README.md and in
docs/*.md.  Each distinct ``python -m benchmarks.NAME [SUBCOMMAND]`` is run with ``--help`` (it must exit 0), and
every flag the written commands give it must be in that help; a ``python benchmarks/NAME.py`` form (which cannot
import the ``benchmarks`` package) must not appear, and a ``bash benchmarks/X.sh`` must name a script that exists.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
MODULE_CMD = re.compile(r"python3?\s+-m\s+benchmarks\.([a-z_]\w*)([^`#;|&]*)")
PATH_CMD = re.compile(r"python3?\s+benchmarks/\S+\.py")
SHELL_CMD = re.compile(r"bash\s+(benchmarks/\S+\.sh)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
SUBCOMMAND = re.compile(r"[a-z][a-z-]*")


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def _snippets(path: Path) -> list[str]:
    """Command-like text of a file: a benchmark's docstring (continuation lines joined), or a page's fenced
    blocks and inline code spans (an inline span may wrap over lines)."""
    if path.suffix == ".py":
        return [_docstring(path).replace("\\\n", " ")]
    md = path.read_text(encoding="utf-8")
    return [b.replace("\\\n", " ") for b in FENCE.findall(md)] + [" ".join(s.split()) for s in INLINE.findall(md)]


def _commands(path: Path) -> list[tuple[str, str, list[str], str]]:
    """(module, subcommand or "", flags, the command) of every benchmark command in ``path``."""
    found = []
    for text in _snippets(path):
        for line in text.splitlines() if path.suffix == ".py" else [text]:
            for m in MODULE_CMD.finditer(line):
                rest = m.group(2).split()
                sub = rest[0] if rest and SUBCOMMAND.fullmatch(rest[0]) else ""
                found.append((m.group(1), sub, FLAG.findall(m.group(2)), m.group(0).strip()))
    return found


def _all_commands():
    out = []
    for path in SCRIPTS + PAGES:
        out += [(path.relative_to(ROOT).as_posix(), *c) for c in _commands(path)]
    return out


COMMANDS = _all_commands()


@lru_cache(maxsize=None)
def _help(module: str, sub: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *([sub] if sub else []), "--help"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return r.returncode, r.stdout + r.stderr


def _is_group(module: str) -> bool:
    """True when benchmarks.MODULE is a click group (it takes a subcommand first)."""
    return "Commands:" in _help(module, "")[1]


def test_commands_are_found():
    modules = {m for _, m, _, _, _ in COMMANDS}
    assert {"minilm", "model_families", "lowering_sweep"} <= modules, modules
    assert any(m == "minilm" and s == "front" for _, m, s, _, _ in COMMANDS)


@pytest.mark.parametrize("module,sub", sorted({(m, s) for _, m, s, _, _ in COMMANDS}), ids=lambda v: v or "-")
def test_every_benchmark_command_runs_and_knows_its_flags(module, sub):
    if sub and not _is_group(module):
        sub = ""  # an argparse script: its first word is a positional argument, not a subcommand
    rc, text = _help(module, sub)
    assert rc == 0, f"python -m benchmarks.{module} {sub} --help exited {rc}:\n{text[-2000:]}"
    bad = []
    for where, m, s, flags, cmd in COMMANDS:
        if m != module or (s if _is_group(module) else "") != sub:
            continue
        bad += [f"{where}: {f} is not in `{module} {sub} --help`: {cmd}" for f in flags if f not in text]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", SCRIPTS + PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_path_form_and_shell_scripts_exist(path):
    text = _docstring(path) if path.suffix == ".py" else path.read_text(encoding="utf-8")
    assert not PATH_CMD.findall(text), f"{path.name}: write python -m benchmarks.NAME, not python benchmarks/NAME.py"
    missing = [p for p in SHELL_CMD.findall(text) if not (ROOT / p).is_file()]
    assert not missing, missing
