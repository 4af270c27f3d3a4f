"""The Daytona backend: boxes are Daytona sandboxes, driven through the official ``daytona`` SDK (``AsyncDaytona``).

SDK calls: ``AsyncDaytona(DaytonaConfig(api_key, api_url, target))``;
``create(CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams, timeout=...)`` with a
``name`` derived from the idempotency key (Daytona names are unique per organization, so a racing
second create gets 409 and adopts the first), ``labels`` ``sandbox.lease_id``/``sandbox.key``,
``env_vars`` and ``auto_stop_interval`` (minutes; 0 is forwarded and disables the idle stop);
``list(ListSandboxesQuery(labels=...))`` to adopt by key and for :meth:`DaytonaProvider.list_owned`;
``get(id)`` to resume (a stopped, paused or archived sandbox is started again with
``sandbox.start``); ``sandbox.delete``; on a sandbox: ``process.exec`` (a shell command line; argv
is quoted with :func:`shlex.join`), ``fs.upload_file``/``download_file``/``list_files``/
``get_file_info``, ``create_signed_preview_url(port, expires_in_seconds)`` (the preview URL with
its access token, kept verbatim in the :class:`Endpoint`), ``create_snapshot(name)`` and
``client.snapshot.delete(name)`` for native snapshots (``BoxSpec.image = "snapshot:<name>"``
creates a sandbox from one).

``process.exec`` answers one text ``result`` (UTF-8) and an exit code, so
:class:`DaytonaBoxSession.exec` wraps the command in :func:`providers.shell_exec.exec_script`: its
stdout and stderr go to scratch files and come back base64-encoded in one report line, byte-exact
and separate. Input for ``stdin`` is uploaded to a scratch file first.

NotFound rule: only the control plane proves a box gone — ``get(id)`` answering 404
(``DaytonaNotFoundError``) or a sandbox in state ``destroyed``/``destroying``. A toolbox call
(exec, files) that fails for any reason other than auth, rate limit or a 5xx is checked with
``get(id)``: gone is :class:`BoxNotFound`, a sandbox that is not ``started`` (stopped by the idle
timer, paused, archived) is :class:`ProviderUnavailable` (``resume`` starts it again), a running
one keeps the call's own error (a missing file is :class:`PathNotFound`, never BoxNotFound).

====================================================  =====================================
SDK error                                             our error
====================================================  =====================================
``DaytonaNotFoundError`` (404) on get/start/delete    :class:`BoxNotFound`
``DaytonaNotFoundError`` on create (no such snapshot) :class:`ProviderError`
``DaytonaFileNotFoundError`` / 404 on a file          :class:`PathNotFound` (box confirmed live)
``DaytonaAuthenticationError`` (401),                 :class:`ProviderAuthError`
  ``DaytonaForbiddenError`` (403)
``DaytonaRateLimitError`` (429)                       :class:`ProviderQuotaError`
``DaytonaInternalServerError`` / ``BadGateway`` /     :class:`ProviderUnavailable`
  ``ServiceUnavailable`` (5xx), ``DaytonaConnectionError``,
  ``DaytonaTimeoutError`` (request or start deadline)
``DaytonaProcessExecutionTimeoutError`` or a timeout  :class:`ExecTimeout`
  after the command's own timeout
``DaytonaConflictError`` (409) on create              adopt the sandbox of that name
anything else                                         :class:`ProviderError`
====================================================  =====================================
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import secrets
import shlex
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from daytona.common.daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, DaytonaConfig
from daytona.common.errors import (
    DaytonaAuthenticationError,
    DaytonaConflictError,
    DaytonaConnectionError,
    DaytonaError,
    DaytonaForbiddenError,
    DaytonaNotFoundError,
    DaytonaProcessExecutionTimeoutError,
    DaytonaRateLimitError,
    DaytonaTimeoutError,
)
from daytona.common.process import ExecuteResponse
from daytona.common.sandbox import ListSandboxesQuery
from daytona_api_client_async import SignedPortPreviewUrl
from daytona_toolbox_api_client_async import FileInfo
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row, confirmed
from providers.shell_exec import NO_WORKDIR, exec_script, parse_exec_report, stage_stdin
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.descriptors import CAPABILITY_DESCRIPTORS
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "SNAPSHOT_IMAGE_PREFIX",
    "WORKSPACE_ROOT",
    "DaytonaBoxSession",
    "DaytonaClient",
    "DaytonaProvider",
    "DaytonaSandbox",
    "DaytonaSettings",
    "build_provider",
    "sandbox_name_for_key",
]

WORKSPACE_ROOT: Final = "/workspace"
#: ``BoxSpec.image`` with this prefix names a Daytona snapshot to create the sandbox from.
SNAPSHOT_IMAGE_PREFIX: Final = "snapshot:"

_LIST_PAGE: Final = 100
_GONE_STATES: Final = frozenset({"destroyed", "destroying"})


# --- settings -----------------------------------------------------------------------------------


class DaytonaSettings(BaseSettings):
    """Daytona settings (prefix ``SANDBOX_DAYTONA_``); the API key also falls back to ``DAYTONA_API_KEY``."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_DAYTONA_", extra="ignore", populate_by_name=True)

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("api_key", "SANDBOX_DAYTONA_API_KEY", "DAYTONA_API_KEY")
    )
    api_url: str | None = None
    target: str | None = None
    image: str | None = None
    snapshot_name: str | None = None
    auto_stop_interval: int | None = Field(
        default=None, description="Idle minutes before Daytona stops the box; 0 never."
    )
    timeout_seconds: float = Field(default=60.0, description="How long create/start may take.")
    exposed_port_url_ttl_seconds: int = Field(default=3600, description="Lifetime of signed preview URLs.")

    def check(self) -> None:
        """Check the settings offline.

        Raises:
            SandboxConfigError: the API key is missing, or values contradict; the message names the setting.
        """
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise SandboxConfigError(
                "[sandbox:daytona] SANDBOX_DAYTONA_API_KEY is not set; set it (or DAYTONA_API_KEY) to an API key "
                "from the Daytona dashboard"
            )
        if self.image and self.snapshot_name:
            raise SandboxConfigError(
                "[sandbox:daytona] set SANDBOX_DAYTONA_IMAGE or SANDBOX_DAYTONA_SNAPSHOT_NAME, not both"
            )
        if self.auto_stop_interval is not None and self.auto_stop_interval < 0:
            raise SandboxConfigError(
                "[sandbox:daytona] SANDBOX_DAYTONA_AUTO_STOP_INTERVAL must be >= 0 minutes (0 disables the idle stop)"
            )
        if self.timeout_seconds <= 0:
            raise SandboxConfigError("[sandbox:daytona] SANDBOX_DAYTONA_TIMEOUT_SECONDS must be positive")
        if self.exposed_port_url_ttl_seconds < 1:
            raise SandboxConfigError("[sandbox:daytona] SANDBOX_DAYTONA_EXPOSED_PORT_URL_TTL_SECONDS must be >= 1")
        if self.api_url is not None and urllib.parse.urlsplit(self.api_url).scheme not in ("http", "https"):
            raise SandboxConfigError(
                f"[sandbox:daytona] SANDBOX_DAYTONA_API_URL must be an http(s) URL: {self.api_url!r}"
            )

    def config(self) -> DaytonaConfig:
        """The SDK configuration these settings describe."""
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return DaytonaConfig(api_key=key, api_url=self.api_url, target=self.target)


