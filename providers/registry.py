"""Builds the provider for a backend name from settings, once per worker process."""

from __future__ import annotations

from providers.base import Provider
from sandbox.errors import UnknownBackend, Unsupported
from sandbox.settings import Settings

# Backends this build can run boxes on; the descriptor table knows more (their providers come later).
RUNNABLE_BACKENDS: tuple[str, ...] = ("local", "none", "selfhosted")


class ProviderRegistry:
    """Lazily constructs and caches one provider instance per backend."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._providers: dict[str, Provider] = {}

    def get(self, backend: str) -> Provider:
        """The provider for ``backend``.

        Raises:
            UnknownBackend: no descriptor knows this name.
            Unsupported: the backend is known but this build has no provider for it yet.
        """
        provider = self._providers.get(backend)
        if provider is None:
            provider = self._build(backend)
            provider.validate_credentials()
            self._providers[backend] = provider
        return provider

    async def aclose(self) -> None:
        """Release what providers hold for the worker's lifetime (e.g. the local boxes' namespace holders)."""
        for provider in self._providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()
        self._providers.clear()

    def _build(self, backend: str) -> Provider:
        from providers.descriptors import SANDBOX_BACKENDS

        if backend not in SANDBOX_BACKENDS:
            raise UnknownBackend(backend, list(SANDBOX_BACKENDS))
        if backend == "local":
            from providers.local import LocalProvider
            from sandbox.inbox_scripts import runtime_paths

            # Boxes must not read the data dir (store, secrets, other boxes) through the host view.
            return LocalProvider(
                self._settings.boxes_dir(),
                bubblewrap=self._settings.local_use_bubblewrap,
                hidden_paths=[self._settings.data_dir.resolve()],
                visible_paths=runtime_paths(),
            )
        if backend == "none":
            from providers.none import NoneProvider

            return NoneProvider()
        if backend == "selfhosted":
            from providers.selfhosted import NatsControlRpc, RelayConfig, SelfhostedProvider

            return SelfhostedProvider(
                NatsControlRpc(self._settings.nats_url),
                relay=RelayConfig.from_url(self._settings.selfhosted_relay_url),
                timeout=self._settings.selfhosted_rpc_timeout_seconds,
                probe_timeout=self._settings.selfhosted_probe_timeout_seconds,
                default_exec_timeout=self._settings.exec_timeout_seconds,
                default_agent_id=self._settings.selfhosted_agent_id,
            )
        raise Unsupported(
            f"backend {backend!r} is known but has no provider in this build yet; "
            f"use one of: {', '.join(RUNNABLE_BACKENDS)}"
        )
