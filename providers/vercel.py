"""The ``vercel`` provider: boxes are Vercel Sandboxes, through the ``vercel`` SDK (``vercel.sandbox``).

SDK calls (all async, on one ``vercel.sandbox.SandboxClient`` built with explicit credentials):

- create: ``get_or_create_sandbox(name=..., ports, env, tags, execution_time_limit, persistent)``.
  Vercel sandboxes are addressed by a project-unique *name*, which is the id here
  (``sandboxId``): the name is ``sbx-`` and 32 hex digits of the SHA-256 of the idempotency key, so a
  retried create finds the sandbox the first attempt made and adopts it (a concurrent create that
  loses the race gets ``409`` and adopts the winner's). Tags ``sandbox.lease_id``, ``sandbox.key``,
  ``epoch`` and ``sandbox.managed_by=sandbox-runtime`` record the owner.
- resume: ``get_sandbox(name=...)``; the envelope keeps ``createdAt`` too, so a sandbox re-created
  under the same name after a terminate is not mistaken for the old one (``BoxNotFound``).
- exec: ``Sandbox.run_process("sh", ["-c", wrapper], cwd, env, kill_after, capture_output=True,
  input=stdin)``. Vercel streams process output as JSON text, which cannot carry arbitrary bytes, so
  the wrapper of :func:`providers.shell_exec.exec_script` sends the command's stdout and stderr to
  files in ``/tmp`` and prints them base64-encoded with the exit code: exec output is binary safe
  (it needs ``sh``, ``mktemp``, ``base64`` and ``tr`` in the image). The timeout is enforced here
  (the process is killed with ``Process.kill()``); ``kill_after`` is a server-side backstop a little
  later.
- files: ``fs.read_bytes`` / ``fs.write_bytes``; listings and existence checks run ``find``/``test``
  in the sandbox. Relative paths are under ``/vercel/sandbox``.
- ports: the ``routes`` of the sandbox (``https://sb-<id>.vercel.run``) for the ports declared at
  create (``SANDBOX_VERCEL_EXPOSED_PORTS``; preview URLs, no on-demand ports).
- terminate: ``Sandbox.destroy()`` (the sandbox and its files are removed); list_owned:
  ``query_sandboxes`` filtered by the ``sandbox.managed_by`` tag.

The 5 h hard lifetime of the descriptor is the default ``execution_time_limit``; the lease rotates
the box before it. Workspace snapshots are tar-only (:class:`~providers.remote_workspace.RemoteWorkspace`).

NotFound rule (upstream ``classifyProviderSandboxFailure``): transient signals win; then HTTP 404 or a
code ``404 NOT_FOUND RESOURCE_NOT_FOUND SANDBOX_NOT_FOUND`` (case-insensitive) is ``BoxNotFound``.
A missing *file* is the SDK's ``SandboxPathNotFoundError`` and never a NotFound of the box.

=================================================================  =====================
SDK error                                                          Raised here
=================================================================  =====================
``SandboxApiError`` 404 (``not_found``)                            BoxNotFound
``SandboxPathNotFoundError``                                       PathNotFound
``SandboxApiError`` 401 / 403; ``SandboxCredentialsError``         ProviderAuthError
``SandboxApiError`` 429                                            ProviderQuotaError
``SandboxApiError`` 408, 410 (session stopped), 5xx                ProviderUnavailable
``SandboxStreamError``, ``SandboxTimeoutError``,                   ProviderUnavailable
``SandboxTerminalStateError``, a truncated response stream;
httpx/httpx2 transport errors, ``anyio`` broken streams
exec past its timeout                                              ExecTimeout
``SandboxFilesystemWriteError``                                    its cause, translated
anything else (other 4xx, ``SandboxResponseError``)                ProviderError
=================================================================  =====================
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import urlsplit

import anyio
import httpx
import httpx2
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from vercel.sandbox import (
    Process,
    Sandbox,
    SandboxApiError,
    SandboxClient,
    SandboxCredentials,
    SandboxCredentialsError,
    SandboxError,
    SandboxFilesystemWriteError,
    SandboxPathNotFoundError,
    SandboxQueryByCreatedAt,
    SandboxServiceOptions,
    SandboxStreamError,
    SandboxTerminalStateError,
    SandboxTimeoutError,
    TagFilter,
)
from vercel.sandbox._internal.log_stream import _TruncatedStreamError

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import SERVER_ERRORS, ErrorTable, Row
from providers.shell_exec import LIST_DIR_SCRIPT, exec_script, parse_dir_listing, parse_exec_report
from sandbox.box import BoxSession, BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
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
    Unsupported,
)

if TYPE_CHECKING:
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "TAG_EPOCH",
    "VercelBoxSession",
    "VercelProvider",
    "VercelSettings",
    "build_provider",
    "sandbox_name_for_key",
]

BACKEND: Final = "vercel"
#: Vercel sandboxes carry the lease epoch under the bare tag ``epoch`` (the others: :mod:`providers.box_labels`).
TAG_EPOCH: Final = "epoch"
DEFAULT_API_URL: Final = "https://vercel.com/api"
# Past the exec timeout we kill the process ourselves; the server-side kill is only a backstop.
_SERVER_KILL_GRACE_SECONDS: Final = 30.0
_KILL_TIMEOUT_SECONDS: Final = 10.0
_NOT_FOUND_CODES: Final = frozenset({"404", "NOT_FOUND", "RESOURCE_NOT_FOUND", "SANDBOX_NOT_FOUND"})
_TRANSIENT_CODES: Final = frozenset(
    {"CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE", "ECONNRESET", "ECONNREFUSED",
     "ETIMEDOUT", "EAI_AGAIN", "ENOTFOUND"}
)  # fmt: skip
HttpxClientFactory = Callable[[], httpx2.AsyncClient]


class VercelSettings(BaseSettings):
    """Settings of the Vercel backend (environment prefix ``SANDBOX_VERCEL_``)."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_VERCEL_", extra="ignore")

    token: SecretStr | None = Field(default=None, description="Vercel access token.")
    project_id: str | None = Field(default=None, description="The Vercel project the sandboxes belong to.")
    team_id: str | None = Field(default=None, description="The team owning the project (unset for personal accounts).")
    runtime: str | None = Field(
        default=None, description="Base image of new sandboxes when the box spec names none (e.g. node22)."
    )
    api_url: str = Field(default=DEFAULT_API_URL, description="Base URL of the Sandbox API.")
    timeout_seconds: float = Field(
        default=5 * 3600.0, gt=0, le=5 * 3600.0, description="Execution time limit of a sandbox (Vercel: 5 h max)."
    )
    exposed_ports: list[int] = Field(
        default_factory=lambda: [6080, 7681, 7682], description="Ports given a preview URL at create."
    )

    def validate(self) -> None:  # type: ignore[override]  # pydantic's classmethod validate is deprecated
        """Check the settings offline.

        Raises:
            SandboxConfigError: the token or project id is missing, or a port is out of range.
        """
        if self.token is None or not self.token.get_secret_value():
            raise SandboxConfigError(
                "[sandbox:vercel] SANDBOX_VERCEL_TOKEN is not set; create an access token at "
                "https://vercel.com/account/tokens and set SANDBOX_VERCEL_TOKEN"
            )
        if not self.project_id:
            raise SandboxConfigError(
                "[sandbox:vercel] SANDBOX_VERCEL_PROJECT_ID is not set; set it to the id of the Vercel project "
                "the sandboxes belong to (prj_...)"
            )
        bad = [p for p in self.exposed_ports if not 1 <= p <= 65535]
        if bad:
            raise SandboxConfigError(f"[sandbox:vercel] SANDBOX_VERCEL_EXPOSED_PORTS has ports out of range: {bad}")
        if urlsplit(self.api_url).scheme not in ("http", "https"):
            raise SandboxConfigError(
                f"[sandbox:vercel] SANDBOX_VERCEL_API_URL must be an http(s) URL: {self.api_url!r}"
            )