# --- the typed slice of the SDK this module uses ------------------------------------------------


class DaytonaProcess(Protocol):
    """``AsyncSandbox.process``."""

    async def exec(
        self, command: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: int | None = None
    ) -> ExecuteResponse:
        """Run a shell command line and wait for it."""
        ...


class DaytonaFileSystem(Protocol):
    """``AsyncSandbox.fs``."""

    async def upload_file(self, src: bytes, dst: str, timeout: int = ...) -> None:
        """Write a whole file."""
        ...

    async def download_file(self, remote_path: str, timeout: int = ...) -> bytes:
        """Read a whole file."""
        ...

    async def list_files(self, path: str, depth: int | None = None) -> list[FileInfo]:
        """One directory level."""
        ...

    async def get_file_info(self, path: str) -> FileInfo:
        """Stat one path."""
        ...


class DaytonaSandbox(Protocol):
    """An ``AsyncSandbox``."""

    @property
    def id(self) -> str:
        """The sandbox id (a UUID)."""
        ...

    @property
    def name(self) -> str:
        """The sandbox name (unique per organization)."""
        ...

    @property
    def labels(self) -> dict[str, str]:
        """Labels."""
        ...

    @property
    def state(self) -> object:
        """The ``SandboxState`` enum (compared by value)."""
        ...

    @property
    def created_at(self) -> str | None:
        """ISO 8601 creation time."""
        ...

    @property
    def process(self) -> DaytonaProcess:
        """Process execution."""
        ...

    @property
    def fs(self) -> DaytonaFileSystem:
        """Filesystem."""
        ...

    async def start(self, timeout: float | None = 60) -> None:
        """Start a stopped sandbox and wait for it."""
        ...

    async def delete(self, timeout: float | None = 60, wait: bool = False) -> None:
        """Delete the sandbox."""
        ...

    async def create_signed_preview_url(self, port: int, expires_in_seconds: int | None = None) -> SignedPortPreviewUrl:
        """A preview URL for ``port`` with its token embedded."""
        ...

    async def create_snapshot(self, name: str, timeout: float | None = 60) -> None:
        """Snapshot the sandbox's filesystem under ``name``."""
        ...


