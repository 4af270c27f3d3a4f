"""The ``runloop`` provider: boxes are Runloop devboxes, driven with the ``runloop_api_client`` SDK.

SDK calls (``AsyncRunloop``, ``client.devboxes``):

- create: ``list`` (the idempotency lookup), ``create`` (blueprint or snapshot, environment,
  metadata, launch parameters, V2 tunnel), ``await_running`` (the ``wait_for_status`` long-poll);
- resume: ``retrieve`` (and ``resume`` + ``await_running`` for a suspended devbox);
- exec: ``execute_async``, ``wait_for_command`` until completion or our deadline, then
  ``executions.kill`` (process group) on timeout;
- files: ``upload_file`` / ``download_file`` (binary-safe multipart and octet-stream);
- ports: the devbox's V2 tunnel (``enable_tunnel`` when it has none):
  ``https://{port}-{tunnel_key}.tunnel.runloop.ai``;
- terminate: ``shutdown``; list_owned: ``list``; native snapshots: ``snapshot_disk`` and
  ``disk_snapshots.delete``.

Idempotent create: every devbox carries the metadata ``sandbox.key`` (the idempotency key) and
``sandbox.lease_id``; ``create`` lists the account's devboxes and adopts one that carries the key
and is not shut down (suspended ones are resumed). Devboxes run as root (``user_parameters``), so the
workspace is ``/workspace`` and HOME is ``/root``, as on every other backend.

Exec: Runloop runs a command *string* in a login shell and returns stdout/stderr as JSON text (the
last 100 lines). Commands therefore go through the POSIX wrapper of
:func:`providers.shell_exec.exec_script`: argv is shell-quoted, the output goes to files in the
devbox, and the wrapper prints the exit status and base64 of each stream (or, for a stream larger
than 256 KiB, the file's path, downloaded with ``download_file``), so output is byte-exact and never
truncated. stdin is uploaded to a file first.

NotFound rule: Runloop answers ``GET /v1/devboxes/{id}`` with 404 for an id it never had, but keeps
a shut-down devbox, with status ``shutdown`` (or ``failure``). Both prove the box is gone
(:class:`BoxNotFound`). An operation on a box that is not running answers 400, and a missing file
answers 404, so a 4xx from an operation on a devbox is re-checked with ``retrieve`` before it is
called NotFound; a transient failure is never NotFound.

=====================================================  =========================================
SDK error                                              Raised here
=====================================================  =========================================
``NotFoundError`` (404) from ``retrieve``/``shutdown``  BoxNotFound
devbox status ``shutdown`` or ``failure``              BoxNotFound
404 from a file operation on a running devbox          PathNotFound
``AuthenticationError`` (401), ``PermissionDenied``    ProviderAuthError
``RateLimitError`` (429)                               ProviderQuotaError
``InternalServerError`` (5xx), 408,                    ProviderUnavailable
``APIConnectionError``, ``APITimeoutError``,
``PollingTimeout`` (boot did not finish)
devbox failed to boot (``RunloopError``), other 4xx    ProviderError
command past its timeout (killed)                      ExecTimeout
=====================================================  =========================================

The SDK's own retries are off (``max_retries=0``): activities retry through Temporal, and a retry
hidden inside one call would outlive the activity's heartbeat.

Snapshots: the descriptor's kind is ``native-snapshot-id`` with a tar fallback; the ledger uses the
portable tar (:class:`~providers.remote_workspace.RemoteWorkspace`); :meth:`RunloopProvider.snapshot_disk`
takes a native disk snapshot (ref ``RUNLOOP_SANDBOX_SNAPSHOT_V1\\n{"snapshot_id": ...}``) and
:meth:`RunloopProvider.delete_snapshot` deletes one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import posixpath
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import box_labels
from providers.remote_workspace import RemoteWorkspace, RemoteWorkspaceSnapshots
from providers.sdk_errors import ErrorTable, Row, confirmed
from providers.shell_exec import (
    LIST_DIR_SCRIPT,
    check_env_names,
    dir_listing,
    exec_script,
    parse_exec_report,
    stage_stdin,
)
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
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
    from runloop_api_client import AsyncRunloop
    from runloop_api_client.types import DevboxView

    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

__all__ = [
    "SNAPSHOT_REF_PREFIX",
    "RunloopBoxSession",
    "RunloopProvider",
    "RunloopSettings",
    "build_provider",
    "decode_snapshot_ref",
    "encode_snapshot_ref",
    "make_client",
]

BACKEND: Final = "runloop"
SNAPSHOT_REF_PREFIX: Final = "RUNLOOP_SANDBOX_SNAPSHOT_V1\n"
HOME: Final = "/root"

_TERMINAL: Final = frozenset({"shutdown", "failure"})
_SUSPENDED: Final = frozenset({"suspending", "suspended"})
_INLINE_LIMIT: Final = 256 * 1024
_LONG_POLL_MAX: Final = 25
_LIST_PAGE: Final = 100


class RunloopSettings(BaseSettings):
    """Runloop settings (environment prefix ``SANDBOX_RUNLOOP_``).

    Attributes:
        api_key: The Runloop API key (``SANDBOX_RUNLOOP_API_KEY``); required.
        base_url: The API endpoint; the SDK default (``https://api.runloop.ai``) when unset.
        blueprint_name: Boot devboxes from the latest build of this blueprint.
        blueprint_id: Boot devboxes from this blueprint build (exclusive with ``blueprint_name``).
        tunnel: Give every devbox an open V2 tunnel, so ports inside it can be reached.
        keep_alive_seconds: Runloop's idle keep-alive (``launch_parameters.keep_alive_time_seconds``).
        create_timeout_seconds: How long a new devbox may take to reach ``running``.
        request_timeout_seconds: HTTP timeout of one API call (long-polls get their own).
    """

    model_config = SettingsConfigDict(env_prefix="SANDBOX_RUNLOOP_", extra="ignore")

    api_key: SecretStr | None = None
    base_url: str | None = None
    blueprint_name: str | None = None
    blueprint_id: str | None = None
    tunnel: bool = True
    keep_alive_seconds: int | None = Field(default=None, gt=0)
    create_timeout_seconds: float = Field(default=300.0, gt=0)
    request_timeout_seconds: float = Field(default=60.0, gt=0)

    def validate(self) -> None:  # type: ignore[override]  # pydantic's classmethod validate is deprecated
        """Check the settings offline.

        Raises:
            SandboxConfigError: the API key is missing, the base URL is not http(s), or both a
                blueprint name and id are set.
        """
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise SandboxConfigError(
                "[sandbox:runloop] SANDBOX_RUNLOOP_API_KEY is not set; create an API key in the Runloop "
                "dashboard (Settings → API keys) and export it as SANDBOX_RUNLOOP_API_KEY"
            )
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise SandboxConfigError(
                    f"[sandbox:runloop] SANDBOX_RUNLOOP_BASE_URL must be an http(s) URL, not {self.base_url!r}"
                )
        if self.blueprint_name and self.blueprint_id:
            raise SandboxConfigError(
                "[sandbox:runloop] set only one of SANDBOX_RUNLOOP_BLUEPRINT_NAME and SANDBOX_RUNLOOP_BLUEPRINT_ID"
            )


def make_client(settings: RunloopSettings, *, http_client: httpx.AsyncClient | None = None) -> AsyncRunloop:
    """The ``AsyncRunloop`` client the provider uses: the settings' key and endpoint, no SDK retries.

    Raises:
        SandboxConfigError: the settings are incomplete (see :meth:`RunloopSettings.validate`).
    """
    from runloop_api_client import AsyncRunloop

    settings.validate()
    assert settings.api_key is not None
    return AsyncRunloop(
        bearer_token=settings.api_key.get_secret_value(),
        base_url=settings.base_url,
        max_retries=0,
        timeout=settings.request_timeout_seconds,
        http_client=http_client,
    )


def encode_snapshot_ref(snapshot_id: str) -> str:
    """The native snapshot reference text of a Runloop disk snapshot (upstream format)."""
    if not snapshot_id:
        raise InvalidRequest("a Runloop snapshot id must not be empty")
    return SNAPSHOT_REF_PREFIX + json.dumps({"snapshot_id": snapshot_id}, separators=(",", ":"))


def decode_snapshot_ref(ref: str) -> str:
    """The snapshot id in a native reference, or ``ref`` itself when it is a bare id.

    Raises:
        InvalidRequest: a reference with our prefix whose body is not ``{"snapshot_id": "<non-empty>"}``.
    """
    if not ref.startswith(SNAPSHOT_REF_PREFIX):
        if not ref or "\n" in ref:
            raise InvalidRequest(f"not a Runloop snapshot id or reference: {ref[:80]!r}")
        return ref
    try:
        body = json.loads(ref[len(SNAPSHOT_REF_PREFIX) :])
    except ValueError:
        body = None
    snapshot_id = body.get("snapshot_id") if isinstance(body, dict) else None
    if not isinstance(snapshot_id, str) or not snapshot_id:
        raise InvalidRequest("a Runloop snapshot reference must hold a non-empty snapshot_id")
    return snapshot_id


def _error_rows() -> tuple[Row, ...]:
    # Built on first use: the SDK is imported only by a worker that runs Runloop boxes.
    import runloop_api_client as rl
    from runloop_api_client.lib.polling import PollingTimeout

    detail = "runloop: {name}: {err}"
    return (
        Row(rl.NotFoundError, BoxNotFound, detail),
        Row(
            (rl.AuthenticationError, rl.PermissionDeniedError),
            ProviderAuthError,
            detail + " (check SANDBOX_RUNLOOP_API_KEY)",
        ),
        Row(rl.RateLimitError, ProviderQuotaError, detail),
        Row((rl.InternalServerError, rl.APIConnectionError, PollingTimeout), ProviderUnavailable, detail),
        Row(rl.APIStatusError, ProviderUnavailable, detail, status={408}),
    )


_ERRORS: Final = ErrorTable(_error_rows, default="runloop: {name}: {err}")
"""The module docstring's table."""


def _is_client_error(err: BaseException) -> bool:
    import runloop_api_client as rl

    return isinstance(err, rl.APIStatusError) and 400 <= err.status_code < 500 and err.status_code not in (408, 429)


def _tunnel_domain(base_url: str | None) -> str:
    # Tunnels live under the API's own domain: api.runloop.ai → tunnel.runloop.ai.
    host = urlsplit(base_url).hostname if base_url else None
    if host and host.startswith("api.runloop."):
        return "tunnel." + host.removeprefix("api.")
    return "tunnel.runloop.ai"


class RunloopBoxSession:
    """A handle on one Runloop devbox."""

    def __init__(self, provider: RunloopProvider, devbox: DevboxView, *, idempotency_key: str | None) -> None:
        self._provider = provider
        self._id = devbox.id
        self._key = idempotency_key if idempotency_key is not None else devbox.metadata.get(box_labels.KEY)
        self._lease_id = devbox.metadata.get(box_labels.LEASE_ID)
        self._tunnel_key = devbox.tunnel.tunnel_key if devbox.tunnel is not None else None

    @property
    def instance_id(self) -> str:
        """The devbox id (``dbx_…``)."""
        return self._id

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``cmd`` (argv) in the devbox from ``workdir`` (default: the workspace) and wait for it.

        Raises:
            InvalidRequest: empty argv, bad environment names or a non-positive timeout.
            ExecTimeout: the command ran past ``timeout`` seconds; its process group was killed.
            BoxNotFound: the devbox is gone.
        """
        argv = list(cmd)
        if not argv:
            raise InvalidRequest("exec needs a non-empty command")
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, not {timeout}")
        check_env_names(env or {})
        client = self._provider.client
        stdin_path = await stage_stdin(stdin, self._upload)
        script = exec_script(
            argv,
            workdir=self._path(workdir or "."),
            missing_workdir_is_result=True,
            stdin_file=stdin_path,
            env=env,
            spill_over=_INLINE_LIMIT,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._classified():
            execution = await client.devboxes.execute_async(self._id, command=script)
            while execution.status != "completed":
                wait = _LONG_POLL_MAX
                if deadline is not None and timeout is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        await self._kill(execution.execution_id)
                        raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout and was killed", timeout=timeout)
                    wait = max(1, min(_LONG_POLL_MAX, math.ceil(remaining)))
                execution = await self._wait_command(execution.execution_id, wait, execution)
        return await self._result(execution.stdout or "", bool(execution.stdout_truncated))

    async def _wait_command(self, execution_id: str, wait: int, current: Any) -> Any:
        import runloop_api_client as rl

        try:
            return await self._provider.client.devboxes.wait_for_command(
                execution_id,
                devbox_id=self._id,
                statuses=["completed"],
                timeout_seconds=wait,
                timeout=httpx.Timeout(wait + 10.0, connect=10.0),
            )
        except rl.APIStatusError as err:
            if err.status_code == 408:  # the long-poll ended before the command did
                return current
            raise

    async def _kill(self, execution_id: str) -> None:
        async with self._classified():
            await self._provider.client.devboxes.executions.kill(
                execution_id, devbox_id=self._id, kill_process_group=True
            )

    async def _result(self, stdout: str, truncated: bool) -> ExecResult:
        report = parse_exec_report(stdout)
        if report is None:
            hint = " (Runloop truncated the output)" if truncated else ""
            raise ProviderError(f"runloop: the command wrapper in devbox {self._id} gave no result{hint}")
        try:
            return await report.result(self.read_file)
        finally:
            cleanup = report.cleanup_command()
            if cleanup is not None:
                await self._discard(cleanup)

    async def _discard(self, command: str) -> None:
        try:
            execution = await self._provider.client.devboxes.execute_async(self._id, command=command)
            del execution  # best effort cleanup of /tmp; no need to wait for it
        except Exception:  # a leftover file in /tmp harms nothing
            pass

    async def read_file(self, path: str) -> bytes:
        """The bytes of a file in the devbox (relative paths are under the workspace).

        Raises:
            PathNotFound: no such file.
            BoxNotFound: the devbox is gone.
        """
        target = self._path(path)
        async with self._classified(path):
            response = await self._provider.client.devboxes.download_file(self._id, path=target)
            return await response.read()

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file in the devbox, creating its parent directories.

        Raises:
            BoxNotFound: the devbox is gone.
        """
        await self._upload(self._path(path), data)

    async def _upload(self, target: str, data: bytes) -> None:
        async with self._classified():
            await self._provider.client.devboxes.upload_file(
                self._id, path=target, file=(posixpath.basename(target) or "file", data)
            )

    async def list_dir(self, path: str) -> list[DirEntry]:
        """One level of a directory in the devbox, sorted by name.

        Raises:
            PathNotFound: no such directory.
            InvalidRequest: the path is not a directory.
            BoxNotFound: the devbox is gone.
        """
        done = await self.exec(["sh", "-c", LIST_DIR_SCRIPT, "sh", self._path(path)], workdir="/")
        return dir_listing(done, path, backend="runloop")

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists in the devbox (a dangling symbolic link counts)."""
        target = self._path(path)
        done = await self.exec(["sh", "-c", 'test -e "$1" || test -L "$1"', "sh", target], workdir="/")
        return done.exit_code == 0

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The devbox's V2 tunnel URL for ``port``: ``https://{port}-{tunnel_key}.tunnel.runloop.ai``.

        Raises:
            InvalidRequest: the port is out of range.
            Unsupported: tunnels are switched off (``SANDBOX_RUNLOOP_TUNNEL=false``).
            BoxNotFound: the devbox is gone.
        """
        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, not {port}")
        settings = self._provider.settings
        if not settings.tunnel:
            raise Unsupported("runloop tunnels are switched off (SANDBOX_RUNLOOP_TUNNEL=false)")
        if self._tunnel_key is None:
            async with self._classified():
                tunnel = await self._provider.client.devboxes.enable_tunnel(self._id, auth_mode="open")
            self._tunnel_key = tunnel.tunnel_key
        return Endpoint(host=f"{port}-{self._tunnel_key}.{_tunnel_domain(settings.base_url)}", port=443, tls=True)

    def serialize_state(self) -> Envelope:
        """The envelope that finds this devbox again (``devboxId``, as upstream)."""
        state: dict[str, Any] = {"devboxId": self._id}
        if self._key is not None:
            state["idempotencyKey"] = self._key
        if self._lease_id is not None:
            state["leaseId"] = self._lease_id
        return Envelope(backend_id=self._provider.backend_id, instance_id=self._id, state=state)

    def _classified(self, path: str | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Raise a failure of an operation on this devbox as :meth:`RunloopProvider._classify` calls it."""
        return confirmed(functools.partial(self._provider._classify, self._id, path=path))

    def _path(self, path: str) -> str:
        if "\0" in path:
            raise InvalidRequest("a path must not contain NUL")
        root = self._provider.descriptor.workspace_root
        return posixpath.normpath(posixpath.join(root, path))


class RunloopProvider(RemoteWorkspaceSnapshots):
    """Runloop devboxes as sandbox boxes.

    Args:
        settings: The ``SANDBOX_RUNLOOP_*`` settings.
        client: The SDK client; by default one is made from the settings (:func:`make_client`) on
            first use. Tests pass a client whose ``http_client`` talks to a fake.
    """

    def __init__(self, settings: RunloopSettings, *, client: AsyncRunloop | None = None) -> None:
        from sandbox.descriptors import CAPABILITY_DESCRIPTORS

        self.settings = settings
        self._client = client
        self._owns_client = client is None
        self._descriptor = CAPABILITY_DESCRIPTORS[BACKEND]
        self.remote_workspace = RemoteWorkspace(workspace_root=self._descriptor.workspace_root, home_dir=HOME)

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The runloop capability descriptor."""
        return self._descriptor

    @property
    def backend_id(self) -> str:
        """``runloop``."""
        return self._descriptor.backend_id

    @property
    def client(self) -> AsyncRunloop:
        """The SDK client (made from the settings on first use)."""
        if self._client is None:
            self._client = make_client(self.settings)
        return self._client

    def validate_credentials(self) -> None:
        """Check the settings offline; raise ``SandboxConfigError`` naming what is missing."""
        self.settings.validate()

    async def aclose(self) -> None:
        """Close the HTTP client the provider made (an injected client belongs to the caller)."""
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def create(self, spec: BoxSpec, idempotency_key: str) -> RunloopBoxSession:
        """Create a devbox for ``spec``, or adopt the live one already created with this key.

        Raises:
            InvalidRequest: empty idempotency key or environment names that are not variable names.
            ProviderUnavailable: the API failed transiently or the devbox did not boot in time.
            ProviderError: the devbox failed to boot, or its blueprint does not exist.
        """
        import runloop_api_client as rl

        if not idempotency_key:
            raise InvalidRequest("an idempotency key is required")
        check_env_names(spec.environment)
        with _ERRORS.mapped():
            try:
                existing = await self._find(idempotency_key)
                if existing is not None:
                    # Adopted (a retry, or a lost answer): it may not have got its workspace yet.
                    session = await self._ready(existing, idempotency_key)
                else:
                    devbox = await self.client.devboxes.create(**self._create_params(spec, idempotency_key))
                    devbox = await self._await_running(devbox.id)
                    session = RunloopBoxSession(self, devbox, idempotency_key=idempotency_key)
            except rl.NotFoundError as err:
                # On create, a 404 names the blueprint or snapshot to boot from, never a box.
                raise ProviderError(f"runloop: the blueprint or snapshot to boot from does not exist: {err}") from err
        done = await session.exec(["mkdir", "-p", self._descriptor.workspace_root], workdir="/")
        if done.exit_code != 0:
            raise ProviderError(
                f"runloop: cannot create {self._descriptor.workspace_root} in {session.instance_id}: "
                + done.stderr.decode(errors="replace").strip()
            )
        return session

    def _create_params(self, spec: BoxSpec, key: str) -> dict[str, Any]:
        settings = self.settings
        params: dict[str, Any] = {
            "name": f"sandbox-{spec.workspace_id}-{spec.group_id}"[:120],
            "metadata": {
                box_labels.KEY: key,
                box_labels.LEASE_ID: spec.lease_id,
                "sandbox.workspace_id": spec.workspace_id,
                "sandbox.group_id": spec.group_id,
                box_labels.EPOCH: str(spec.epoch),
            },
            "environment_variables": dict(spec.environment),
        }
        # A spec image names a blueprint (an id ``bpt_…`` or a name); otherwise the settings' one.
        if spec.image:
            params["blueprint_id" if spec.image.startswith("bpt_") else "blueprint_name"] = spec.image
        elif settings.blueprint_id:
            params["blueprint_id"] = settings.blueprint_id
        elif settings.blueprint_name:
            params["blueprint_name"] = settings.blueprint_name
        launch: dict[str, Any] = {"user_parameters": {"username": "root", "uid": 0}}
        if settings.keep_alive_seconds is not None:
            launch["keep_alive_time_seconds"] = settings.keep_alive_seconds
        params["launch_parameters"] = launch
        if settings.tunnel:
            params["tunnel"] = {"auth_mode": "open"}
        return params

    async def _find(self, key: str) -> DevboxView | None:
        newest: DevboxView | None = None
        async for devbox in self.client.devboxes.list(limit=_LIST_PAGE):
            if devbox.metadata.get(box_labels.KEY) == key and devbox.status not in _TERMINAL:
                if newest is None or devbox.create_time_ms > newest.create_time_ms:
                    newest = devbox
        return newest

    async def _await_running(self, devbox_id: str) -> DevboxView:
        from runloop_api_client.lib.polling import PollingConfig

        config = PollingConfig(timeout_seconds=self.settings.create_timeout_seconds)
        return await self.client.devboxes.await_running(devbox_id, polling_config=config)

    async def _ready(self, devbox: DevboxView, key: str | None) -> RunloopBoxSession:
        """A session on ``devbox`` once it runs: resumes a suspended one, waits for a booting one."""
        if devbox.status in _TERMINAL:
            raise BoxNotFound(f"runloop devbox {devbox.id} is {devbox.status}")
        if devbox.status == "suspended":
            await self.client.devboxes.resume(devbox.id)
        if devbox.status != "running":
            devbox = await self._await_running(devbox.id)
        return RunloopBoxSession(self, devbox, idempotency_key=key)

    async def resume(self, envelope: Envelope) -> RunloopBoxSession:
        """Find the devbox again by its id; resume it if it was suspended.

        Raises:
            BoxNotFound: Runloop has no such devbox, or it is shut down or failed.
            ProviderUnavailable: the API failed transiently.
        """
        devbox_id = self._devbox_id(envelope)
        with _ERRORS.mapped():
            devbox = await self.client.devboxes.retrieve(devbox_id)
            return await self._ready(devbox, envelope.state.get("idempotencyKey"))

    async def terminate(self, envelope: Envelope) -> None:
        """Shut the devbox down; a devbox that is gone or already shut down is no error."""
        import runloop_api_client as rl

        devbox_id = self._devbox_id(envelope)
        with _ERRORS.mapped():
            try:
                devbox = await self.client.devboxes.retrieve(devbox_id)
                if devbox.status not in _TERMINAL:
                    await self.client.devboxes.shutdown(devbox_id, force="true")
            except rl.NotFoundError:
                return

    async def list_owned(self) -> list[OwnedBox]:
        """Every devbox that is not shut down and carries our ``sandbox.key`` metadata.

        ``labels`` is the devbox metadata, ``sandbox.*`` keys also under their bare names (``epoch``).
        """
        owned: list[OwnedBox] = []
        with _ERRORS.mapped():
            async for devbox in self.client.devboxes.list(limit=_LIST_PAGE):
                if devbox.status in _TERMINAL or box_labels.KEY not in devbox.metadata:
                    continue
                owned.append(box_labels.owned_box(devbox.id, devbox.metadata, created_at=devbox.create_time_ms / 1000))
        return owned

    async def snapshot_disk(self, envelope: Envelope, *, name: str | None = None) -> str:
        """Take a native disk snapshot of the devbox and return its reference text.

        Raises:
            BoxNotFound: the devbox is gone.
            ProviderUnavailable: the API failed transiently.
        """
        devbox_id = self._devbox_id(envelope)
        metadata = {k: str(v) for k, v in envelope.state.items() if k in ("idempotencyKey", "leaseId")}
        async with confirmed(functools.partial(self._classify, devbox_id)):
            snapshot = await self.client.devboxes.snapshot_disk(devbox_id, name=name, metadata=metadata)
        return encode_snapshot_ref(snapshot.id)

    async def delete_snapshot(self, native_id: str) -> None:
        """Delete a disk snapshot by id or reference text; one that is already gone is no error."""
        import runloop_api_client as rl

        snapshot_id = decode_snapshot_ref(native_id)
        with _ERRORS.mapped():
            try:
                await self.client.devboxes.disk_snapshots.delete(snapshot_id)
            except rl.NotFoundError:
                return

    # -- helpers --------------------------------------------------------------------------------

    def _devbox_id(self, envelope: Envelope) -> str:
        if envelope.backend_id != self.backend_id:
            raise InvalidRequest(f"envelope of backend {envelope.backend_id!r} given to the runloop provider")
        devbox_id = envelope.state.get("devboxId") or envelope.instance_id
        if not isinstance(devbox_id, str) or not devbox_id or "/" in devbox_id:
            raise InvalidRequest(f"not a Runloop devbox id: {devbox_id!r}")
        if devbox_id != envelope.instance_id:
            raise InvalidRequest(f"envelope ids disagree: {envelope.instance_id!r} vs devboxId {devbox_id!r}")
        return devbox_id

    async def _classify(self, devbox_id: str, err: BaseException, *, path: str | None = None) -> ProviderError:
        """Translate ``err`` from an operation on a devbox, telling "box gone" from "bad request".

        A 4xx from an operation may mean the devbox is not running any more (400) or that a file is
        missing (404): ``retrieve`` decides. Transient errors are translated without a lookup.
        """
        import runloop_api_client as rl

        if not _is_client_error(err) or isinstance(err, rl.AuthenticationError | rl.PermissionDeniedError):
            return _ERRORS.translate(err)
        try:
            devbox = await self.client.devboxes.retrieve(devbox_id)
        except rl.NotFoundError:
            return BoxNotFound(f"runloop devbox {devbox_id} does not exist")
        except Exception as lookup:
            return _ERRORS.translate(lookup)
        if devbox.status in _TERMINAL:
            return BoxNotFound(f"runloop devbox {devbox_id} is {devbox.status}")
        if path is not None and isinstance(err, rl.NotFoundError):
            return PathNotFound(f"no such file: {path}", path=path)
        if isinstance(err, rl.NotFoundError):
            return ProviderError(f"runloop: {err}")
        return _ERRORS.translate(err)


def build_provider(settings: Settings) -> RunloopProvider:
    """Build the Runloop provider from ``SANDBOX_RUNLOOP_*`` (the runtime settings are not needed)."""
    del settings
    return RunloopProvider(RunloopSettings())
