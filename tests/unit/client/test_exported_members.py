"""``client``'s ``__all__`` is exactly what it exports (as httpx pins its own): nothing public slips in or out."""

from __future__ import annotations

from types import ModuleType

import client


def test_all_names_exactly_the_public_members_sorted() -> None:
    exported = sorted(
        name
        for name, value in vars(client).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)  # submodules are reachable, not exported
    )
    assert client.__all__ == exported


def test_every_exported_name_resolves() -> None:
    for name in client.__all__:
        assert getattr(client, name) is not None, name


def test_every_exported_exception_is_a_sandbox_error() -> None:
    exceptions = [
        value
        for value in (getattr(client, name) for name in client.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert client.StaleEpoch in exceptions and client.TemporalUnreachable in exceptions
    assert all(issubclass(cls, client.SandboxError) for cls in exceptions)
