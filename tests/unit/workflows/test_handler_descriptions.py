"""Every update, signal and query of every workflow has a description the Web UI shows, in plain text."""

from __future__ import annotations

import pytest
from temporalio.workflow import _Definition

from worker import WORKFLOWS


def _handlers() -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for cls in WORKFLOWS:
        defn = _Definition.from_class(cls)
        assert defn is not None
        for kind, table in (("update", defn.updates), ("signal", defn.signals), ("query", defn.queries)):
            for name, handler in table.items():
                if name is None or name.startswith("__"):  # dynamic handlers, the SDK's own queries
                    continue
                out.append((f"{cls.__name__}.{kind}.{name}", name, handler.description))
    return out


def test_the_lease_has_handlers_to_describe() -> None:
    names = {name for _, name, _ in _handlers()}
    assert {"acquire", "exec", "drain", "hold", "describe"} <= names  # the scan sees them


@pytest.mark.parametrize(("where", "name", "description"), _handlers(), ids=[h[0] for h in _handlers()])
def test_each_handler_is_described_in_plain_text(where: str, name: str, description: str | None) -> None:
    assert description, f"{where} has no description (set description= on its decorator)"
    assert "``" not in description and len(description) <= 120, description
