"""The ``modal`` provider: boxes are Modal Sandboxes, driven through the ``modal`` SDK's async (``.aio``) calls.

SDK calls used (modal 1.6): ``Client.from_credentials`` (when a token pair is configured, else the
SDK's own environment/config credentials), ``App.lookup(create_if_missing=True)``,
``Sandbox.list(app_id=, tags=)`` and ``Sandbox.create(..., name=, tags=, image=, env=, workdir=,
timeout=, idle_timeout=, encrypted_ports=)`` for an idempotent create, ``Sandbox.from_name`` to
adopt the box a racing create made, ``Sandbox.from_id`` / ``poll`` / ``returncode`` for resume and
liveness, ``exec`` (bytes mode, stdin streamed) for commands, the 1.6 ``filesystem`` API
(``read_bytes``, ``write_bytes``, ``list_files``, ``stat``) for files, ``tunnels`` for exposed
ports, ``get_tags`` for the orphan sweep, ``snapshot_filesystem`` / ``snapshot_directory`` /
``mount_image`` for native snapshots, ``modal.experimental.image_delete`` to delete one, and
``terminate``.

Every box is created with the ``sleep infinity`` entrypoint (upstream ``useSleepCmd``), the hard
lifetime of the descriptor (24 h, Modal's maximum) as ``timeout`` unless
``SANDBOX_MODAL_TIMEOUT_SECONDS`` says otherwise, an idle timeout defaulting to that lifetime, the
workspace root as ``workdir``, encrypted (TLS) tunnels pre-declared for the desktop (6080) and
terminal (7681) planes and browser control (7682), a unique ``name`` derived from the idempotency
key (Modal refuses a second running sandbox with the same name in an app, so two racing creates
cannot make two boxes) and the tags ``sandbox.lease_id``, ``sandbox.key`` and
``sandbox.created_at``, ``sandbox.epoch``, ``sandbox.workspace_id``, ``sandbox.group_id``.
After a create, ``true`` runs until it exits 0 (upstream
``verifySandboxExecReadiness``, 60 s budget).

**The NotFound rule.** A box is gone (:class:`~sandbox.errors.BoxNotFound`) only when Modal says so
about *the sandbox*: ``from_id``/``poll`` raise ``NotFoundError``, or the handle reports a return code
(the sandbox finished: terminated, timed out or idle-killed; Modal never restarts a finished
sandbox), or an error carries one of the two upstream terminal messages (``Modal sandbox <id> is no
longer running.`` / ``Modal sandbox <id> not found (has been terminated)``). Other errors of an
operation on a box are *confirmed* with ``poll`` before they are called NotFound, because the SDK
blurs them: its filesystem API turns a transient ``ServiceError``/``ConnectionError`` into
``NotFoundError("The Sandbox is unavailable...")``, and ``exec`` on a finished sandbox raises
``ConflictError``. A ``NotFoundError`` of ``create`` (an image or app that is missing) or of
``image_delete`` is never about a box.

==========================================================  ===============================================
SDK error                                                    our error
==========================================================  ===============================================
``NotFoundError`` from ``from_id``/``poll``                  ``BoxNotFound``
``NotFoundError``/``ConflictError``/``SandboxTerminatedError``  ``BoxNotFound`` if ``poll`` confirms the box
  /``SandboxFilesystemError`` from an op on a box              finished, else ``ProviderUnavailable``
message ``Modal sandbox <id> is no longer running.`` or      ``BoxNotFound``
  ``... not found (has been terminated)``
``SandboxFilesystemNotFoundError`` / ``...NotADirectoryError``  ``PathNotFound``
``ConnectionError``, ``ServiceError``, ``InternalError``,    ``ProviderUnavailable`` (retryable; transient
  ``InternalFailure``, ``modal.exception.TimeoutError``,       signals always win over NotFound)
  ``ClientClosed``, grpclib ``StreamTerminatedError``,
  ``GRPCError`` UNAVAILABLE/INTERNAL/UNKNOWN/CANCELLED/
  DEADLINE_EXCEEDED, ``OSError``, ``asyncio.TimeoutError``
``AuthError``, ``PermissionDeniedError``, GRPC UNAUTHENTICATED  ``ProviderAuthError``
``ResourceExhaustedError``, GRPC RESOURCE_EXHAUSTED           ``ProviderQuotaError``
exec past its ``timeout`` (return code -1)                   ``ExecTimeout``
anything else (``InvalidError``, ``NotFoundError`` of create,  ``ProviderError``
  ``SnapshotCreationError``, ...)
==========================================================  ===============================================

Workspace archives (``capture_workspace``/``restore_workspace``) are portable tars made in the box by
:class:`~providers.remote_workspace.RemoteWorkspace` (the descriptor's tar fallback); Modal's native
snapshots are offered beside them as :meth:`ModalProvider.snapshot_native` (an image id ``im-...``
with an explicit TTL), :meth:`ModalProvider.mount_native` (a directory snapshot mounted over the
workspace), a create whose ``BoxSpec.image`` is a snapshot image id, and
:meth:`ModalProvider.delete_snapshot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import posixpath
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, cast

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import ErrorTable, Row
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.descriptors import (
    BROWSER_CONTROL_PORT,
    DESKTOP_STREAM_PORT,
    TERMINAL_STREAM_PORT,
    CapabilityDescriptor,
    select_backend,
)
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
    StreamPortUnavailable,
    Unsupported,
)

if TYPE_CHECKING:
    from modal.types import FileInfo

    from sandbox.settings import Settings

__all__ = [
    "ModalBoxSession",
    "ModalProvider",
    "ModalSdk",
    "ModalSettings",
    "build_provider",
    "modal_snapshot_id",
]

BACKEND: Final = "modal"
CREATED_TAG: Final = "sandbox.created_at"
HOME_DIR: Final = "/root"
SCRATCH_DIR: Final = "/tmp"
EXEC_READINESS_TIMEOUT_SECONDS: Final = 60.0
DEFAULT_EXPOSED_PORTS: Final = (DESKTOP_STREAM_PORT, TERMINAL_STREAM_PORT, BROWSER_CONTROL_PORT)
_KEEPALIVE_CMD: Final = ("sleep", "infinity")
_TUNNELS_TIMEOUT: Final = 50
_MAX_KEY_LEN: Final = 512
# Upstream's native snapshot references (reference §10.3): a prefix line, then JSON with the image id.
_NATIVE_REF_PREFIXES: Final = ("MODAL_SANDBOX_FS_SNAPSHOT_V1\n", "MODAL_SANDBOX_DIR_SNAPSHOT_V1\n")
_GONE_MESSAGE: Final = re.compile(r"^Modal sandbox (\S+) (is no longer running\.|not found \(has been terminated\))$")
_TRANSIENT_GRPC: Final = frozenset({"CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE"})

_T = TypeVar("_T")

WorkspacePersistence = Literal["tar", "snapshot_filesystem", "snapshot_directory"]


# -- settings ------------------------------------------------------------------------------------


class ModalSettings(BaseSettings):
    """Settings of the Modal backend (environment prefix ``SANDBOX_MODAL_``); validated offline."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_MODAL_", extra="ignore")

    app_name: str | None = Field(default=None, description="Modal App the sandboxes belong to (required).")
    token_id: SecretStr | None = Field(default=None, description="Modal token id (ak-...); with token_secret.")
    token_secret: SecretStr | None = Field(default=None, description="Modal token secret (as-...); with token_id.")
    image_ref: str | None = Field(default=None, description="Registry image for new boxes (digest-pinned).")
    image_id: str | None = Field(default=None, description="A Modal image id (im-...) for new boxes.")
    image_registry_secret: str | None = Field(default=None, description="Modal Secret name to pull image_ref.")
    timeout_seconds: int | None = Field(default=None, gt=0, description="Box lifetime; default the hard lifetime.")
    idle_timeout_seconds: int | None = Field(default=None, gt=0, description="Idle kill; default the lifetime.")
    environment: str | None = Field(default=None, description="Modal environment name.")
    workspace_persistence: WorkspacePersistence = "tar"
    snapshot_timeout_seconds: int = Field(default=55, gt=0, description="Deadline of one native snapshot.")
    exec_readiness_timeout_seconds: float = Field(default=EXEC_READINESS_TIMEOUT_SECONDS, gt=0)

    def validate(self) -> None:  # type: ignore[override]
        """Check the settings without any network call.

        Raises:
            SandboxConfigError: the app name is missing, only one half of the token pair is set,
                or an image id does not look like one.
        """
        if not (self.app_name or "").strip():
            raise SandboxConfigError(
                "[sandbox:modal] SANDBOX_MODAL_APP_NAME is required: set it to the Modal App that owns the sandboxes"
            )
        has_id = bool(self.token_id and self.token_id.get_secret_value())
        has_secret = bool(self.token_secret and self.token_secret.get_secret_value())
        if has_id != has_secret:
            missing = "SANDBOX_MODAL_TOKEN_SECRET" if has_id else "SANDBOX_MODAL_TOKEN_ID"
            raise SandboxConfigError(
                f"[sandbox:modal] SANDBOX_MODAL_TOKEN_ID and SANDBOX_MODAL_TOKEN_SECRET must be set together "
                f"or both left unset (to use ~/.modal.toml or MODAL_TOKEN_*): {missing} is missing"
            )
        if self.image_id is not None and not self.image_id.startswith("im-"):
            raise SandboxConfigError("[sandbox:modal] SANDBOX_MODAL_IMAGE_ID must be a Modal image id (im-...)")
        if self.image_registry_secret and not self.image_ref:
            raise SandboxConfigError(
                "[sandbox:modal] SANDBOX_MODAL_IMAGE_REGISTRY_SECRET is set but SANDBOX_MODAL_IMAGE_REF is not"
            )


