"""``sandboxctl providers list|check``: which backends this build runs, and whether one is configured.

``list`` prints every backend of the descriptor table with what it offers (tier, snapshot kind,
port exposure, workspace root, hard lifetime), whether this build has its provider, and whether
its settings validate. ``check BACKEND`` builds that backend's client exactly as the worker would
and validates its settings and credentials offline (no network call); a missing setting is named
in the message. Both take ``--json``; ``check`` exits 2 when the backend is not usable.
"""

from __future__ import annotations

from typing import Any

import typer

from cli.output import emit, fail
from sandbox.errors import SandboxError
from sandbox.settings import Settings

providers_app = typer.Typer(help="List the sandbox backends and check their settings.", no_args_is_help=True)

Json = typer.Option(False, "--json", help="Print one JSON document (for scripts).")

EXIT_NOT_USABLE = 2


def register(app: typer.Typer) -> None:
    """Attach ``providers`` to the root app."""
    app.add_typer(providers_app, name="providers")


def _check(backend: str, settings: Settings) -> tuple[bool, str, dict[str, str] | None]:
    """Whether ``backend``'s client builds and validates offline, why not, and what isolation it enforces."""
    from providers.registry import create_sandbox_client_for_backend

    try:
        provider = create_sandbox_client_for_backend(backend, settings)
        report = getattr(provider, "isolation_report", None)
        isolation = report() if callable(report) else None
    except SandboxError as err:
        return False, err.message, None
    return True, "settings valid", isolation


def _row(backend: str, settings: Settings) -> dict[str, Any]:
    from providers.registry import PROVIDER_MODULES
    from sandbox.descriptors import select_backend

    d = select_backend(backend)
    runnable = backend in PROVIDER_MODULES
    ok, detail, isolation = _check(backend, settings) if runnable else (False, "no provider in this build", None)
    hard_ms = d.lifetime.hard_lifetime_ms
    return {
        "backend": backend,
        "backend_id": d.backend_id,
        "tier": d.tier,
        "runnable": runnable,
        "configured": ok,
        "detail": detail,
        "snapshot": d.snapshot.kind,
        "ports": d.port_exposure.kind,
        "workspace_root": d.workspace_root,
        "hard_lifetime_hours": None if hard_ms is None else round(hard_ms / 3_600_000, 2),
        "default": backend == settings.default_backend,
        "isolation": isolation,
    }


@providers_app.command("list")
def list_providers(json_mode: bool = Json) -> None:
    """Every backend, what it offers, and whether its settings validate here."""
    from sandbox.descriptors import SANDBOX_BACKENDS

    settings = Settings()
    rows = [_row(backend, settings) for backend in SANDBOX_BACKENDS]
    if json_mode:
        emit(rows, True)
        return
    brief = [
        {
            "backend": r["backend"] + (" (default)" if r["default"] else ""),
            "tier": r["tier"],
            "snapshot": r["snapshot"],
            "ports": r["ports"],
            "status": "ok" if r["configured"] else ("not configured" if r["runnable"] else "not in this build"),
        }
        for r in rows
    ]
    emit(brief, False)
    for r in rows:
        if r["runnable"] and not r["configured"]:
            print(f"  {r['backend']}: {r['detail']}")


@providers_app.command("check")
def check(backend: str = typer.Argument(..., help="Backend name, e.g. modal."), json_mode: bool = Json) -> None:
    """Build BACKEND's client as the worker would and validate its settings offline."""
    from sandbox.descriptors import SANDBOX_BACKENDS

    if backend not in SANDBOX_BACKENDS:
        fail(f"unknown backend {backend!r}; known: {', '.join(SANDBOX_BACKENDS)}", EXIT_NOT_USABLE)
    settings = Settings()
    row = _row(backend, settings)
    if json_mode:
        emit(row, True)
        if not row["configured"]:
            raise typer.Exit(EXIT_NOT_USABLE)
        return
    if not row["configured"]:
        fail(f"{backend}: {row['detail']}", EXIT_NOT_USABLE)
    emit(f"{backend}: ok ({row['detail']}; snapshot {row['snapshot']}, ports {row['ports']})", False)
    for feature, enforced in (row["isolation"] or {}).items():
        print(f"  {feature}: {enforced}")
