"""The versions of the libraries the comparisons and oracles run against, and whether they are in the tested ranges.

The tested ranges live in one place, ``pyproject.toml`` (the comment above its dependency list says why each
range stops where it does). They are read back here from the installed distribution's metadata
(``importlib.metadata.requires("llm-finetune-engine")``), so there is no second list to keep in step; after
editing ``pyproject.toml``, reinstall (``make setup``, or ``pip install --no-deps -e .``) to refresh it.

``python benchmarks/versions.py`` prints the installed versions and any version outside its range.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

#: Distribution name of the engine (``[project] name`` in ``pyproject.toml``).
ENGINE_DISTRIBUTION = "llm-finetune-engine"

#: The distributions :func:`tested_versions` reports: the engine and what its results depend on.
TESTED_DISTRIBUTIONS = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "llama-cpp-python",  # imported as llama_cpp
    ENGINE_DISTRIBUTION,
)

#: The optional extra whose requirements count as declared ranges besides the base dependencies.
TEST_EXTRA = "test"


def _normalize(name: str) -> str:
    """PEP 503 normalized distribution name (``llama_cpp_python`` -> ``llama-cpp-python``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tested_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`TESTED_DISTRIBUTIONS` (``None`` when it is not installed).

    Keys are distribution names: ``"llama-cpp-python"`` for ``llama_cpp`` and ``"llm-finetune-engine"`` for the
    engine itself.
    """
    return {name: _installed(name) for name in TESTED_DISTRIBUTIONS}


# ---------------------------------------------------------------------------------------------- requirements


def _parse_with_packaging(line: str, extras: tuple[str, ...]):
    from packaging.requirements import Requirement

    req = Requirement(line)
    if req.marker is not None and not any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras)):
        return None
    return _normalize(req.name), str(req.specifier)


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(?:;\s*(.*))?$")


def _parse_without_packaging(line: str, extras: tuple[str, ...]):
    """A small fallback for ``name>=a,<b; marker`` lines: markers other than ``extra`` and ``sys_platform`` pass."""
    match = _REQUIREMENT.match(line)
    if match is None:
        return None
    name, spec, marker = match.groups()
    if marker:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra and _normalize(extra.group(1)) not in {_normalize(e) for e in extras}:
            return None
        platform = re.search(r"""sys_platform\s*==\s*["']([^"']+)["']""", marker)
        if platform and platform.group(1) != sys.platform:
            return None
    return _normalize(name), ",".join(part.strip() for part in spec.split(",") if part.strip())


def declared_ranges(extras: tuple[str, ...] = (TEST_EXTRA,)) -> dict[str, str]:
    """``{distribution: specifier}`` that the installed engine declares for this platform (base + ``extras``).

    A distribution named twice (base and an extra) gets both specifiers, comma-joined (an intersection).
    Raises ``importlib.metadata.PackageNotFoundError`` when the engine is not installed.
    """
    lines = metadata.requires(ENGINE_DISTRIBUTION) or []
    try:
        import packaging.requirements  # noqa: F401

        parse = _parse_with_packaging
    except ImportError:  # packaging is not a declared dependency (transformers brings it); fall back
        parse = _parse_without_packaging
    ranges: dict[str, str] = {}
    for line in lines:
        parsed = parse(line, extras)
        if parsed is None:
            continue
        name, spec = parsed
        ranges[name] = ",".join(s for s in (ranges.get(name), spec) if s)
    return ranges


def _release(version: str) -> tuple[int, ...]:
    """Numeric release segment of a version (``2.13.0+cpu`` -> ``(2, 13, 0)``), for the fallback only."""
    numbers = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(n) for n in numbers.group(1).split(".")) if numbers else ()


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def _contains_without_packaging(spec: str, version: str) -> bool:
    ops = {
        ">=": lambda c: c >= 0, "<=": lambda c: c <= 0, ">": lambda c: c > 0, "<": lambda c: c < 0,
        "==": lambda c: c == 0, "!=": lambda c: c != 0, "~=": lambda c: c >= 0,
    }
    installed = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.match(r"^(>=|<=|==|!=|~=|<|>)\s*(.+)$", clause)
        if match is None:
            continue
        op, bound = match.groups()
        if op == "==" and bound.endswith(".*"):
            prefix = _release(bound[:-2])
            if installed[: len(prefix)] != prefix:
                return False
            continue
        if not ops[op](_compare(installed, _release(bound))):
            return False
        if op == "~=":  # compatible release: same prefix up to the last given component
            prefix = _release(bound)[:-1]
            if installed[: len(prefix)] != prefix:
                return False
    return True


def in_range(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies the specifier ``spec`` (pre-releases and local builds such as ``+cpu`` count)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _contains_without_packaging(spec, version)
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return _contains_without_packaging(spec, version)


def check_tested_ranges(*, missing_is_error: bool = False) -> list[str]:
    """One warning line per tested distribution whose installed version is outside the range ``pyproject.toml``
    declares (base dependencies and the ``test`` extra); an empty list when all are inside.

    Distributions that are not installed are skipped unless ``missing_is_error``; ones the engine declares no
    range for (the engine itself) are never checked.
    """
    try:
        ranges = declared_ranges()
    except metadata.PackageNotFoundError:
        return [f"{ENGINE_DISTRIBUTION} is not installed, so its declared ranges cannot be read (pip install -e .)"]
    warnings = []
    for name, version in tested_versions().items():
        spec = ranges.get(_normalize(name))
        if spec is None or spec == "":
            continue
        if version is None:
            if missing_is_error:
                warnings.append(f"{name} is not installed (tested range {spec})")
            continue
        if not in_range(version, spec):
            warnings.append(f"{name} {version} is outside the tested range {spec} declared in pyproject.toml")
    return warnings


def main() -> int:
    for name, version in tested_versions().items():
        print(f"{name:20s} {version or 'not installed'}")
    problems = check_tested_ranges()
    for line in problems:
        print(f"warning: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