class DaytonaSnapshots(Protocol):
    """``AsyncDaytona.snapshot``."""

    async def delete(self, snapshot: str) -> None:
        """Delete a snapshot by id or name."""
        ...


class DaytonaClient(Protocol):
    """An ``AsyncDaytona`` (or a fake with the same methods)."""

    @property
    def snapshot(self) -> DaytonaSnapshots:
        """The snapshot service."""
        ...

    async def create(
        self,
        params: CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams | None = None,
        *,
        timeout: float = 60,
    ) -> DaytonaSandbox:
        """Create a sandbox and wait until it started."""
        ...

    async def get(self, sandbox_id_or_name: str) -> DaytonaSandbox:
        """One sandbox by id or name."""
        ...

    def list(self, query: ListSandboxesQuery | None = None) -> AsyncIterator[DaytonaSandbox]:
        """Every sandbox matching ``query`` (paged)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# --- error translation --------------------------------------------------------------------------


_ERRORS: Final = ErrorTable(
    (
        Row(DaytonaNotFoundError, BoxNotFound, "Daytona: {text}", box=True),
        Row(
            (DaytonaAuthenticationError, DaytonaForbiddenError),
            ProviderAuthError,
            "Daytona rejected the request: {text}",
        ),
        Row(DaytonaRateLimitError, ProviderQuotaError, "Daytona rate limit or quota: {text}"),
        Row((DaytonaConnectionError, DaytonaTimeoutError), ProviderUnavailable, "Daytona: {text}"),
        Row(DaytonaError, ProviderUnavailable, "Daytona: {text}", status=SERVER_ERRORS),
        Row(DaytonaError, ProviderError, "Daytona: {text}"),
        Row((OSError, ConnectionError), ProviderUnavailable, "Daytona could not be reached: {text}"),
    ),
    default="Daytona: {name}: {text}",
)
"""The module docstring's table; ``box_op=False`` where a 404 cannot mean "the box is gone" (create)."""


def _state(sandbox: DaytonaSandbox) -> str:
    state = sandbox.state
    return str(getattr(state, "value", state))


# --- the box session ----------------------------------------------------------------------------


def _box_path(path: str) -> str:
    return posixpath.normpath(posixpath.join(WORKSPACE_ROOT, path))


def _kind(info: FileInfo) -> str:
    if info.mode.startswith("L"):  # Go's FileMode.String() marks symbolic links with L
        return "symlink"
    if info.is_dir:
        return "dir"
    return "file" if info.mode.startswith("-") else "other"


def _perm(info: FileInfo) -> int:
    try:
        return int(info.permissions, 8) & 0o7777
    except ValueError:
        return 0


