"""The check both hostile-data fuzz tests make of one prepared batch of rows."""

from __future__ import annotations

import re
from typing import Callable

import pytest

from engine.errors import DatasetError, EngineError


def prepared_or_checked_error(prepare: Callable[[], object], position: int, outcome: str, expected, what: str):
    """Run ``prepare()`` on rows whose malformed one is at ``position`` and check its documented outcome.

    ``outcome == "error"``: a :class:`DatasetError` whose message starts with ``example <position>`` and matches
    ``expected`` (a regex); returns None. ``outcome == "ok"``: no error; returns what ``prepare`` returned.
    Any other engine error fails the test.
    """
    try:
        out = prepare()
    except DatasetError as exc:
        message = str(exc)
        assert outcome == "error", f"{what}: expected {outcome}, got DatasetError: {message}"
        found = re.match(r"example (\d+)", message)
        assert found, f"{what}: the error does not start by naming the example: {message}"
        assert int(found.group(1)) == position, f"{what}: the malformed row is example {position}: {message}"
        assert re.search(expected, message), f"{what}: {message!r} does not match {expected!r}"
        return None
    except EngineError as exc:
        pytest.fail(f"{what}: {type(exc).__name__} instead of DatasetError: {exc}")
    assert outcome == "ok", f"{what}: expected an error matching {expected!r}, got {len(out)} rows"
    return out