# -- the typed surface of the SDK we use ---------------------------------------------------------


class ModalApp(Protocol):
    """``modal.App`` as returned by ``App.lookup``."""

    @property
    def app_id(self) -> str: ...


class ModalImage(Protocol):
    """``modal.Image``; ``object_id`` is ``im-...`` once the image is built or looked up."""

    @property
    def object_id(self) -> str: ...


class ModalTunnel(Protocol):
    """``modal.Tunnel``: the public TLS socket of an encrypted port."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class _Call0(Protocol):
    def aio(self) -> Awaitable[Any]: ...


class _ReadCall(Protocol):
    def aio(self) -> Awaitable[bytes | str]: ...


class _WaitCall(Protocol):
    def aio(self) -> Awaitable[int]: ...


class _PollCall(Protocol):
    def aio(self) -> Awaitable[int | None]: ...


class ModalStreamReader(Protocol):
    """``modal.io_streams.StreamReader``."""

    @property
    def read(self) -> _ReadCall: ...


class ModalStreamWriter(Protocol):
    """``modal.io_streams.StreamWriter``."""

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    @property
    def drain(self) -> _Call0: ...


class ModalProcess(Protocol):
    """``modal.container_process.ContainerProcess``."""

    @property
    def stdout(self) -> ModalStreamReader: ...

    @property
    def stderr(self) -> ModalStreamReader: ...

    @property
    def stdin(self) -> ModalStreamWriter: ...

    @property
    def wait(self) -> _WaitCall: ...


class _PathCall(Protocol):
    def aio(self, remote_path: str) -> Awaitable[Any]: ...


class _ReadBytesCall(Protocol):
    def aio(self, remote_path: str) -> Awaitable[bytes]: ...


class _WriteBytesCall(Protocol):
    def aio(self, data: bytes, remote_path: str) -> Awaitable[None]: ...


class _ListFilesCall(Protocol):
    def aio(self, remote_path: str) -> Awaitable[list[FileInfo]]: ...


class ModalFilesystem(Protocol):
    """``modal.sandbox.SandboxFilesystem`` (``Sandbox.filesystem``)."""

    @property
    def read_bytes(self) -> _ReadBytesCall: ...

    @property
    def write_bytes(self) -> _WriteBytesCall: ...

    @property
    def list_files(self) -> _ListFilesCall: ...

    @property
    def stat(self) -> _PathCall: ...


class _ExecCall(Protocol):
    def aio(
        self,
        *args: str,
        timeout: int | None = ...,
        workdir: str | None = ...,
        env: dict[str, str | None] | None = ...,
        text: bool = ...,
    ) -> Awaitable[ModalProcess]: ...


class _TunnelsCall(Protocol):
    def aio(self, timeout: int = ...) -> Awaitable[Mapping[int, ModalTunnel]]: ...


class _SnapshotFsCall(Protocol):
    def aio(self, timeout: int = ..., *, ttl: int | None = ...) -> Awaitable[ModalImage]: ...


class _SnapshotDirCall(Protocol):
    def aio(self, path: str, *, timeout: int = ..., ttl: int | None = ...) -> Awaitable[ModalImage]: ...


class _MountImageCall(Protocol):
    def aio(self, path: str, image: ModalImage) -> Awaitable[None]: ...


class _GetTagsCall(Protocol):
    def aio(self) -> Awaitable[dict[str, str]]: ...


class ModalSandbox(Protocol):
    """``modal.Sandbox`` (a handle on one sandbox)."""

    @property
    def object_id(self) -> str: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def filesystem(self) -> ModalFilesystem: ...

    @property
    def exec(self) -> _ExecCall: ...

    @property
    def poll(self) -> _PollCall: ...

    @property
    def terminate(self) -> _Call0: ...

    @property
    def tunnels(self) -> _TunnelsCall: ...

    @property
    def get_tags(self) -> _GetTagsCall: ...

    @property
    def snapshot_filesystem(self) -> _SnapshotFsCall: ...

    @property
    def snapshot_directory(self) -> _SnapshotDirCall: ...

    @property
    def mount_image(self) -> _MountImageCall: ...


class _CreateCall(Protocol):
    def aio(
        self,
        *args: str,
        app: ModalApp | None = ...,
        name: str | None = ...,
        tags: dict[str, str] | None = ...,
        image: ModalImage | None = ...,
        env: dict[str, str | None] | None = ...,
        secrets: Sequence[Any] | None = ...,
        timeout: int | None = ...,
        idle_timeout: int | None = ...,
        workdir: str | None = ...,
        encrypted_ports: Sequence[int] = ...,
        client: Any | None = ...,
    ) -> Awaitable[ModalSandbox]: ...


class _FromIdCall(Protocol):
    def aio(self, sandbox_id: str, client: Any | None = ...) -> Awaitable[ModalSandbox]: ...


class _FromNameCall(Protocol):
    def aio(
        self, app_name: str, name: str, *, environment_name: str | None = ..., client: Any | None = ...
    ) -> Awaitable[ModalSandbox]: ...


class _ListCall(Protocol):
    def aio(
        self, *, app_id: str | None = ..., tags: dict[str, str] | None = ..., client: Any | None = ...
    ) -> AsyncIterator[ModalSandbox]: ...


class ModalSandboxApi(Protocol):
    """The class-level calls of ``modal.Sandbox``."""

    @property
    def create(self) -> _CreateCall: ...

    @property
    def from_id(self) -> _FromIdCall: ...

    @property
    def from_name(self) -> _FromNameCall: ...

    @property
    def list(self) -> _ListCall: ...


class _LookupCall(Protocol):
    def aio(
        self,
        name: str,
        *,
        client: Any | None = ...,
        environment_name: str | None = ...,
        create_if_missing: bool = ...,
    ) -> Awaitable[ModalApp]: ...


class ModalAppApi(Protocol):
    """The class-level calls of ``modal.App``."""

    @property
    def lookup(self) -> _LookupCall: ...


class ModalImageApi(Protocol):
    """The class-level constructors of ``modal.Image`` (both lazy: nothing is sent until used)."""

    def from_registry(self, tag: str, secret: Any | None = ...) -> ModalImage: ...

    def from_id(self, image_id: str, client: Any | None = ...) -> ModalImage: ...


class ModalSecretApi(Protocol):
    """``modal.Secret.from_name`` (lazy)."""

    def from_name(self, name: str, *, environment_name: str | None = ...) -> Any: ...


class _FromCredentialsCall(Protocol):
    def aio(self, token_id: str, token_secret: str) -> Awaitable[Any]: ...


class ModalClientApi(Protocol):
    """``modal.Client.from_credentials``."""

    @property
    def from_credentials(self) -> _FromCredentialsCall: ...


class _ImageDeleteCall(Protocol):
    def aio(self, image_id: str, *, client: Any | None = ...) -> Awaitable[None]: ...


class ModalSdk(Protocol):
    """Everything the provider uses from the ``modal`` package (the real module or a fake)."""

    @property
    def App(self) -> ModalAppApi: ...  # noqa: N802 - the SDK's own names

    @property
    def Sandbox(self) -> ModalSandboxApi: ...  # noqa: N802

    @property
    def Image(self) -> ModalImageApi: ...  # noqa: N802

    @property
    def Secret(self) -> ModalSecretApi: ...  # noqa: N802

    @property
    def Client(self) -> ModalClientApi: ...  # noqa: N802

    @property
    def image_delete(self) -> _ImageDeleteCall: ...


class _RealModalSdk:
    """The ``modal`` package seen through :class:`ModalSdk` (``image_delete`` lives in ``modal.experimental``)."""

    def __init__(self) -> None:
        import modal
        import modal.experimental

        self.App = modal.App
        self.Sandbox = modal.Sandbox
        self.Image = modal.Image
        self.Secret = modal.Secret
        self.Client = modal.Client
        self.image_delete = modal.experimental.image_delete


def real_sdk() -> ModalSdk:
    """The installed ``modal`` SDK behind the :class:`ModalSdk` protocol."""
    return cast(ModalSdk, _RealModalSdk())


# -- error translation -----------------------------------------------------------------------------


def _grpc_status_name(err: BaseException) -> str | None:
    import grpclib

    if isinstance(err, grpclib.GRPCError) and type(err) is grpclib.GRPCError:
        return err.status.name
    return None


def _error_rows() -> tuple[Row, ...]:
    # Built on first use, as the SDK itself is imported: only a worker that runs Modal boxes pays for it.
    import grpclib.exceptions
    import modal.exception as mx

    transient = "{subject}: transient failure ({name}: {text})"
    refused = "{subject}: credentials rejected ({name}: {text})"
    quota = "{subject}: quota or rate limit ({name}: {text})"
    return (
        # Transient signals win over everything else (upstream ``classifyProviderSandboxFailure``).
        Row(
            (
                mx.ConnectionError,
                mx.ServiceError,
                mx.InternalError,
                mx.InternalFailure,
                mx.ClientClosed,
                mx.TimeoutError,
                grpclib.exceptions.StreamTerminatedError,
                OSError,
                asyncio.TimeoutError,
            ),
            ProviderUnavailable,
            transient,
        ),
        Row(BaseException, ProviderUnavailable, transient, code=_TRANSIENT_GRPC),
        Row((mx.AuthError, mx.PermissionDeniedError), ProviderAuthError, refused),
        Row(BaseException, ProviderAuthError, refused, code={"UNAUTHENTICATED", "PERMISSION_DENIED"}),
        Row(mx.ResourceExhaustedError, ProviderQuotaError, quota),
        Row(BaseException, ProviderQuotaError, quota, code={"RESOURCE_EXHAUSTED"}),
        Row(
            (mx.NotFoundError, mx.SandboxTerminatedError), BoxNotFound, "{subject} not found ({name}: {text})", box=True
        ),
        Row(BaseException, BoxNotFound, "{subject} not found ({name}: {text})", code={"NOT_FOUND"}, box=True),
    )


_ERRORS: Final = ErrorTable(_error_rows, default="{subject}: {name}: {text}", code_of=_grpc_status_name)
"""The module docstring's table; the rows marked ``box`` hold only for an op on a known sandbox."""