class DaytonaBoxSession:
    """A started Daytona sandbox. Relative paths are under ``/workspace``; absolute paths are allowed."""

    def __init__(self, provider: DaytonaProvider, sandbox: DaytonaSandbox) -> None:
        self._provider = provider
        self._sandbox = sandbox

    @property
    def instance_id(self) -> str:
        """The Daytona sandbox id."""
        return self._sandbox.id

    async def _failed(self, err: BaseException) -> ProviderError:
        """Translate a toolbox error, asking the control plane whether the sandbox is still there."""
        if isinstance(err, DaytonaAuthenticationError | DaytonaForbiddenError | DaytonaRateLimitError):
            return _ERRORS.translate(err)
        if isinstance(err, DaytonaError) and err.status_code is not None and err.status_code >= 500:
            return _ERRORS.translate(err)
        if not isinstance(err, DaytonaError):
            return _ERRORS.translate(err)
        client = await self._provider.client()
        try:
            current = await client.get(self.instance_id)
        except Exception as probe:
            return _ERRORS.translate(probe)
        state = _state(current)
        if state in _GONE_STATES:
            return BoxNotFound(f"Daytona sandbox {self.instance_id} is {state}")
        if state != "started":
            return ProviderUnavailable(f"Daytona sandbox {self.instance_id} is {state}: {err}; resume it to start it")
        if isinstance(err, DaytonaNotFoundError):
            return PathNotFound(f"Daytona: {err}")
        return _ERRORS.translate(err, box_op=False)

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) in the sandbox and wait for it.

        Raises:
            ExecTimeout: the command ran past ``timeout`` seconds.
            PathNotFound: the working directory does not exist.
            BoxNotFound: the sandbox is gone.
            ProviderUnavailable: Daytona could not be reached, or the sandbox is stopped; retry after resume.
        """
        if not cmd:
            raise ProviderError("exec needs a non-empty argv")
        wd = _box_path(workdir or ".")
        stdin_path = await stage_stdin(stdin, self.write_file)
        command = shlex.join(["sh", "-c", exec_script(cmd, workdir=wd, stdin_file=stdin_path)])
        started = time.monotonic()
        try:
            done = await self._sandbox.process.exec(
                command, env=dict(env or {}), timeout=math.ceil(timeout) if timeout else None
            )
        except DaytonaTimeoutError as err:
            timed_out = isinstance(err, DaytonaProcessExecutionTimeoutError) or (
                timeout is not None and time.monotonic() - started >= timeout
            )
            if timeout and timed_out:
                raise ExecTimeout(
                    f"command ran past {timeout}s in Daytona sandbox {self.instance_id}", timeout=timeout
                ) from err
            raise await self._failed(err) from err
        except Exception as err:
            raise await self._failed(err) from err
        report = parse_exec_report(done.result or "")
        if report is None:
            if done.exit_code == NO_WORKDIR:
                raise PathNotFound(f"working directory {wd} does not exist in the box", path=wd)
            raise ProviderError(f"Daytona sandbox {self.instance_id} returned no exec report: {done.result[-300:]!r}")
        return await report.result()

    async def read_file(self, path: str) -> bytes:
        """Read a whole file.

        Raises:
            PathNotFound: no such file.
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            return await self._sandbox.fs.download_file(_box_path(path))

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            await self._sandbox.fs.upload_file(bytes(data), _box_path(path))

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level, sorted by name.

        Raises:
            PathNotFound: no such directory.
            BoxNotFound: the sandbox is gone.
        """
        async with confirmed(self._failed):
            entries = await self._sandbox.fs.list_files(_box_path(path))
        listed = [DirEntry(name=e.name, kind=_kind(e), size=e.size, mode=_perm(e)) for e in entries]
        return sorted(listed, key=lambda e: e.name)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the sandbox.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        try:
            await self._sandbox.fs.get_file_info(_box_path(path))
        except Exception as err:
            translated = await self._failed(err)
            if isinstance(translated, PathNotFound):
                return False
            raise translated from err
        return True

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """A signed preview URL for ``port`` (valid ``SANDBOX_DAYTONA_EXPOSED_PORT_URL_TTL_SECONDS``), as an Endpoint.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        if not 1 <= port <= 65535:
            raise ProviderError(f"port must be in 1..65535, not {port}")
        async with confirmed(self._failed):
            preview = await self._sandbox.create_signed_preview_url(
                port, expires_in_seconds=self._provider.settings.exposed_port_url_ttl_seconds
            )
        url = urllib.parse.urlsplit(preview.url)
        if not url.hostname or url.scheme not in ("http", "https", "ws", "wss"):
            raise ProviderError(f"Daytona returned a malformed preview URL for port {port}")
        tls = url.scheme in ("https", "wss")
        return Endpoint(
            host=url.hostname, port=url.port or (443 if tls else 80), tls=tls, path=url.path or "/", query=url.query
        )

    def serialize_state(self) -> Envelope:
        """The envelope that resumes this sandbox."""
        return Envelope(
            backend_id=self._provider.backend_id,
            instance_id=self.instance_id,
            state={"sandboxId": self.instance_id, "name": self._sandbox.name},
        )


