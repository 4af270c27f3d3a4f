"""``sandboxctl lease ...`` and ``sandboxctl exec`` (filled in by the lease CLI work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the lease commands to the root app."""