def _translate(err: BaseException, *, sandbox_id: str | None = None) -> ProviderError:
    """:data:`_ERRORS` for an op on ``sandbox_id`` (None: not about a box, so never NotFound).

    An upstream terminal message that names this very sandbox is proof it is gone, unless a
    transient, credential or quota signal decided first. This does not confirm liveness:
    :meth:`ModalBoxSession._failed` does that for errors the SDK blurs.
    """
    subject = f"Modal sandbox {sandbox_id}" if sandbox_id else "Modal"
    translated = _ERRORS.translate(err, box_op=sandbox_id is not None, subject=subject)
    if sandbox_id is None or isinstance(translated, ProviderUnavailable | ProviderAuthError | ProviderQuotaError):
        return translated
    text = str(err) or type(err).__name__
    match = _GONE_MESSAGE.fullmatch(text)
    if match is not None and match.group(1) == sandbox_id:
        return BoxNotFound(text)
    return translated


def _modal_errors() -> tuple[type[BaseException], ...]:
    import grpclib
    import grpclib.exceptions
    import modal.exception as mx

    return (mx.Error, grpclib.GRPCError, grpclib.exceptions.StreamTerminatedError, OSError, asyncio.TimeoutError)


def _is_modal_error(err: BaseException) -> bool:
    return isinstance(err, _modal_errors())


