"""Builds the provider (the "sandbox client") for a backend name from settings, once per worker process.

Every backend of the descriptor table that this build can run has a module
``providers/<module>.py`` with a module-level ``build_provider(settings) -> Provider`` that reads
the backend's own settings (``SANDBOX_<BACKEND>_*``) from the environment. Modules are imported
lazily, so a worker that only runs local boxes never imports a cloud SDK.

The cloud and container SDKs are extras of the distribution (``pip install
'sandbox-runtime[e2b]'``, ``[all]`` for every one): :data:`BACKEND_EXTRAS` names the extra of each
backend and the modules it must bring. Selecting a backend whose SDK is missing is a
:class:`~sandbox.errors.SandboxConfigError` that says which extra to install.

Invariant (checked on every build, as upstream asserts at import): the client's ``backend_id``
equals its descriptor's ``backend_id`` (``unix_local`` for ``local``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sandbox.box import Provider
from sandbox.errors import SandboxConfigError, UnknownBackend, Unsupported
from sandbox.settings import Settings

__all__ = [
    "BACKEND_EXTRAS",
    "DISTRIBUTION",
    "PROVIDER_MODULES",
    "BackendExtra",
    "RUNNABLE_BACKENDS",
    "ProviderRegistry",
    "create_sandbox_client",
    "create_sandbox_client_for_backend",
    "require_backend_sdk",
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

DISTRIBUTION: Final = "sandbox-runtime"
"""The distribution name in ``pyproject.toml``, as a user types it to ``pip install``."""


@dataclass(frozen=True)
class BackendExtra:
    """The optional dependencies (a ``pyproject.toml`` extra) a backend's adapter imports.

    Attributes:
        extra: The extra's name: ``pip install 'sandbox-runtime[<extra>]'``.
        modules: The top-level modules the extra brings and the adapter imports.
    """

    extra: str
    modules: tuple[str, ...]

    @property
    def install_command(self) -> str:
        """The command that installs the extra."""
        return f"pip install '{DISTRIBUTION}[{self.extra}]'"


BACKEND_EXTRAS: Final[Mapping[str, BackendExtra]] = {
    "docker": BackendExtra("docker", ("docker", "requests")),
    "e2b": BackendExtra("e2b", ("e2b", "httpx")),
    "daytona": BackendExtra("daytona", ("daytona", "daytona_api_client_async", "daytona_toolbox_api_client_async")),
    "runloop": BackendExtra("runloop", ("runloop_api_client", "httpx")),
    "blaxel": BackendExtra("blaxel", ("blaxel", "httpx")),
    "vercel": BackendExtra("vercel", ("vercel", "httpx", "httpx2", "anyio")),
    "cloudflare": BackendExtra("cloudflare", ("httpx",)),
}
"""Backend → its extra; a backend not listed (local, none, selfhosted, modal) needs only the core dependencies."""


def require_backend_sdk(backend: str) -> None:
    """Check that the SDK modules of ``backend``'s extra are installed, or say which extra to install.

    Only looked up, not imported: importing some SDKs has side effects (blaxel's autoload), which
    the adapters defer to their first call.

    Raises:
        SandboxConfigError: a module of the backend's extra is not installed (the message names
            the ``pip install`` command and the missing module).
    """
    needed = BACKEND_EXTRAS.get(backend)
    if needed is None:
        return
    for module in needed.modules:
        try:
            found = importlib.util.find_spec(module) is not None
            reason = "it is not installed"
        except (ImportError, ValueError) as err:
            found, reason = False, str(err)
        if not found:
            raise SandboxConfigError(
                f"[sandbox:{backend}] the {backend} backend needs its SDK: {needed.install_command} "
                f"(module {module}: {reason})"
            )


def create_sandbox_client_for_backend(backend: str, settings: Settings) -> Provider:
    """Build the provider for ``backend`` and validate its settings offline.

    Raises:
        UnknownBackend: no descriptor knows this name.
        Unsupported: the backend is known but this build has no provider for it.
        SandboxConfigError: the backend's SDK is not installed (the message names the extra), its
            settings are missing or malformed (the message names the setting), or the client's
            backend id contradicts its descriptor.
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
    require_backend_sdk(backend)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        extra = BACKEND_EXTRAS.get(backend)
        hint = f"; reinstall its SDK: {extra.install_command}" if extra is not None else ""
        raise Unsupported(f"the {backend} provider cannot be loaded here: {err}{hint}") from err
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
            SandboxConfigError: the backend's SDK is not installed, or its settings are missing or malformed.
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
