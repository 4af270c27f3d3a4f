"""What a lease decides from its backend's capability descriptor: :class:`BackendProfile` from the table.

The ``load_lease_seed`` activity calls :func:`backend_profile` once when a lease starts and the
lease keeps the answer in its state, so its decisions (capture and restore, rotation ahead of the
provider's hard lifetime) never depend on the descriptor table of the worker that replays it.
Leases seeded before that (no profile in their state) still call it as they go, as they always
did.
"""

from __future__ import annotations

from sandbox import errors
from sandbox.descriptors import select_backend
from workflows.models.lease import BackendProfile

__all__ = ["backend_profile"]


def backend_profile(backend: str) -> BackendProfile:
    """The profile of ``backend`` as today's descriptor table describes it.

    Never raises: a lease of a backend the table does not know (yet) behaves as one without
    snapshots or a hard lifetime, as the lease always has.
    """
    try:
        descriptor = select_backend(backend)
    except errors.SandboxError:
        return BackendProfile(backend=backend)
    lifetime_ms = descriptor.lifetime.hard_lifetime_ms
    return BackendProfile(
        backend=backend,
        keeps_snapshots=descriptor.snapshot.kind != "none",
        hard_lifetime_seconds=lifetime_ms / 1000 if lifetime_ms else None,
    )