def sandbox_name_for_key(idempotency_key: str) -> str:
    """The sandbox name (our instance id) a create with ``idempotency_key`` uses."""
    return "sbx-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def _api_code(err: BaseException) -> str | None:
    return (err.code or "").upper() if isinstance(err, SandboxApiError) else None


def _write_cause(err: BaseException) -> BaseException | None:
    # A failed write wraps what failed it (an API answer, a broken stream): translate that.
    if isinstance(err, SandboxFilesystemWriteError) and isinstance(err.cause, BaseException):
        return err.cause
    return None


def _path_not_found(message: str, err: BaseException) -> PathNotFound:
    return PathNotFound(message, path=err.path if isinstance(err, SandboxPathNotFoundError) else None)


_TEXT: Final = "vercel: {name}: {err}"
_ERRORS: Final = ErrorTable(
    (
        Row(SandboxPathNotFoundError, _path_not_found, "vercel: no such file or directory: {exc.path}"),
        Row(SandboxApiError, ProviderUnavailable, _TEXT, code=_TRANSIENT_CODES),
        Row(SandboxApiError, ProviderUnavailable, _TEXT, status={408, 410, *SERVER_ERRORS}),
        Row(SandboxApiError, BoxNotFound, _TEXT, status={404}),
        Row(SandboxApiError, BoxNotFound, _TEXT, code=_NOT_FOUND_CODES),
        Row(SandboxApiError, ProviderAuthError, _TEXT, status={401, 403}),
        Row(SandboxApiError, ProviderQuotaError, _TEXT, status={429}),
        Row(SandboxApiError, ProviderError, _TEXT),
        Row(SandboxCredentialsError, ProviderAuthError, _TEXT),
        # A response cut off mid-stream is a broken connection, not an answer (the SDK itself retries those).
        Row(
            (SandboxStreamError, SandboxTimeoutError, SandboxTerminalStateError, _TruncatedStreamError),
            ProviderUnavailable,
            _TEXT,
        ),
        Row(
            (httpx2.TransportError, httpx.TransportError, anyio.BrokenResourceError, TimeoutError),
            ProviderUnavailable,
            _TEXT,
        ),
    ),
    default=_TEXT,
    code_of=_api_code,
    unwrap=_write_cause,
)
"""The module docstring's table: SDK and transport failures → our errors."""

