"""Builds the provider (the "sandbox client") for a backend name from settings, once per worker process.

Every backend of the descriptor table that this build can run has a module
``providers/<module>.py`` with a module-level ``build_provider(settings) -> Provider`` that reads
the backend's own settings (``SANDBOX_<BACKEND>_*``) from the environment. Modules are imported
lazily, so a worker that only runs local boxes never imports a cloud SDK.

Invariant (checked on every build, as upstream asserts at import): the client's ``backend_id``
equals its descriptor's ``backend_id`` (``unix_local`` for ``local``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Final

from sandbox.box import Provider
from sandbox.errors import SandboxConfigError, UnknownBackend, Unsupported
from sandbox.settings import Settings

__all__ = [
    "PROVIDER_MODULES",
    "RUNNABLE_BACKENDS",
    "ProviderRegistry",
    "create_sandbox_client",
    "create_sandbox_client_for_backend",
]

PROVIDER_MODULES: Final[Mapping[str, str]] = {
    "local": "providers.local",
    "none": "providers.none",
    "selfhosted": "providers.selfhosted",
    "modal": "providers.modal",
    "docker": "providers.docker",
    "e2b": "providers.e2b",
    "daytona": "providers.daytona",
    "runloop": "providers.runloop",
    "blaxel": "providers.blaxel",
    "vercel": "providers.vercel",
    "cloudflare": "providers.cloudflare",
}
"""Backend → the module whose ``build_provider(settings)`` builds its client."""

RUNNABLE_BACKENDS: Final[tuple[str, ...]] = tuple(PROVIDER_MODULES)
"""Backends this build can run boxes on (the descriptor table also knows ``opensandbox``)."""


def create_sandbox_client_for_backend(backend: str, settings: Settings) -> Provider:
    """Build the provider for ``backend`` and validate its settings offline.

    Raises:
        UnknownBackend: no descriptor knows this name.
        Unsupported: the backend is known but this build has no provider for it.
        SandboxConfigError: the backend's settings are missing or malformed (the message names
            the setting), or the client's backend id contradicts its descriptor.
    """
    from sandbox.descriptors import SANDBOX_BACKENDS, select_backend

    if backend not in SANDBOX_BACKENDS:
        raise UnknownBackend(backend, list(SANDBOX_BACKENDS))
    module_name = PROVIDER_MODULES.get(backend)
    if module_name is None:
        raise Unsupported(
            f"backend {backend!r} is known but has no provider in this build; "
            f"use one of: {', '.join(RUNNABLE_BACKENDS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        # Most likely the backend's SDK is not installed in this environment.
        raise Unsupported(f"the {backend} provider cannot be loaded here: {err}") from err
    provider: Provider = module.build_provider(settings)
    expected = select_backend(backend).backend_id
    if provider.backend_id != expected:
        raise SandboxConfigError(
            f"[sandbox:{backend}] the client's backend id {provider.backend_id!r} is not the descriptor's {expected!r}"
        )
    provider.validate_credentials()
    return provider


def create_sandbox_client(settings: Settings) -> Provider:
    """Build the provider for the configured default backend (``SANDBOX_DEFAULT_BACKEND``)."""
    return create_sandbox_client_for_backend(settings.default_backend, settings)


class ProviderRegistry:
    """Lazily constructs and caches one provider instance per backend.

    Args:
        settings: The runtime settings.
        providers: Ready-made providers by backend name, used instead of building them (a
            worker pointed at a fake service in tests, or an embedding application's own).
    """

    def __init__(self, settings: Settings, providers: Mapping[str, Provider] | None = None) -> None:
        self._settings = settings
        self._providers: dict[str, Provider] = dict(providers or {})

    def get(self, backend: str) -> Provider:
        """The provider for ``backend``.

        Raises:
            UnknownBackend: no descriptor knows this name.
            Unsupported: the backend is known but this build has no provider for it.
            SandboxConfigError: the backend's settings are missing or malformed.
        """
        provider = self._providers.get(backend)
        if provider is None:
            provider = create_sandbox_client_for_backend(backend, self._settings)
            self._providers[backend] = provider
        return provider

    async def aclose(self) -> None:
        """Release what providers hold for the worker's lifetime (e.g. the local boxes' namespace holders)."""
        for provider in self._providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()
        self._providers.clear()
