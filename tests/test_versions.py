"""The oracles and baselines are installed inside the ranges pyproject.toml declares for them.

This fails on purpose when someone upgrades transformers, PEFT, TRL, bitsandbytes or llama-cpp-python past
the tested range: run the whole suite on the new version, then widen the range in pyproject.toml.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from benchmarks import versions as v  # a module alias: pytest would collect a bare `tested_versions` as a test
from benchmarks.versions import ENGINE_DISTRIBUTION, declared_ranges, in_range

REPO = Path(__file__).resolve().parents[1]

#: The libraries the comparisons and oracles encode; each must have a declared upper bound.
ORACLES = ("transformers", "peft", "trl", "bitsandbytes", "llama-cpp-python")


def _pyproject_requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def test_tested_versions_names_each_library():
    versions = v.tested_versions()
    assert set(versions) == {
        "torch", "triton", "transformers", "peft", "trl", "bitsandbytes", "llama-cpp-python", ENGINE_DISTRIBUTION,
    }
    assert all(v is None or isinstance(v, str) for v in versions.values())
    assert versions["torch"] is not None and versions[ENGINE_DISTRIBUTION] is not None


def test_installed_metadata_is_current_with_pyproject():
    """The ranges are read from the installed metadata; a stale editable install would check old ranges."""
    from packaging.requirements import Requirement

    installed = [Requirement(line) for line in metadata.requires(ENGINE_DISTRIBUTION) or []]
    for line in _pyproject_requirements():
        req = Requirement(line)
        # compared by name and specifier: the metadata adds `extra == "test"` to the test extra's markers
        assert any(i.name == req.name and i.specifier == req.specifier for i in installed), (
            f"{line!r} from pyproject.toml is not in the installed metadata: reinstall (make setup, "
            "or pip install --no-deps -e .)"
        )


def test_every_oracle_has_a_bounded_range_and_is_installed_inside_it():
    ranges = declared_ranges()
    versions = v.tested_versions()
    for name in ORACLES:
        assert name in ranges, f"pyproject.toml declares no range for {name}"
        assert "<" in ranges[name], f"{name}: the tested range needs an upper bound ({ranges[name]})"
        assert versions[name] is not None, f"{name} is not installed (pip install -e '.[test]')"
        assert in_range(versions[name], ranges[name]), (
            f"{name} {versions[name]} is outside the tested range {ranges[name]}"
        )
    assert v.check_tested_ranges(missing_is_error=True) == []


def test_range_check_logic():
    assert in_range("2.13.0+cpu", ">=2.5")
    assert in_range("1.16.0", ">=1.16.0,<1.17")
    assert not in_range("1.17.0", ">=1.16.0,<1.17")
    assert not in_range("5.23.0", ">=5.24.0,<5.25")
    # the fallback used when packaging is missing agrees on these
    for version, spec in [("2.13.0+cpu", ">=2.5"), ("1.16.0", ">=1.16.0,<1.17"), ("1.17.0", ">=1.16.0,<1.17"),
                          ("0.3.37", ">=0.3.36,<0.3.37"), ("0.3.36", "==0.3.*"), ("1.4.2", "~=1.4")]:
        assert v._contains_without_packaging(spec, version) == in_range(version, spec), (version, spec)
    assert v._parse_without_packaging('llama-cpp-python<0.3.37,>=0.3.36; extra == "test"', ("test",)) == (
        "llama-cpp-python", "<0.3.37,>=0.3.36")
    assert v._parse_without_packaging('bitsandbytes>=0.50.2; extra == "other"', ("test",)) is None


def test_check_reports_each_version_outside_its_range(monkeypatch):
    installed = {**v.tested_versions(), "trl": "1.17.0", "transformers": "5.23.0", "bitsandbytes": None}
    monkeypatch.setattr(v, "tested_versions", lambda: installed)
    lines = v.check_tested_ranges()
    assert len(lines) == 2 and lines[0].startswith("transformers 5.23.0 ") and lines[1].startswith("trl 1.17.0 ")
    assert v.check_tested_ranges(missing_is_error=True)[-1].startswith("bitsandbytes is not installed")
