"""The ``none`` backend: a session with no box at all.

A lease configured with ``none`` has no file system, terminal, git or desktop; capability
negotiation reports every cell unavailable with ``backend_unsupported``. The provider exists so the
backend can be named and described like any other, but it refuses to create or resume a box with a
typed :class:`~sandbox.errors.Unsupported` that tells the caller to pick a real backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from sandbox.box import BoxSession, BoxSpec, Envelope, OwnedBox
from sandbox.descriptors import CapabilityDescriptor, select_backend
from sandbox.errors import Unsupported
from sandbox.settings import Settings

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

    async def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Refuse: there is no workspace to capture.

        Raises:
            Unsupported: always (on the first iteration).
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="capture"))
        yield b""  # pragma: no cover  (makes this an async generator, like the protocol's)

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Refuse: there is no workspace to restore into.

        Raises:
            Unsupported: always.
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="restore"))

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """Refuse: there is no workspace.

        Raises:
            Unsupported: always.
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="fingerprint"))

    async def delete_snapshot(self, native_id: str) -> None:
        """Refuse: ``none`` has no native snapshots.

        Raises:
            Unsupported: always.
        """
        raise Unsupported(_NO_BOX_MESSAGE.format(action="delete a snapshot of"))


def build_provider(settings: Settings) -> NoneProvider:
    """The ``none`` backend needs no settings."""
    return NoneProvider()
