"""The provider protocol: what every sandbox backend (local, selfhosted, modal, ...) implements.

A :class:`Provider` creates, resumes and terminates boxes; a :class:`BoxSession` is a handle on one
live box and runs commands and file operations in it. Providers raise only the typed errors
re-exported here (see the tree in :mod:`sandbox.errors`); activities map them to Temporal
``ApplicationError`` types in one table (:mod:`activities.provider_errors`).

Only :class:`BoxNotFound` proves that a box is gone. A transient failure is
:class:`ProviderUnavailable` and must never be reported as NotFound.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    Unsupported,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor

__all__ = [
    "BoxNotFound",
    "BoxSession",
    "BoundedExecReplies",
    "BoxSpec",
    "DirEntry",
    "Endpoint",
    "Envelope",
    "ExecResult",
    "ExecTimeout",
    "NativeWorkspaceSnapshots",
    "OwnedBox",
    "Provider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderQuotaError",
    "ProviderUnavailable",
    "Unsupported",
]


class BoxSpec(BaseModel):
    """What to create: the lease that owns the box and how the box should look."""

    lease_id: str = Field(description="Lease workflow id, lease/<workspace>/<group>.")
    workspace_id: str
    group_id: str
    epoch: int = Field(description="The lease epoch the box is created under.")
    image: str | None = None
    os: str = "linux"
    environment: dict[str, str] = Field(default_factory=dict)
    agent_id: str | None = None
    """The machine's agent, for the selfhosted backend (the box *is* that machine)."""


class Envelope(BaseModel):
    """Everything needed to find a box again (resume by id) after a worker restart.

    ``state`` is provider specific and must be JSON-serialisable (it is stored in the lease
    workflow and in the projection).
    """

    backend_id: str
    instance_id: str
    state: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command that ran to completion (a timeout raises ``ExecTimeout``)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass(frozen=True)
class DirEntry:
    """One entry of a directory listing, path relative to the listed directory."""

    name: str
    kind: str  # "file" | "dir" | "symlink" | "other"
    size: int = 0
    mode: int = 0


@dataclass(frozen=True)
class Endpoint:
    """How to reach a port exposed by a box from outside it."""

    host: str
    port: int
    tls: bool = False
    path: str = "/"
    query: str = ""


@dataclass(frozen=True)
class OwnedBox:
    """A box the provider says we own (for the orphan sweep)."""

    instance_id: str
    lease_id: str | None = None
    created_at: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class BoundedExecReplies(Protocol):
    """A session whose every exec answer must fit one message (a selfhosted machine over NATS).

    ``exec_reply_budget`` is the most raw output bytes one reply can carry; callers that produce
    their own output (Channel-A) keep under it. Sessions without the attribute have no such cap.
    """

    exec_reply_budget: int


@runtime_checkable
class BoxSession(Protocol):
    """A handle on one live box. Paths are relative to the workspace root unless absolute."""

    @property
    def instance_id(self) -> str:
        """The provider's id for this box."""
        ...

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv, no shell) in the box and wait for it.

        Raises:
            ExecTimeout: the command ran past ``timeout`` seconds and was killed.
            BoxNotFound: the box is gone.
        """
        ...

    async def read_file(self, path: str) -> bytes:
        """Read a whole file."""
        ...

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories."""
        ...

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level."""
        ...

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the box."""
        ...

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """Where a port listening inside the box can be reached from outside."""
        ...

    def serialize_state(self) -> Envelope:
        """The envelope that lets :meth:`Provider.resume` find this box again."""
        ...