# --- the provider -------------------------------------------------------------------------------


def sandbox_name_for_key(idempotency_key: str) -> str:
    """The Daytona sandbox name for an idempotency key: stable, unique per key, DNS-label safe."""
    return "sbx-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]


class DaytonaProvider(RemoteWorkspaceSnapshots):
    """Boxes on Daytona.

    Args:
        settings: The Daytona settings (``SANDBOX_DAYTONA_*``).
        client: An ``AsyncDaytona``-shaped client; when None, a real ``AsyncDaytona`` is built from the
            settings on first use (tests pass a fake).
    """

    def __init__(self, settings: DaytonaSettings, *, client: DaytonaClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._owns_client = client is None
        # HOME (/home/daytona for the default user) is not archived: only the workspace persists.
        self.remote_workspace = RemoteWorkspace(workspace_root=WORKSPACE_ROOT, home_dir=None)

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The daytona descriptor."""
        return CAPABILITY_DESCRIPTORS["daytona"]

    @property
    def backend_id(self) -> str:
        """``daytona``."""
        return self.descriptor.backend_id

    def validate_credentials(self) -> None:
        """Check the settings offline (see :meth:`DaytonaSettings.check`)."""
        self.settings.check()

    async def client(self) -> DaytonaClient:
        """The SDK client (built lazily: ``AsyncDaytona`` opens HTTP sessions)."""
        if self._client is None:
            self.settings.check()
            from daytona import AsyncDaytona

            self._client = cast(DaytonaClient, AsyncDaytona(self.settings.config()))
        return self._client

    async def _find(self, labels: dict[str, str]) -> list[DaytonaSandbox]:
        client = await self.client()
        found: list[DaytonaSandbox] = []
        with _ERRORS.mapped(box_op=False):
            async for sandbox in client.list(ListSandboxesQuery(labels=labels, limit=_LIST_PAGE)):
                if _state(sandbox) not in _GONE_STATES:
                    found.append(sandbox)
        return found

    def _params(
        self, spec: BoxSpec, idempotency_key: str
    ) -> CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams:
        common: dict[str, Any] = {
            "name": sandbox_name_for_key(idempotency_key),
            "labels": {
                box_labels.LEASE_ID: spec.lease_id,
                box_labels.KEY: idempotency_key,
                box_labels.MANAGED_BY: box_labels.MANAGED_BY_US,
                "sandbox.workspace_id": spec.workspace_id,
                box_labels.EPOCH: str(spec.epoch),
            },
            "env_vars": dict(spec.environment),
            "auto_stop_interval": self.settings.auto_stop_interval,
            "target": self.settings.target,
        }
        image = spec.image or self.settings.image
        if spec.image and spec.image.startswith(SNAPSHOT_IMAGE_PREFIX):
            return CreateSandboxFromSnapshotParams(snapshot=spec.image.removeprefix(SNAPSHOT_IMAGE_PREFIX), **common)
        if image:
            return CreateSandboxFromImageParams(image=image, **common)
        return CreateSandboxFromSnapshotParams(snapshot=self.settings.snapshot_name, **common)

    async def create(self, spec: BoxSpec, idempotency_key: str) -> DaytonaBoxSession:
        """Create a sandbox, or adopt the live one created under ``idempotency_key``.

        Raises:
            ProviderAuthError, ProviderQuotaError, ProviderUnavailable, ProviderError: Daytona refused or failed.
        """
        self.settings.check()
        for sandbox in await self._find({box_labels.KEY: idempotency_key}):
            try:
                return await self._started(sandbox)
            except BoxNotFound:
                continue
        client = await self.client()
        with _ERRORS.mapped(box_op=False):
            try:
                created = await client.create(
                    self._params(spec, idempotency_key), timeout=self.settings.timeout_seconds
                )
            except DaytonaConflictError:
                # Another create with the same key won the name: adopt that sandbox.
                return await self._resume_id(sandbox_name_for_key(idempotency_key))
        return DaytonaBoxSession(self, created)

    async def _started(self, sandbox: DaytonaSandbox) -> DaytonaBoxSession:
        state = _state(sandbox)
        if state in _GONE_STATES:
            raise BoxNotFound(f"Daytona sandbox {sandbox.id} is {state}")
        if state != "started":
            with _ERRORS.mapped():
                await sandbox.start(timeout=self.settings.timeout_seconds)
        return DaytonaBoxSession(self, sandbox)

    async def _resume_id(self, sandbox_id: str) -> DaytonaBoxSession:
        client = await self.client()
        with _ERRORS.mapped():
            sandbox = await client.get(sandbox_id)
        return await self._started(sandbox)

    @staticmethod
    def _sandbox_id(envelope: Envelope) -> str:
        sandbox_id = envelope.instance_id or str(envelope.state.get("sandboxId") or "")
        if not sandbox_id:
            raise BoxNotFound("the envelope names no Daytona sandbox")
        return sandbox_id

    async def resume(self, envelope: Envelope) -> DaytonaBoxSession:
        """Find the sandbox again, starting it if it was stopped, paused or archived.

        Raises:
            BoxNotFound: the sandbox was deleted or never existed.
            ProviderUnavailable: Daytona could not be reached; retry.
        """
        return await self._resume_id(self._sandbox_id(envelope))

    async def terminate(self, envelope: Envelope) -> None:
        """Delete the sandbox; one that is already gone is not an error."""
        client = await self.client()
        try:
            with _ERRORS.mapped():
                sandbox = await client.get(self._sandbox_id(envelope))
                if _state(sandbox) not in _GONE_STATES:
                    await sandbox.delete(timeout=self.settings.timeout_seconds)
        except BoxNotFound:
            return

    async def list_owned(self) -> list[OwnedBox]:
        """Live sandboxes this runtime created (label ``sandbox.managed_by``)."""
        return [
            box_labels.owned_box(sandbox.id, sandbox.labels, created_at=box_labels.iso_seconds(sandbox.created_at))
            for sandbox in await self._find({box_labels.MANAGED_BY: box_labels.MANAGED_BY_US})
        ]

    async def aclose(self) -> None:
        """Close the SDK client if this provider built it."""
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def native_snapshot(self, envelope: Envelope, name: str | None = None) -> str:
        """Snapshot the sandbox's filesystem as a Daytona snapshot; returns its name.

        Create from it with ``BoxSpec(image="snapshot:<name>")``.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        session = await self.resume(envelope)
        snapshot = name or f"sbx-snap-{secrets.token_hex(8)}"
        async with confirmed(session._failed):
            await session._sandbox.create_snapshot(snapshot, timeout=self.settings.timeout_seconds)
        return snapshot

    async def delete_snapshot(self, native_id: str) -> None:
        """Delete a Daytona snapshot by name or id; one that is already gone is not an error."""
        client = await self.client()
        with _ERRORS.mapped(box_op=False):
            try:
                await client.snapshot.delete(native_id)
            except DaytonaNotFoundError:
                return


def build_provider(settings: Settings) -> DaytonaProvider:
    """The Daytona provider for a worker, its settings read from ``SANDBOX_DAYTONA_*`` (and ``DAYTONA_API_KEY``)."""
    del settings  # the backend's own settings live under their own prefix
    return DaytonaProvider(DaytonaSettings())
