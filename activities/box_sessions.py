"""The resumed box sessions of one worker, cached per (backend, instance id).

Resuming a box from its envelope costs the provider a round trip (or more), so the activities keep
the session they resumed and reuse it for every later activity on the same box. A typed
``BoxNotFound`` means the box is gone: the activity that saw it drops the entry with
:meth:`BoxSessions.forget`, so the next activity on that instance resumes afresh (and fails fast).
"""

from __future__ import annotations

from providers.registry import ProviderRegistry
from sandbox.box import BoxSession, Envelope

__all__ = ["BoxSessions"]


class BoxSessions:
    """Sessions resumed through one provider registry, keyed by (backend, instance id).

    Args:
        providers: The worker's provider registry, which resumes a box the cache does not hold.
    """

    def __init__(self, providers: ProviderRegistry) -> None:
        self._providers = providers
        self._sessions: dict[tuple[str, str], BoxSession] = {}

    async def get(self, backend: str, envelope: Envelope) -> BoxSession:
        """The session of the box ``envelope`` names, resumed through its provider the first time.

        Raises:
            BoxNotFound: The box is gone (nothing is cached then).
            UnknownBackend: ``backend`` is not a provider of the registry.
        """
        key = (backend, envelope.instance_id)
        session = self._sessions.get(key)
        if session is None:
            session = await self._providers.get(backend).resume(Envelope(**envelope.model_dump()))
            self._sessions[key] = session
        return session

    def keep(self, backend: str, instance_id: str, session: BoxSession) -> None:
        """Cache a session the caller already has (a box just provisioned), so no resume is needed."""
        self._sessions[(backend, instance_id)] = session

    def forget(self, backend: str, instance_id: str) -> None:
        """Drop the cached session of a box (it is gone or being terminated); unknown boxes are ignored."""
        self._sessions.pop((backend, instance_id), None)