_SDK_ERRORS: Final = (SandboxError, httpx2.HTTPError, httpx.HTTPError, anyio.BrokenResourceError)
"""What the SDK calls raise (everything else propagates as it is)."""


def _translated() -> contextlib.AbstractContextManager[None]:
    return _ERRORS.mapped(catch=_SDK_ERRORS)


class VercelBoxSession:
    """A handle on one Vercel sandbox. Relative paths are under ``/vercel/sandbox``."""

    def __init__(self, sandbox: Sandbox, workspace_root: str) -> None:
        self._sandbox = sandbox
        self._root = workspace_root

    @property
    def instance_id(self) -> str:
        """The sandbox name."""
        return self._sandbox.name

    def _path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self._root, path))

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) with ``run_process`` and wait for it.

        Raises:
            ExecTimeout: the command ran past ``timeout`` seconds (it is killed).
            BoxNotFound: the sandbox is gone.
        """
        if not cmd:
            raise InvalidRequest("exec needs a non-empty argv")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, not {timeout}")
        started: list[Process] = []
        run = self._sandbox.run_process(
            "sh",
            ["-c", exec_script(cmd, inherit_stdin=True)],
            cwd=self._path(workdir or "."),
            env=dict(env) if env else None,
            kill_after=None if timeout is None else timeout + _SERVER_KILL_GRACE_SECONDS,
            capture_output=True,
            input=stdin,
            on_start=started.append,
        )
        with _translated():
            try:
                async with asyncio.timeout(timeout):
                    done = await run
            except TimeoutError:
                if started:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(_KILL_TIMEOUT_SECONDS):
                            await started[0].kill()
                raise ExecTimeout(
                    f"{cmd[0]} ran past {timeout}s in vercel sandbox {self.instance_id} and was killed",
                    timeout=timeout or 0.0,
                ) from None
        report = parse_exec_report(done.stdout or "")
        if report is None:
            raise ProviderError(
                f"vercel: the exec wrapper (sh, base64) failed in the sandbox (exit {done.returncode}): "
                f"{(done.stderr or '').strip()[-300:]}"
            )
        return await report.result()

    async def read_file(self, path: str) -> bytes:
        """Read a whole file (binary safe).

        Raises:
            PathNotFound: no such file.
            BoxNotFound: the sandbox is gone.
        """
        with _translated():
            return await self._sandbox.fs.read_bytes(self._path(path))

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file (mode 0644), creating parent directories.

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        with _translated():
            await self._sandbox.fs.write_bytes(self._path(path), data)

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level with ``find``, sorted by name.

        Raises:
            PathNotFound: no such directory (or not a directory).
            BoxNotFound: the sandbox is gone.
        """
        target = self._path(path)
        done = await self.exec(["sh", "-c", LIST_DIR_SCRIPT, "sh", target], workdir="/")
        if done.exit_code != 0:
            raise PathNotFound(f"no such directory in the sandbox: {target}", path=target)
        return parse_dir_listing(done.stdout, backend=BACKEND)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists (a dangling symbolic link counts).

        Raises:
            BoxNotFound: the sandbox is gone.
        """
        done = await self.exec(["sh", "-c", 'test -e "$1" || test -L "$1"', "sh", self._path(path)], workdir="/")
        return done.exit_code == 0

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The preview URL (route) Vercel gave ``port`` at create.

        Raises:
            InvalidRequest: the port is out of range.
            Unsupported: the port was not declared at create (Vercel has no on-demand ports).
        """
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port must be 1..65535, not {port}")
        for route in self._sandbox.routes:
            if route.port == port:
                url = urlsplit(route.url)
                if not url.hostname:
                    break
                tls = url.scheme == "https"
                return Endpoint(host=url.hostname, port=url.port or (443 if tls else 80), tls=tls, path=url.path or "/")
        raise Unsupported(
            f"port {port} has no preview URL in vercel sandbox {self.instance_id}; declare it in "
            "SANDBOX_VERCEL_EXPOSED_PORTS (Vercel exposes ports only at create)"
        )

    def serialize_state(self) -> Envelope:
        """The envelope: sandbox name, creation time and project."""
        return Envelope(
            backend_id=BACKEND,
            instance_id=self._sandbox.name,
            state={
                "sandbox_name": self._sandbox.name,
                "created_at": self._sandbox.created_at,
                "project_id": self._sandbox.project_id,
            },
        )


