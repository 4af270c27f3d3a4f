"""Box access: Channel-A (files, git, PTYs) on a lease's box from a client process.

:class:`BoxAccess` holds the lease as a ``direct`` holder (a cold lease gets its box first; the
holder is heartbeaten in the background and released on exit), resumes the box from the grant's
envelope with the provider of the grant's backend, and hands out a
:class:`~sandbox.channel_a.ChannelA` on it whose change events go to the stack's NATS (best effort).

What this still needs from the worker's host (Channel-A is not routed through the worker yet):

- the provider's credentials and settings for the grant's backend (``SANDBOX_*`` of that provider),
  because the box is resumed in this process with :class:`providers.registry.ProviderRegistry`;
- for the ``local`` backend, the worker's filesystem: a local box is a directory and processes on
  the worker's host, so only a client on that host (same data dir) can resume it;
- for ``selfhosted``, the data dir's control signing key, which signs the agent requests;
- the runtime's NATS identity (``NatsAuth.best_effort(settings, "runtime")``) to publish change events.

Example::

    async with BoxAccess(leases, settings).channel("ws1", "g1") as channel:
        listing = await channel.fs_list("", depth=2)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from client.lease_client import LeaseClient
from sandbox.channel_a import ChannelA, NatsEventSink
from sandbox.nats_auth import NatsAuth
from sandbox.settings import Settings
from workflows.models.lease import LeaseGrant

if TYPE_CHECKING:
    from providers.registry import ProviderRegistry

__all__ = ["DEFAULT_WORKSPACE_ROOT", "BoxAccess"]

DEFAULT_WORKSPACE_ROOT = "/workspace"
"""Where the workspace is in a box whose envelope does not say (``state["workspace_root"]``)."""


def workspace_root_of(grant: LeaseGrant) -> str:
    """The workspace directory in the grant's box: the envelope's ``workspace_root``, else the default."""
    root = grant.envelope.state.get("workspace_root")
    return root if isinstance(root, str) and root else DEFAULT_WORKSPACE_ROOT


class BoxAccess:
    """Opens Channel-A on leases' boxes.

    The provider registry is never closed here: ``ProviderRegistry.aclose`` releases what providers
    hold for a *worker's* lifetime, and the local provider's stops the box holders it adopted on
    resume, which would kill the worker's boxes.

    Args:
        leases: The lease client the ``direct`` holders are taken with.
        settings: Provider, NATS and data-dir settings (default: the lease client's).
        providers: The provider registry to resume boxes with (default: one built from ``settings``).
    """

    def __init__(
        self, leases: LeaseClient, settings: Settings | None = None, *, providers: ProviderRegistry | None = None
    ) -> None:
        self.leases = leases
        self.settings = settings or leases.settings
        self._providers = providers

    def _registry(self) -> ProviderRegistry:
        if self._providers is None:
            # The one place a client needs providers: resuming a box in this process (see the module doc).
            from providers.registry import ProviderRegistry

            self._providers = ProviderRegistry(self.settings)
        return self._providers

    @contextlib.asynccontextmanager
    async def hold(self, workspace_id: str, group_id: str) -> AsyncIterator[LeaseGrant]:
        """Hold the lease as ``direct`` (waits for a cold lease's box), heartbeat it, release on exit."""
        async with self.leases.hold(workspace_id, group_id, kind="direct") as grant:
            yield grant

    @contextlib.asynccontextmanager
    async def open(self, grant: LeaseGrant) -> AsyncIterator[ChannelA]:
        """Channel-A on the box of a grant this caller holds; closed (PTYs too) when the block ends.

        Raises:
            BoxNotFound: The box of the grant is gone.
            SandboxConfigError: The grant's backend is not configured in this process.
        """
        from sandbox.box import Envelope

        _, workspace_id, group_id = grant.lease_id.split("/", 2)  # lease_workflow_id(): lease/<workspace>/<group>
        provider = self._registry().get(grant.backend)
        session = await provider.resume(Envelope(**grant.envelope.model_dump()))
        async with contextlib.AsyncExitStack() as stack:
            sink = NatsEventSink(
                self.settings.nats_url,
                workspace_id=workspace_id,
                session_id=group_id,
                connect_timeout=1.0,
                retry_after=3600.0,  # one short try per process: a missing NATS must not slow every op
                auth=NatsAuth.best_effort(self.settings, "runtime"),
            )
            stack.push_async_callback(sink.aclose)
            channel = ChannelA(session, workspace_root=workspace_root_of(grant), events=sink, lease_epoch=grant.epoch)
            stack.push_async_callback(channel.aclose)
            yield channel

    @contextlib.asynccontextmanager
    async def channel(self, workspace_id: str, group_id: str) -> AsyncIterator[ChannelA]:
        """:meth:`hold` and :meth:`open` in one: Channel-A on the lease's box for as long as the block runs."""
        async with self.hold(workspace_id, group_id) as grant, self.open(grant) as channel:
            yield channel