def _mapped() -> contextlib.AbstractContextManager[None]:
    """Raise a Modal (or transport) error of a call about no one box through :data:`_ERRORS`; others propagate."""
    return _ERRORS.mapped(box_op=False, catch=_modal_errors(), subject="Modal")


def modal_snapshot_id(native_id: str) -> str:
    """The image id of a native snapshot: ``im-...`` itself, or the id inside an upstream native reference.

    Raises:
        InvalidRequest: the text is neither an image id nor a Modal snapshot reference.
    """
    for prefix in _NATIVE_REF_PREFIXES:
        if native_id.startswith(prefix):
            try:
                payload = json.loads(native_id[len(prefix) :])
            except ValueError:
                payload = None
            snapshot_id = payload.get("snapshot_id") if isinstance(payload, dict) else None
            if not isinstance(snapshot_id, str) or not snapshot_id:
                raise InvalidRequest("malformed Modal snapshot reference: no snapshot_id")
            return snapshot_id
    if not native_id.startswith("im-"):
        raise InvalidRequest(f"not a Modal snapshot image id (im-...): {native_id!r}")
    return native_id


def _sandbox_name(idempotency_key: str) -> str:
    """A Modal sandbox name unique per key (names: <= 64 chars of ``[A-Za-z0-9._-]``)."""
    return "sbx-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]


# -- the provider ----------------------------------------------------------------------------------