class VercelProvider(RemoteWorkspaceSnapshots):
    """Boxes are Vercel Sandboxes (see the module doc).

    Args:
        settings: The backend's settings.
        httpx_client_factory: Builds the HTTP client the SDK uses; tests pass the fake API's,
            production passes nothing (the SDK's own client, to ``SANDBOX_VERCEL_API_URL``).
    """

    def __init__(self, settings: VercelSettings, *, httpx_client_factory: HttpxClientFactory | None = None) -> None:
        self.settings = settings
        self._factory = httpx_client_factory
        self._client: SandboxClient | None = None
        self.remote_workspace = RemoteWorkspace(workspace_root=self.descriptor.workspace_root, home_dir=None)

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static descriptor of the ``vercel`` backend."""
        from sandbox.descriptors import select_backend

        return select_backend(BACKEND)

    @property
    def backend_id(self) -> str:
        """``vercel``."""
        return self.descriptor.backend_id

    def validate_credentials(self) -> None:
        """Check the settings offline (see :meth:`VercelSettings.validate`)."""
        self.settings.validate()

    @property
    def client(self) -> SandboxClient:
        """The SDK client (built on first use, after the settings were validated)."""
        if self._client is None:
            self.settings.validate()
            token = cast(SecretStr, self.settings.token).get_secret_value()
            project_id = cast(str, self.settings.project_id)
            # The SDK drops a None team id from its query; personal accounts have none.
            credentials = SandboxCredentials(
                token=token, team_id=cast(str, self.settings.team_id), project_id=project_id
            )

            async def credentials_factory() -> SandboxCredentials:
                return credentials

            options = SandboxServiceOptions(base_url=self.settings.api_url, credentials_factory=credentials_factory)
            self._client = SandboxClient.create(options=options, httpx_client_factory=self._factory)
        return self._client

    def _session(self, sandbox: Sandbox) -> VercelBoxSession:
        return VercelBoxSession(sandbox, self.descriptor.workspace_root)

    async def create(self, spec: BoxSpec, idempotency_key: str) -> VercelBoxSession:
        """Get or create the sandbox named after ``idempotency_key``.

        Raises:
            ProviderUnavailable: the API failed transiently.
            ProviderAuthError: the token was refused.
            ProviderQuotaError: rate limited.
        """
        name = sandbox_name_for_key(idempotency_key)
        tags = {
            box_labels.LEASE_ID: spec.lease_id,
            box_labels.KEY: idempotency_key,
            TAG_EPOCH: str(spec.epoch),
            box_labels.MANAGED_BY: box_labels.MANAGED_BY_US,
        }
        with _translated():
            try:
                sandbox, _ = await self.client.get_or_create_sandbox(
                    name=name,
                    image=spec.image or self.settings.runtime,
                    ports=list(self.settings.exposed_ports),
                    execution_time_limit=timedelta(seconds=self.settings.timeout_seconds),
                    persistent=True,
                    env=dict(spec.environment) or None,
                    tags=tags,
                )
            except SandboxApiError as err:
                if err.status_code != 409:
                    raise
                # A concurrent create of the same key won: adopt its sandbox.
                sandbox = await self.client.get_sandbox(name=name)
        return self._session(sandbox)

    async def resume(self, envelope: Envelope) -> VercelBoxSession:
        """Find the sandbox of ``envelope`` again by name.

        Raises:
            BoxNotFound: the sandbox is gone, or its name now belongs to a newer sandbox.
            InvalidRequest: the envelope is not a Vercel one.
        """
        name, created_at = self._identity(envelope)
        with _translated():
            sandbox = await self.client.get_sandbox(name=name)
        if created_at is not None and sandbox.created_at is not None and sandbox.created_at != created_at:
            raise BoxNotFound(f"vercel sandbox {name} was replaced by a newer sandbox of the same name")
        return self._session(sandbox)

    async def terminate(self, envelope: Envelope) -> None:
        """Destroy the sandbox; one that is already gone is not an error."""
        try:
            session = await self.resume(envelope)
        except BoxNotFound:
            return
        try:
            with _translated():
                await session._sandbox.destroy()
        except BoxNotFound:
            return

    async def list_owned(self) -> list[OwnedBox]:
        """Every sandbox of the project tagged ``sandbox.managed_by=sandbox-runtime``."""
        query = SandboxQueryByCreatedAt(tag=TagFilter(key=box_labels.MANAGED_BY, value=box_labels.MANAGED_BY_US))
        owned: list[OwnedBox] = []
        with _translated():
            async for sandbox in self.client.query_sandboxes(query=query):
                created_at = None if sandbox.created_at is None else sandbox.created_at / 1000
                owned.append(box_labels.owned_box(sandbox.name, sandbox.tags or {}, created_at=created_at))
        return owned

    async def delete_snapshot(self, native_id: str) -> None:
        """Workspace archives of this backend are tar-only: there is no native snapshot to delete.

        Raises:
            Unsupported: always.
        """
        raise Unsupported(f"the vercel backend keeps tar archives only (asked to delete {native_id!r})")

    async def aclose(self) -> None:
        """Close the SDK client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def workspace_of(self, session: BoxSession) -> RemoteWorkspace:
        """The workspace and the sandbox user's HOME, which differs between images (/root, /home/vercel-sandbox)."""
        done = await session.exec(["sh", "-c", 'printf %s "$HOME"'], workdir="/")
        home = done.stdout.decode(errors="replace").strip()
        if done.exit_code != 0 or not home.startswith("/") or posixpath.normpath(home) == "/":
            return self.remote_workspace
        return RemoteWorkspace(workspace_root=self.descriptor.workspace_root, home_dir=home)

    def _identity(self, envelope: Envelope) -> tuple[str, int | None]:
        if envelope.backend_id != BACKEND:
            raise InvalidRequest(f"not a vercel envelope (backend {envelope.backend_id!r})")
        name = envelope.state.get("sandbox_name") or envelope.instance_id
        created = envelope.state.get("created_at")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("vercel envelope without a sandbox name")
        return name, created if isinstance(created, int) else None


def build_provider(settings: Settings) -> VercelProvider:
    """Build the Vercel provider from ``SANDBOX_VERCEL_*`` (the runtime settings are not needed)."""
    del settings
    return VercelProvider(VercelSettings())
