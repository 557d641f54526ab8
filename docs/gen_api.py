"""Generate the API reference (docs/api.md) from the docstrings of the public API.

    python docs/gen_api.py              # writes docs/api.md
    python docs/gen_api.py OUTPUT.md    # writes OUTPUT.md instead

What is documented is listed in :data:`SECTIONS` as dotted names. A name that does not import is left
out with a warning on stderr (never silently). Docstrings are rendered as written: Google-style sections
(``Args:``, ``Returns:``, ...) become bold labels with bullet items, ``literal::`` blocks become fenced
code blocks, and reST double-backtick literals and roles such as :class:`~a.B` become Markdown code spans.
The output depends only on the code, so ``tests/test_docs.py`` checks that docs/api.md is current.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "docs" / "api.md"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One documented object.

    Attributes:
        name: dotted import path (``module.attr.attr``).
        members: for classes, also document their own public methods and properties.
        signature: show the call signature (off for configs, whose ``__init__`` is TrainingArguments').
        first_paragraph: only the first paragraph of the docstring (kernels).
    """

    name: str
    members: bool = False
    signature: bool = True
    first_paragraph: bool = False


def _kernel_entries() -> list[Entry]:
    import engine_kernels.api

    return [Entry(f"engine_kernels.api.{name}", first_paragraph=True) for name in sorted(engine_kernels.api.__all__)]


def _error_entries() -> list[Entry]:
    import engine.errors

    names = sorted(engine.errors.__all__, key=lambda n: (n != "EngineError", n))
    return [Entry(f"engine.errors.{name}", signature=False) for name in names]


#: (title, introduction, entries or a function returning them). Order is the page's order.
SECTIONS: list[tuple[str, str, object]] = [
    (
        "Loading and LoRA",
        "`engine.FastModel` (also importable as `engine.FastLanguageModel`) loads models and adds adapters.",
        [
            Entry("engine.FastModel", members=True, signature=False),
            Entry("engine.disable_adapter"),
            Entry("engine.assets.smollm2_gguf_path"),
        ],
    ),
    (
        "The model",
        (
            "`FastModel.from_pretrained` returns a `CausalLM` (`engine.models.transformer`, a `torch.nn.Module`). "
            "The methods users call:"
        ),
        [
            Entry("engine.models.transformer.CausalLM.forward"),
            Entry("engine.models.transformer.CausalLM.generate"),
            Entry("engine.models.generation.generate"),
            Entry("engine.models.transformer.CausalLM.token_log_probs"),
            Entry("engine.models.transformer.CausalLM.save_pretrained"),
            Entry("engine.saving.save_pretrained"),
            Entry("engine.models.transformer.CausalLM.save_pretrained_merged"),
            Entry("engine.saving.save_pretrained_merged"),
            Entry("engine.models.transformer.CausalLM.save_pretrained_gguf"),
            Entry("engine.gguf.writer.save_pretrained_gguf"),
        ],
    ),
    (
        "Trainers",
        "Both are `transformers.Trainer` subclasses; arguments not listed go to `transformers.Trainer`.",
        [
            Entry("engine.SFTTrainer"),
            Entry("engine.DPOTrainer"),
            Entry("engine.KTOTrainer"),
            Entry("engine.ORPOTrainer"),
            Entry("engine.training.base.EngineTrainer.training_summary"),
            Entry("engine.training.reporting.ReportSummary", members=True, signature=False),
        ],
    ),
    (
        "Training configs",
        (
            "Both extend `transformers.TrainingArguments`: every Trainer argument is accepted. The tables list the "
            "fields each config adds or whose default it changes."
        ),
        [
            Entry("engine.SFTConfig", signature=False),
            Entry("engine.DPOConfig", signature=False),
            Entry("engine.KTOConfig", signature=False),
            Entry("engine.ORPOConfig", signature=False),
        ],
    ),
    (
        "Data helpers",
        "",
        [Entry("engine.train_on_responses_only"), Entry("engine.training.preference_data.to_conversational_preference")],
    ),
    (
        "Chat templates",
        "See [chat templates](chat_templates.md). `engine.chat_templates.CHAT_TEMPLATES` maps each name to its declaration.",
        [
            Entry("engine.get_chat_template"),
            Entry("engine.chat_templates.ChatTemplate", signature=False),
            Entry("engine.chat_templates.chat_template_for"),
            Entry("engine.chat_templates.detect_chat_template"),
            Entry("engine.chat_templates.resize_token_embeddings"),
            Entry("engine.chat_templates.without_generation_markers"),
        ],
    ),
    (
        "Memory planning",
        "See [memory](memory.md).",
        [Entry("engine.estimate_memory"), Entry("engine.max_context"), Entry("engine.memory.MemoryEstimate", members=True)],
    ),
    ("Errors", "Every error the engine raises on purpose derives from `EngineError`.", _error_entries),
    (
        "Kernels",
        (
            "The public ops of `kernels/`, imported as `engine_kernels` (`engine_kernels.api.__all__`): signature and "
            "first paragraph of each docstring. See [kernels](kernels.md) for what each op saves and how the implementation is chosen."
        ),
        _kernel_entries,
    ),
]


