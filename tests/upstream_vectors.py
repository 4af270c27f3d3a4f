"""The upstream conformance vectors (``shared/reference/upstream-vectors``): where they are, and loading them.

Missing vectors fail the tests that need them, never skip them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

VECTORS_ENV = "SANDBOX_VECTORS_DIR"


def vectors_dir() -> Path:
    """The upstream vector folder: $SANDBOX_VECTORS_DIR, else shared/reference next to the repo."""
    override = os.environ.get(VECTORS_ENV)
    if override:
        return Path(override)
    return REPO.parent / "shared/reference/upstream-vectors"


def load_vectors(name: str) -> list[dict[str, Any]]:
    """Every vector of one file; fails the calling test (never skips) when the file is missing."""
    path = vectors_dir() / name
    if not path.is_file():
        pytest.fail(
            f"upstream conformance vectors missing: {path} does not exist. These tests must not be skipped; "
            f"point {VECTORS_ENV} at the folder holding {name} (shared/reference/upstream-vectors)."
        )
    with path.open(encoding="utf-8") as fh:
        data: list[dict[str, Any]] = json.load(fh)
    return data


_MISSING = object()


def decode(value: Any) -> Any:
    """Vector markers → Python values: ``$date`` → aware datetime, ``$undefined`` → a sentinel."""
    if isinstance(value, dict):
        if "$date" in value:
            raw = value["$date"]
            return None if raw is None else datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if value.get("$undefined") is True:
            return _MISSING
        assert not any(key.startswith("$") for key in value), f"unhandled vector marker in {value}"
        return {key: decode(item) for key, item in value.items() if decode(item) is not _MISSING}
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def decode_args(args: list[Any]) -> list[Any]:
    """Decoded positional arguments, dropping trailing ``$undefined`` ones (absent in JS)."""
    out = [decode(a) for a in args]
    while out and out[-1] is _MISSING:
        out.pop()
    return out


def vector_params(name: str, fn: str) -> list[Any]:
    """pytest params for the vectors of ``fn`` in ``name``; one failing param when the file is missing."""
    path = vectors_dir() / name
    if not path.is_file():
        return [pytest.param(None, id=f"{name}-missing")]
    return [pytest.param(v, id=v["note"]) for v in load_vectors(name) if v["fn"] == fn]
