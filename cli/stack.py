"""``sandboxctl up``: the embedded stack (placeholder until implemented)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach ``up`` to the root app."""