@runtime_checkable
class Provider(Protocol):
    """A sandbox backend."""

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static capability descriptor of this backend."""
        ...

    @property
    def backend_id(self) -> str:
        """The SDK backend id (equals ``descriptor.backend_id``)."""
        ...

    def validate_credentials(self) -> None:
        """Check settings offline; raise ``SandboxConfigError`` naming what is missing."""
        ...

    async def create(self, spec: BoxSpec, idempotency_key: str) -> BoxSession:
        """Create a box, or adopt the one already created with the same idempotency key."""
        ...

    async def resume(self, envelope: Envelope) -> BoxSession:
        """Find a box again by its envelope; raise ``BoxNotFound`` if it is gone."""
        ...

    async def terminate(self, envelope: Envelope) -> None:
        """Destroy the box and every process in it. Idempotent: a gone box is not an error."""
        ...

    async def list_owned(self) -> list[OwnedBox]:
        """Every box this provider instance owns (for the orphan sweep)."""
        ...

    # -- workspace snapshots ------------------------------------------------------------------

    def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Stream a portable archive of the box's workspace and home directory.

        The archive is a tar stream (zstd-compressed when the provider can; a consumer tells the
        two apart by the zstd frame magic) with top-level members ``workspace/`` and ``home/``,
        keeping modes, symbolic links, empty directories and modification times. It is produced
        while it is read, so memory does not grow with the workspace; the same unchanged tree
        gives the same bytes. Closing the iterator early stops the capture.

        Raises (while iterating):
            BoxNotFound: the box is gone.
            Unsupported: the backend cannot capture workspaces (use native snapshots, or none).
            ProviderError: the archive could not be produced.
        """
        ...

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Replace the box's workspace and home directory with the archive streamed by ``chunks``.

        ``chunks`` may be a verifying iterator that raises at its end (SHA-256 mismatch): the
        provider consumes it completely and commits the restored tree only if it finished without
        error; otherwise it discards whatever it extracted (the box keeps the tree it had) and
        re-raises. Accepts both archive kinds :meth:`capture_workspace` produces.

        Raises:
            BoxNotFound: the box is gone.
            ArchiveCorrupt: the stream cannot be decoded.
            Unsupported: the backend cannot restore workspace archives.
            ProviderUnavailable: extraction failed on a stream that decoded (disk full, ...); retry.
        """
        ...

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """A cheap summary of the workspace's state (no file contents read), or None if unavailable.

        Two equal fingerprints taken from the same box mean the workspace did not change in
        between, so a periodic capture can be skipped; a None means "cannot tell cheaply" and
        the caller captures. Fingerprints are only comparable within one provider.

        Raises:
            BoxNotFound: the box is gone.
        """
        ...

    async def delete_snapshot(self, native_id: str) -> None:
        """Delete a provider-native snapshot (an archive of kind ``native``) by the provider's id.

        Idempotent: a snapshot that is already gone is not an error.

        Raises:
            Unsupported: the backend has no native snapshots.
            ProviderUnavailable: transient failure; the caller retries later.
        """
        ...


@runtime_checkable
class NativeWorkspaceSnapshots(Protocol):
    """Optional: a provider that can persist workspaces with the service's own snapshots.

    When :attr:`native_workspace_snapshots` is true (configured per backend, e.g.
    ``SANDBOX_MODAL_WORKSPACE_PERSISTENCE=snapshot_directory``), the lease's captures take a native
    snapshot instead of streaming a tar into the artifact store; the ledger keeps its id as an
    archive of kind ``native`` and the GC deletes it with :meth:`Provider.delete_snapshot`.
    """

    @property
    def native_workspace_snapshots(self) -> bool:
        """Whether workspaces of this provider are persisted natively (else as portable tar)."""
        ...

    async def snapshot_native(self, envelope: Envelope, *, ttl_seconds: int | None) -> str:
        """Snapshot the box's workspace; returns the service's id for it.

        ``ttl_seconds`` bounds how long the service keeps a snapshot nobody deletes (a capture
        that crashed before the ledger recorded it); None keeps it until deleted.

        Raises:
            BoxNotFound: the box is gone.
            ProviderUnavailable: transient failure; retry.
        """
        ...

    async def mount_native(self, envelope: Envelope, native_id: str) -> None:
        """Put a workspace snapshot back into the box (replacing its workspace).

        Raises:
            BoxNotFound: the box is gone.
            ProviderError: the snapshot is unknown or cannot be used.
        """
        ...