class ModalProvider(RemoteWorkspaceSnapshots):
    """Modal Sandboxes as boxes.

    Args:
        settings: The backend's settings (``SANDBOX_MODAL_*``).
        sdk: The SDK entry points; None uses the installed ``modal`` package (tests pass a fake).
        exposed_ports: Ports pre-declared as encrypted tunnels at create (Modal cannot open ports later).
    """

    def __init__(
        self,
        settings: ModalSettings,
        *,
        sdk: ModalSdk | None = None,
        exposed_ports: Sequence[int] = DEFAULT_EXPOSED_PORTS,
    ) -> None:
        self._settings = settings
        self._sdk_override = sdk
        self._sdk: ModalSdk | None = sdk
        self._ports = tuple(dict.fromkeys(int(p) for p in exposed_ports))
        for port in self._ports:
            if not 1 <= port <= 65535:
                raise SandboxConfigError(f"[sandbox:modal] exposed port out of range: {port}")
        self._client: Any | None = None
        self._client_ready = False
        self._app: ModalApp | None = None
        self._setup_lock = asyncio.Lock()
        self.remote_workspace = RemoteWorkspace(
            workspace_root=self.descriptor.workspace_root, home_dir=HOME_DIR, scratch_dir=SCRATCH_DIR
        )

    # -- protocol surface -----------------------------------------------------------------------

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of the ``modal`` backend."""
        return select_backend(BACKEND)

    @property
    def backend_id(self) -> str:
        """``modal``."""
        return self.descriptor.backend_id

    @property
    def settings(self) -> ModalSettings:
        """The backend settings this provider was built with."""
        return self._settings

    @property
    def exposed_ports(self) -> tuple[int, ...]:
        """The ports every new box pre-declares as encrypted tunnels."""
        return self._ports

    @property
    def box_timeout_seconds(self) -> int:
        """The ``timeout`` (hard lifetime) given to new boxes: the setting, else the descriptor's 24 h."""
        if self._settings.timeout_seconds is not None:
            return self._settings.timeout_seconds
        hard_ms = self.descriptor.lifetime.hard_lifetime_ms
        return math.ceil(hard_ms / 1000) if hard_ms else 24 * 3600

    @property
    def idle_timeout_seconds(self) -> int:
        """The idle timeout of new boxes: the setting, else the hard lifetime (upstream default)."""
        return self._settings.idle_timeout_seconds or self.box_timeout_seconds

    def validate_credentials(self) -> None:
        """Check the settings offline.

        Raises:
            SandboxConfigError: a setting is missing or contradictory; the message names it.
        """
        self._settings.validate()

    async def create(self, spec: BoxSpec, idempotency_key: str) -> ModalBoxSession:
        """Adopt the running box created under ``idempotency_key``, or create it, then wait until it runs commands.

        Raises:
            InvalidRequest: empty or oversized key.
            Unsupported: a non-Linux box was asked for.
            ProviderUnavailable: Modal failed transiently, or the box did not run ``true`` in time.
            ProviderAuthError / ProviderQuotaError / ProviderError: as the module table says.
        """
        if not idempotency_key or len(idempotency_key) > _MAX_KEY_LEN:
            raise InvalidRequest(f"idempotency key must be 1..{_MAX_KEY_LEN} characters")
        if spec.os != "linux":
            raise Unsupported(f"Modal runs Linux boxes only, not {spec.os!r}")
        self.validate_credentials()
        sdk, client, app = await self._setup()
        sandbox = await self._adopt(sdk, client, app, idempotency_key)
        if sandbox is None:
            sandbox = await self._create(sdk, client, app, spec, idempotency_key)
        session = ModalBoxSession(self, sandbox, lease_id=spec.lease_id, key=idempotency_key, app_id=app.app_id)
        await session.wait_ready(self._settings.exec_readiness_timeout_seconds)
        return session

    async def resume(self, envelope: Envelope) -> ModalBoxSession:
        """Find the box again by its sandbox id.

        Raises:
            InvalidRequest: the envelope is not a Modal one.
            BoxNotFound: Modal does not know the sandbox, or it has finished.
            ProviderUnavailable: transient failure (never reported as NotFound).
        """
        sandbox_id = self._sandbox_id(envelope)
        sdk, client, _ = await self._setup()
        sandbox = await self._from_id(sdk, client, sandbox_id)
        if sandbox.returncode is not None:
            raise BoxNotFound(f"Modal sandbox {sandbox_id} is no longer running.")
        state = envelope.state
        return ModalBoxSession(
            self,
            sandbox,
            lease_id=_str_or_none(state.get("lease_id")),
            key=_str_or_none(state.get("idempotency_key")),
            app_id=_str_or_none(state.get("app_id")),
        )

    async def terminate(self, envelope: Envelope) -> None:
        """Terminate the sandbox; a sandbox Modal no longer knows, or one already finished, is no error.

        Raises:
            InvalidRequest: the envelope is not a Modal one.
            ProviderUnavailable: transient failure; retry.
        """
        sandbox_id = self._sandbox_id(envelope)
        sdk, client, _ = await self._setup()
        try:
            sandbox = await self._from_id(sdk, client, sandbox_id)
            await sandbox.terminate.aio()
        except BoxNotFound:
            return
        except Exception as err:
            if not _is_modal_error(err):
                raise
            translated = _translate(err, sandbox_id=sandbox_id)
            if isinstance(translated, BoxNotFound):
                return
            raise translated from err

    async def list_owned(self) -> list[OwnedBox]:
        """The running sandboxes of the app that carry our lease tag (for the orphan sweep).

        Raises:
            ProviderUnavailable / ProviderAuthError: listing failed.
        """
        sdk, client, app = await self._setup()
        owned: list[OwnedBox] = []
        with _mapped():
            async for sandbox in sdk.Sandbox.list.aio(app_id=app.app_id, client=client):
                if sandbox.returncode is not None:
                    continue
                try:
                    tags = await sandbox.get_tags.aio()
                except Exception as err:
                    translated = _translate(err, sandbox_id=sandbox.object_id) if _is_modal_error(err) else None
                    if isinstance(translated, BoxNotFound):
                        continue  # it finished while we listed
                    raise
                if box_labels.LEASE_ID not in tags:
                    continue
                created = tags.get(CREATED_TAG)
                owned.append(
                    box_labels.owned_box(
                        sandbox.object_id,
                        tags,
                        created_at=float(created) if created and _is_number(created) else None,
                    )
                )
        return owned

    async def aclose(self) -> None:
        """Forget the cached client and app (the SDK's client closes with the process)."""
        self._client = None
        self._client_ready = False
        self._app = None

    @property
    def native_workspace_snapshots(self) -> bool:
        """Whether leases persist this provider's workspaces as Modal directory snapshots.

        True for ``SANDBOX_MODAL_WORKSPACE_PERSISTENCE=snapshot_directory``: the lease snapshots the
        workspace root and mounts it back on restore; HOME is not kept. ``snapshot_filesystem`` images
        can only seed a new box (``BoxSpec.image``), which the lease does not do, so with it (and with
        ``tar``) the lease keeps portable tar archives.
        """
        return self._settings.workspace_persistence == "snapshot_directory"

    async def snapshot_native(
        self,
        envelope: Envelope,
        *,
        ttl_seconds: int | None,
        kind: Literal["filesystem", "directory"] | None = None,
    ) -> str:
        """Take a Modal-native snapshot of the box and return its image id (``im-...``).

        ``kind`` ``filesystem`` snapshots the whole container filesystem (create a box from it by
        passing the id as ``BoxSpec.image``); ``directory`` snapshots the workspace root only (put it
        back with :meth:`mount_native`). The default follows ``SANDBOX_MODAL_WORKSPACE_PERSISTENCE``
        (``snapshot_directory`` → directory, otherwise filesystem). ``ttl_seconds`` is how long Modal
        keeps the image (decided by the snapshot ledger); None keeps it until deleted.

        Raises:
            BoxNotFound: the box is gone.
            ProviderUnavailable: transient failure or the snapshot did not finish within its timeout.
            ProviderError: Modal could not make the snapshot.
        """
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidRequest(f"ttl_seconds must be > 0 or None, not {ttl_seconds}")
        if kind is None:
            kind = "directory" if self._settings.workspace_persistence == "snapshot_directory" else "filesystem"
        session = await self.resume(envelope)
        timeout = self._settings.snapshot_timeout_seconds
        if kind == "directory":
            image = await session.call(
                session.sandbox.snapshot_directory.aio(self.descriptor.workspace_root, timeout=timeout, ttl=ttl_seconds)
            )
        else:
            image = await session.call(session.sandbox.snapshot_filesystem.aio(timeout, ttl=ttl_seconds))
        return image.object_id

    async def mount_native(self, envelope: Envelope, native_id: str) -> None:
        """Mount a directory snapshot over the box's workspace root (Modal ``mount_image``).

        Raises:
            BoxNotFound: the box is gone.
            ProviderError: the image is unknown or cannot be mounted.
        """
        image_id = modal_snapshot_id(native_id)
        session = await self.resume(envelope)
        sdk, client, _ = await self._setup()
        image = sdk.Image.from_id(image_id, client=client)
        await session.call(session.sandbox.mount_image.aio(self.descriptor.workspace_root, image))

    async def delete_snapshot(self, native_id: str) -> None:
        """Delete a native snapshot image; one that is already gone is no error.

        Raises:
            InvalidRequest: ``native_id`` is not a Modal image id or snapshot reference.
            ProviderUnavailable: transient failure; retry later.
        """
        image_id = modal_snapshot_id(native_id)
        sdk, client, _ = await self._setup()
        import modal.exception as mx

        with _mapped():
            try:
                await sdk.image_delete.aio(image_id, client=client)
            except mx.NotFoundError:
                return

    # -- internals ------------------------------------------------------------------------------

    async def _setup(self) -> tuple[ModalSdk, Any | None, ModalApp]:
        """The SDK, the client (None: the SDK's own credentials) and the app, created once."""
        if self._app is not None and self._sdk is not None:
            return self._sdk, self._client, self._app
        async with self._setup_lock:
            if self._sdk is None:
                self._sdk = await asyncio.to_thread(real_sdk)
            sdk = self._sdk
            settings = self._settings
            settings.validate()
            with _mapped():
                if not self._client_ready:
                    if settings.token_id is not None and settings.token_secret is not None:
                        self._client = await sdk.Client.from_credentials.aio(
                            settings.token_id.get_secret_value(), settings.token_secret.get_secret_value()
                        )
                    self._client_ready = True
                if self._app is None:
                    self._app = await sdk.App.lookup.aio(
                        settings.app_name or "",
                        client=self._client,
                        environment_name=settings.environment,
                        create_if_missing=True,
                    )
            return sdk, self._client, self._app

    def _sandbox_id(self, envelope: Envelope) -> str:
        if envelope.backend_id != self.backend_id:
            raise InvalidRequest(f"not a Modal envelope (backend {envelope.backend_id!r})")
        sandbox_id = _str_or_none(envelope.state.get("sandbox_id")) or envelope.instance_id
        if not sandbox_id:
            raise InvalidRequest("the Modal envelope names no sandbox id")
        return sandbox_id

    async def _from_id(self, sdk: ModalSdk, client: Any | None, sandbox_id: str) -> ModalSandbox:
        try:
            return await sdk.Sandbox.from_id.aio(sandbox_id, client=client)
        except Exception as err:
            if not _is_modal_error(err):
                raise
            import modal.exception as mx

            if isinstance(err, mx.InvalidError):
                # A malformed id names no sandbox Modal could ever have made.
                raise BoxNotFound(f"Modal sandbox {sandbox_id} not found (malformed id: {err})") from err
            raise _translate(err, sandbox_id=sandbox_id) from err

    async def _adopt(self, sdk: ModalSdk, client: Any | None, app: ModalApp, key: str) -> ModalSandbox | None:
        with _mapped():
            async for sandbox in sdk.Sandbox.list.aio(app_id=app.app_id, tags={box_labels.KEY: key}, client=client):
                if sandbox.returncode is None:
                    return sandbox
        return None

    def _image(self, sdk: ModalSdk, client: Any | None, spec: BoxSpec) -> ModalImage | None:
        settings = self._settings
        ref = spec.image
        if ref and ref.startswith(_NATIVE_REF_PREFIXES + ("im-",)):
            return sdk.Image.from_id(modal_snapshot_id(ref), client=client)
        if ref:
            return sdk.Image.from_registry(ref)
        if settings.image_id:
            return sdk.Image.from_id(settings.image_id, client=client)
        if settings.image_ref:
            secret = None
            if settings.image_registry_secret:
                secret = sdk.Secret.from_name(settings.image_registry_secret, environment_name=settings.environment)
            return sdk.Image.from_registry(settings.image_ref, secret=secret)
        return None  # Modal's default image

    async def _create(self, sdk: ModalSdk, client: Any | None, app: ModalApp, spec: BoxSpec, key: str) -> ModalSandbox:
        import modal.exception as mx

        name = _sandbox_name(key)
        tags = {
            box_labels.LEASE_ID: spec.lease_id,
            box_labels.KEY: key,
            CREATED_TAG: str(int(time.time())),
            box_labels.EPOCH: str(spec.epoch),
            "sandbox.workspace_id": spec.workspace_id,
            "sandbox.group_id": spec.group_id,
        }
        env: dict[str, str | None] = dict(spec.environment)
        with _mapped():
            try:
                return await sdk.Sandbox.create.aio(
                    *_KEEPALIVE_CMD,
                    app=app,
                    name=name,
                    tags=tags,
                    image=self._image(sdk, client, spec),
                    env=env,
                    timeout=self.box_timeout_seconds,
                    idle_timeout=self.idle_timeout_seconds,
                    workdir=self.descriptor.workspace_root,
                    encrypted_ports=list(self._ports),
                    client=client,
                )
            except mx.AlreadyExistsError:
                pass  # a racing create with the same key won: adopt its box below
        try:
            return await sdk.Sandbox.from_name.aio(
                self._settings.app_name or "", name, environment_name=self._settings.environment, client=client
            )
        except Exception as err:
            if not _is_modal_error(err):
                raise
            translated = _translate(err)
            if isinstance(err, mx.NotFoundError):
                # The winner finished between its create and our lookup: the caller retries.
                translated = ProviderUnavailable(f"Modal sandbox {name} vanished while adopting it; retry")
            raise translated from err


