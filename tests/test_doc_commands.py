"""The commands that README.md and docs/ quote (the source of their numbers) exist: every
``python benchmarks/X.py`` / ``python docs/examples/X.py`` script and each of its ``--flags``, every
``python -m module``, every ``pytest tests/...`` file and test name, and every ``make`` target."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: docs/api.md is generated from docstrings and quotes no measurement.
MARKDOWN_FILES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "api.md")]

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"`([^`]+)`")
_SCRIPT = re.compile(r"(?:^|[\s/])python3?\s+(?P<script>(?:benchmarks|docs/examples)/[\w/]+\.py)(?P<args>[^#]*)")
_MODULE = re.compile(r"(?:^|[\s/])python3?\s+-m\s+(?P<module>[\w.]+)")
_PYTEST = re.compile(r"(?:^|\s)(?:python3?\s+-m\s+)?pytest\s+(?P<args>[^#]*)")
_MAKE = re.compile(r"(?:^|\s)make\s+(?P<target>[a-z][\w-]*)")


def commands(path: Path) -> list[tuple[int, str]]:
    """``(line, command text)``: each line of every fenced block, and every inline code span outside them
    (a span that wraps over lines is joined with spaces)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for m in _FENCE.finditer(text):
        first = text.count("\n", 0, m.start(2)) + 1
        found += [(first + i, line) for i, line in enumerate(m.group(2).splitlines())]
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    found += [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in _INLINE.finditer(prose)]
    return found


def problems_in(path: Path) -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    out = []
    for line, command in commands(path):
        where = f"{name}:{line}: `{command}`"
        for m in _SCRIPT.finditer(command):
            script = REPO / m.group("script")
            if not script.is_file():
                out.append(f"{where}: no file {m.group('script')}")
                continue
            source = script.read_text()
            out += [f"{where}: {m.group('script')} has no option {flag}"
                    for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group("args"))
                    if f'"{flag}"' not in source and f"'{flag}'" not in source]
        for m in _MODULE.finditer(command):
            if importlib.util.find_spec(m.group("module")) is None:
                out.append(f"{where}: no module {m.group('module')}")
        for m in _PYTEST.finditer(command):
            for target in re.findall(r"(?<!\S)tests/\S+", m.group("args")):
                file, _, name = target.partition("::")
                if not (REPO / file).exists():
                    out.append(f"{where}: no file {file}")
                elif name and f"def {name.split('[')[0]}(" not in (REPO / file).read_text():
                    out.append(f"{where}: {file} has no test {name}")
        for m in _MAKE.finditer(command):
            if not re.search(rf"^{re.escape(m.group('target'))}:", makefile, re.MULTILINE):
                out.append(f"{where}: the Makefile has no target {m.group('target')}")
    return out


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: p.name)
def test_quoted_commands_exist(path):
    assert problems_in(path) == []


def test_the_checker_finds_missing_scripts_flags_modules_tests_and_targets(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Measured with `python benchmarks/run.py --no-such-flag` and `python benchmarks/gone.py`,\n"
        "`python -m engine.no_such_module`, `pytest tests/test_docs.py::test_nothing_here`,\n"
        "`pytest tests/gone.py`, `make no-such-target`; fine: `python benchmarks/run.py --packing`.\n"
        "```bash\npython benchmarks/run.py --sides engine   # a comment --ignored\n```\n")
    found = problems_in(page)
    assert [p.split(": ", 2)[-1] for p in found] == [
        "benchmarks/run.py has no option --no-such-flag",
        "no file benchmarks/gone.py",
        "no module engine.no_such_module",
        "tests/test_docs.py has no test test_nothing_here",
        "no file tests/gone.py",
        "the Makefile has no target no-such-target",
    ], found