# ---------------------------------------------------------------------------------------------- import
def resolve(name: str):
    """The object a dotted name refers to: attributes from the top-level package down, importing a
    submodule where a module has no such attribute (so ``engine_kernels.api.rope`` is the function the module
    exports, not the module of the same name).

    Raises:
        ImportError, AttributeError: the name does not exist.
    """
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, attr)
        except AttributeError as missing:
            if not inspect.ismodule(obj):
                raise
            path = ".".join(parts[:i])
            try:
                obj = importlib.import_module(path)
            except ModuleNotFoundError as err:
                if err.name != path:
                    raise
                raise missing from None
    return obj


# ---------------------------------------------------------------------------------------------- docstrings
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|mod|obj|exc|const):`~?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Attributes|Returns|Return|Yields|Raises|Example|Examples|Note|Notes|Warning|Warnings|See Also):\s*$")
_ITEM_SECTIONS = {"Args", "Arguments", "Parameters", "Attributes", "Raises"}
_CODE_SECTIONS = {"Example", "Examples"}
_ITEM = re.compile(r"^[A-Za-z_*][\w.*]*(\s*[,/]\s*[A-Za-z_*][\w.*]*)*(\s*\([^)]*\))?:(\s|$)")


def inline(text: str) -> str:
    """reST roles and ``literals`` as Markdown code spans."""

    def role(m: re.Match) -> str:
        target = m.group(1)
        whole = m.group(0)
        shown = target.rsplit(".", 1)[-1] if ":`~" in whole else target
        return f"``{shown}``"

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: "`" + m.group(1) + "`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fence(lines: list[str]) -> list[str]:
    body = inspect.cleandoc("\n".join(lines)).splitlines()
    try:
        ast.parse("\n".join(body))
        lang = "python"
    except SyntaxError:
        lang = "text"
    return [f"```{lang}", *body, "```"]


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines from ``start`` indented deeper than ``base`` (blank lines included), and the next index."""
    out, i = [], start
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        out.append(lines[i])
        i += 1
    while out and not out[-1].strip():
        out.pop()
        i -= 1
    return out, i


def _section(kind: str, lines: list[str]) -> list[str]:
    """The body of a Google-style section as Markdown."""
    if kind in _CODE_SECTIONS:
        return _fence(lines)
    body = inspect.cleandoc("\n".join(lines)).splitlines()
    if kind not in _ITEM_SECTIONS:
        return [inline(" ".join(line.strip() for line in body if line.strip()))]
    items: list[str] = []
    for line in body:
        if not line.strip():
            continue
        if _indent(line) == 0 and (_ITEM.match(line) or not items):
            items.append(line.strip())
        else:
            items[-1] += " " + line.strip()
    return [f"* {inline(item)}" for item in items]


def render_docstring(doc: str | None) -> str:
    """A cleaned docstring as Markdown (see the module docstring)."""
    if not doc:
        return "*(no docstring)*"
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        section = _SECTION.match(line) if _indent(line) == 0 else None
        if section:
            body, i = _block(lines, i + 1, 0)
            out += ["", f"**{section.group(1)}:**", ""]
            out += _section(section.group(1), body)
            out.append("")
            continue
        if line.rstrip().endswith("::"):
            base = _indent(line)
            body, j = _block(lines, i + 1, base)
            if body:
                text = line.rstrip()[:-2].rstrip()
                if text.strip():
                    out.append(inline(text + ":"))
                out += ["", *_fence(body), ""]
                i = j
                continue
        out.append(inline(line))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def first_paragraph(doc: str | None) -> str:
    if not doc:
        return "*(no docstring)*"
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return inline(" ".join(line.strip() for line in paragraph.splitlines()))


# ---------------------------------------------------------------------------------------------- signatures
def _default(value) -> str:
    text = repr(value)
    return "..." if " at 0x" in text else text


def _annotation(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def signature(obj, name: str) -> str:
    """``name(arg: type = default, ...) -> ret`` with annotations as written in the source."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls") and not inspect.isclass(obj):
        params = params[1:]
    parts: list[str] = []
    seen_kw_only = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not seen_kw_only:
            parts.append("*")
            seen_kw_only = True
        if p.kind is p.VAR_POSITIONAL:
            seen_kw_only = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (p is params[-1] or params[params.index(p) + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = ""
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        ret = f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{name}({', '.join(parts)}){ret}"
    if len(one_line) <= 100:
        return one_line
    return f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){ret}"


# ---------------------------------------------------------------------------------------------- objects
def _short(name: str) -> str:
    """``engine.models.transformer.CausalLM.forward`` -> ``CausalLM.forward``; functions keep their module."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part[:1].isupper():
            return ".".join(parts[i:])
    return name


def _code(text: str, lang: str = "python") -> list[str]:
    return [f"```{lang}", text, "```"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fields_table(cls) -> tuple[list[str], bool]:
    """The dataclass fields declared in ``cls``'s own body as a table (name, type, default and, when any
    field has one, help), and whether any field has help."""
    own = set(inspect.get_annotations(cls))
    rows = []
    for f in dataclasses.fields(cls):
        if f.name not in own or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{_default(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{_default(f.default_factory())}`"
        else:
            default = "required"
        rows.append([f"`{f.name}`", f"`{_annotation(f.type)}`", default, inline(f.metadata.get("help", ""))])
    any_help = any(row[3] for row in rows)
    header = ["field", "type", "default", "help"] if any_help else ["field", "type", "default"]
    table = [header, ["---"] * len(header)] + [row[: len(header)] for row in rows]
    return ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in table], any_help


def _own_members(cls) -> list[tuple[str, object]]:
    """Public functions, static/class methods and properties with a docstring defined in ``cls`` itself,
    in source order."""
    out = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if (inspect.isfunction(value) or isinstance(value, property)) and value.__doc__:
            out.append((attr, value))
    return out


def _callable_block(obj, title: str, level: int, entry: Entry) -> list[str]:
    out = [f"{'#' * level} `{title}`", ""]
    if isinstance(obj, property):
        out += _code(f"{title}  # property")
        doc = obj.__doc__
    else:
        if entry.signature:
            out += _code(signature(obj, title))
        doc = inspect.getdoc(obj)
    out += ["", first_paragraph(doc) if entry.first_paragraph else render_docstring(doc), ""]
    return out


def render_entry(entry: Entry, obj) -> list[str]:
    title = _short(entry.name)
    if not inspect.isclass(obj):
        return _callable_block(obj, title, 3, entry)
    out = [f"### `{title}`", ""]
    if entry.signature:
        out += _code(signature(obj, title)) + [""]
    bases = [b for b in obj.__bases__ if b is not object]
    if bases:
        out += ["Bases: " + ", ".join(f"`{b.__module__}.{b.__qualname__}`" for b in bases), ""]
    doc = inspect.getdoc(obj) if obj.__doc__ else None
    out += [first_paragraph(doc) if entry.first_paragraph else render_docstring(doc), ""]
    documented = bool(re.search(r"^Attributes:", doc or "", re.MULTILINE))
    if dataclasses.is_dataclass(obj) and not entry.first_paragraph:
        table, any_help = _fields_table(obj)
        if any_help or not documented:
            out += table + [""]
    if entry.members:
        for attr, member in _own_members(obj):
            out += _callable_block(member, f"{title}.{attr}", 4, entry)
    return out


def _slug(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render(warn=None) -> str:
    """The whole page. ``warn(message)`` is called for every name that does not import."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    body: list[str] = []
    toc: list[str] = []
    for title, intro, entries in SECTIONS:
        entries = entries() if callable(entries) else entries
        blocks: list[str] = []
        for entry in entries:
            try:
                obj = resolve(entry.name)
            except (ImportError, AttributeError) as err:
                warn(f"gen_api: warning: {entry.name} does not import ({type(err).__name__}: {err}); left out")
                continue
            blocks += render_entry(entry, obj)
        if not blocks:
            warn(f"gen_api: warning: section {title!r} has nothing to document; left out")
            continue
        toc.append(f"* [{title}](#{_slug(title)})")
        body += [f"## {title}", ""]
        if intro:
            body += [intro, ""]
        body += blocks
    header = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit. Regenerate: python docs/gen_api.py -->",
        "",
        (
            "Generated from the docstrings by `python docs/gen_api.py`; `tests/test_docs.py` fails when this page "
            "is out of date. For a walkthrough see [getting started](getting-started.md)."
        ),
        "",
        *toc,
        "",
    ]
    text = "\n".join(header + body)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    output.write_text(render(), encoding="utf-8")
    print(f"gen_api: wrote {output}", file=sys.stderr)
    return output


if __name__ == "__main__":
    main()
