"""The ``none`` backend: a session with no box at all.

A lease configured with ``none`` has no file system, terminal, git or desktop; capability
negotiation reports every cell unavailable with ``backend_unsupported``. The provider exists so the
backend can be named and described like any other, but it refuses to create or resume a box with a
typed :class:`~sandbox.errors.Unsupported` that tells the caller to pick a real backend.
"""

from __future__ import annotations

from typing import Final

from providers.base import BoxSession, BoxSpec, Envelope, OwnedBox
from providers.descriptors import CapabilityDescriptor, select_backend
from sandbox.errors import Unsupported

__all__ = ["NoneProvider"]

_NO_BOX_MESSAGE: Final = (
    "the `none` backend has no box, so there is nothing to {action}; choose a real backend such as `local`"
)


class NoneProvider:
    """Provider for the ``none`` backend: describes itself, owns nothing, creates nothing."""

    def __init__(self) -> None:
        self._descriptor = select_backend("none")

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of ``none`` (every capability unavailable)."""
        return self._descriptor

    @property
    def backend_id(self) -> str:
        """The SDK backend id, ``none``."""
        return self._descriptor.backend_id

    def validate_credentials(self) -> None:
        """Nothing to check: ``none`` needs no settings."""

    async def create(self, spec: BoxSpec, idempotency_key: str) -> BoxSession:
        """Refuse: there is no box to create.

        Raises:
            Unsupported: always, naming a real backend to use instead.
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="create"))

    async def resume(self, envelope: Envelope) -> BoxSession:
        """Refuse: no box was ever created, so none can be resumed.

        Raises:
            Unsupported: always, naming a real backend to use instead.
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="resume"))

    async def terminate(self, envelope: Envelope) -> None:
        """Nothing to destroy; succeeds so that draining a ``none`` lease is idempotent."""

    async def list_owned(self) -> list[OwnedBox]:
        """``none`` owns no boxes."""
        return []