# -- the session -----------------------------------------------------------------------------------


class ModalBoxSession:
    """A handle on one running Modal sandbox. Relative paths are under the workspace root."""

    def __init__(
        self,
        provider: ModalProvider,
        sandbox: ModalSandbox,
        *,
        lease_id: str | None,
        key: str | None,
        app_id: str | None,
    ) -> None:
        self._provider = provider
        self._sandbox = sandbox
        self._lease_id = lease_id
        self._key = key
        self._app_id = app_id
        self._root = provider.descriptor.workspace_root
        self._tunnels: dict[int, ModalTunnel] | None = None

    @property
    def instance_id(self) -> str:
        """The sandbox id (``sb-...``)."""
        return self._sandbox.object_id

    @property
    def sandbox(self) -> ModalSandbox:
        """The SDK handle (for callers that need a Modal-only feature)."""
        return self._sandbox

    def serialize_state(self) -> Envelope:
        """The envelope :meth:`ModalProvider.resume` needs: the sandbox id (plus the lease and key)."""
        state: dict[str, Any] = {"sandbox_id": self.instance_id}
        for name, value in (("lease_id", self._lease_id), ("idempotency_key", self._key), ("app_id", self._app_id)):
            if value is not None:
                state[name] = value
        return Envelope(backend_id=BACKEND, instance_id=self.instance_id, state=state)

    async def call(self, awaitable: Awaitable[_T]) -> _T:
        """Await one SDK call on this sandbox and translate its errors (liveness confirmed by ``poll``)."""
        try:
            return await awaitable
        except Exception as err:
            raise await self._failed(err) from err

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in the sandbox (bytes in, bytes out) and wait for it.

        Modal's exec timeout is whole seconds (rounded up); the exact ``timeout`` is also enforced
        here, and a process Modal reports as timed out (return code -1) is an ``ExecTimeout`` too.

        Raises:
            InvalidRequest: empty command or a bad timeout.
            ExecTimeout: the command ran past ``timeout``.
            BoxNotFound: the sandbox is gone.
            ProviderUnavailable: transient failure.
        """
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
            raise InvalidRequest("cmd must be a non-empty argv of strings without NUL bytes")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, not {timeout}")
        call_env: dict[str, str | None] | None = dict(env) if env else None
        modal_timeout = math.ceil(timeout) if timeout is not None else None

        async def run() -> ExecResult:
            process = await self._sandbox.exec.aio(
                *argv, timeout=modal_timeout, workdir=self._abs(workdir or "."), env=call_env, text=False
            )
            if stdin is not None:
                process.stdin.write(stdin)
                process.stdin.write_eof()
                await process.stdin.drain.aio()
            out, err, code = await asyncio.gather(
                process.stdout.read.aio(), process.stderr.read.aio(), process.wait.aio()
            )
            return ExecResult(exit_code=code, stdout=_as_bytes(out), stderr=_as_bytes(err))

        started = time.monotonic()
        try:
            if timeout is None:
                result = await run()
            else:
                result = await asyncio.wait_for(run(), timeout)
        except TimeoutError as err:
            # wait_for's own deadline (the SDK raises modal.exception.TimeoutError, not this one).
            if timeout is not None and time.monotonic() - started >= timeout * 0.99:
                raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout", timeout=timeout) from None
            raise await self._failed(err) from err
        except Exception as err:
            raise await self._failed(err) from err
        if result.exit_code == -1 and timeout is not None:
            raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout and was killed", timeout=timeout)
        return result

    async def read_file(self, path: str) -> bytes:
        """Read a whole file (binary-safe).

        Raises:
            PathNotFound: the file does not exist.
            BoxNotFound: the sandbox is gone.
        """
        target = self._abs(path)
        try:
            data = await self._sandbox.filesystem.read_bytes.aio(target)
        except Exception as err:
            raise await self._failed(err, path=target) from err
        return bytes(data)

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parent directories.

        Raises:
            PathNotFound: a parent is not a directory.
            BoxNotFound: the sandbox is gone.
        """
        target = self._abs(path)
        try:
            await self._sandbox.filesystem.write_bytes.aio(bytes(data), target)
        except Exception as err:
            raise await self._failed(err, path=target) from err

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level, sorted by name.

        Raises:
            PathNotFound: the directory does not exist (or is not a directory).
            BoxNotFound: the sandbox is gone.
        """
        target = self._abs(path)
        try:
            infos = await self._sandbox.filesystem.list_files.aio(target)
        except Exception as err:
            raise await self._failed(err, path=target) from err
        entries = [
            DirEntry(name=info.name, kind=_KIND.get(info.type.value, "other"), size=info.size, mode=info.mode & 0o7777)
            for info in infos
        ]
        return sorted(entries, key=lambda e: e.name)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the sandbox.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        target = self._abs(path)
        try:
            await self._sandbox.filesystem.stat.aio(target)
        except Exception as err:
            translated = await self._failed(err, path=target)
            if isinstance(translated, PathNotFound):
                return False
            raise translated from err
        return True

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The public TLS endpoint of a pre-declared encrypted port (Modal tunnel).

        Raises:
            InvalidRequest: not a port number.
            StreamPortUnavailable: the port was not pre-declared when the box was created.
            BoxNotFound: the sandbox is gone.
        """
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be 1..65535, not {port}")
        if self._tunnels is None or port not in self._tunnels:
            tunnels = await self.call(self._sandbox.tunnels.aio(_TUNNELS_TIMEOUT))
            self._tunnels = dict(tunnels)
        tunnel = self._tunnels.get(port)
        if tunnel is None:
            declared = ", ".join(str(p) for p in sorted(self._tunnels)) or "none"
            raise StreamPortUnavailable(
                f"Modal sandbox {self.instance_id} has no tunnel for port {port} (declared: {declared}); "
                "Modal opens ports only at create"
            )
        if not tunnel.host or not 1 <= tunnel.port <= 65535:
            raise StreamPortUnavailable(f"Modal returned a malformed tunnel for port {port}")
        return Endpoint(host=tunnel.host, port=tunnel.port, tls=True)

    async def wait_ready(self, budget: float) -> None:
        """Run ``true`` until it exits 0 (upstream ``verifySandboxExecReadiness``).

        Raises:
            BoxNotFound: the sandbox finished while starting.
            ProviderUnavailable: ``exec_probe_timeout``/``exec_probe_failed`` within ``budget`` seconds.
        """
        deadline = time.monotonic() + budget
        last: str = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProviderUnavailable(
                    f"exec_probe_timeout: Modal sandbox {self.instance_id} did not run `true` "
                    f"within {budget} s ({last})"
                )
            try:
                done = await self.exec(["true"], workdir="/", timeout=max(min(remaining, 10.0), 0.1))
            except (ProviderUnavailable, ExecTimeout) as err:
                last = f"exec_probe_unavailable: {err.message}"
            else:
                if done.exit_code == 0:
                    return
                last = f"exec_probe_failed: exit {done.exit_code}"
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    # -- internals ------------------------------------------------------------------------------

    def _abs(self, path: str) -> str:
        joined = posixpath.normpath(posixpath.join(self._root, path))
        return "/" + joined.lstrip("/")

    async def _failed(self, err: BaseException, *, path: str | None = None) -> ProviderError:
        """Our error for ``err`` raised by an op on this sandbox, with liveness confirmed where the SDK blurs it."""
        import modal.exception as mx

        if isinstance(err, ProviderError):
            return err
        if not _is_modal_error(err):
            return ProviderError(f"Modal sandbox {self.instance_id}: unexpected {type(err).__name__}: {err}")
        if path is not None and isinstance(
            err, (mx.SandboxFilesystemNotFoundError, mx.SandboxFilesystemNotADirectoryError)
        ):
            return PathNotFound(f"{path} does not exist in the box ({err})", path=path)
        if isinstance(err, mx.SandboxFilesystemIsADirectoryError):
            return ProviderError(f"{path} is a directory, not a file ({err})")
        translated = _translate(err, sandbox_id=self.instance_id)
        if isinstance(translated, (ProviderAuthError, ProviderQuotaError)):
            return translated
        suspicious = isinstance(
            err, (mx.NotFoundError, mx.ConflictError, mx.SandboxTerminatedError, mx.SandboxFilesystemError)
        )
        if isinstance(translated, BoxNotFound) or suspicious:
            # NotFound from an op is not proof (the filesystem API reports transient failures as
            # NotFound): ask Modal whether the sandbox itself finished.
            gone = await self._finished()
            if gone is True:
                return BoxNotFound(f"Modal sandbox {self.instance_id} is no longer running.")
            if gone is None or isinstance(translated, BoxNotFound):
                return ProviderUnavailable(
                    f"Modal sandbox {self.instance_id}: {type(err).__name__}: {err} (the sandbox still runs; retry)"
                )
        return translated

    async def _finished(self) -> bool | None:
        """True if the sandbox finished or Modal no longer knows it, False if it runs, None if we cannot tell."""
        import modal.exception as mx

        try:
            code = await self._sandbox.poll.aio()
        except mx.NotFoundError:
            return True
        except Exception:
            return None
        return code is not None


_KIND: Final = {"file": "file", "directory": "dir", "symlink": "symlink"}


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def exposed_ports_for(settings: Settings) -> tuple[int, ...]:
    """The ports a Modal box pre-declares under the viewer policy (upstream §1.3): desktop, terminal, 7682."""
    ports: list[int] = []
    if settings.desktop_enabled:
        ports.append(DESKTOP_STREAM_PORT)
    if settings.terminal_enabled:
        ports.append(TERMINAL_STREAM_PORT)
    ports.append(BROWSER_CONTROL_PORT)
    return tuple(ports)


def build_provider(settings: Settings) -> ModalProvider:
    """The Modal provider for the worker: ``SANDBOX_MODAL_*`` from the environment, ports from the viewer policy."""
    return ModalProvider(ModalSettings(), exposed_ports=exposed_ports_for(settings))
