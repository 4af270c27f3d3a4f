"""A stateful fake of the ``modal`` SDK surface the Modal provider uses, running its boxes on a FakeMachine.

:class:`FakeModal` stands where the ``modal`` package stands (``ModalProvider(settings,
sdk=FakeModal(machine))``): ``App.lookup``, ``Sandbox.create/from_id/from_name/list``, the handle
calls (``exec``, ``poll``, ``wait``, ``terminate``, ``tunnels``, ``get_tags``/``set_tags``,
``snapshot_filesystem``, ``snapshot_directory``, ``mount_image`` and the ``filesystem`` API), the
``ContainerProcess`` and its stream reader/writer, ``Image.from_registry/from_id``,
``Secret.from_name``, ``Client.from_credentials`` and ``modal.experimental.image_delete``. Only the
async ``.aio`` interface exists (calling the blocking form raises ``TypeError``), parameter names
follow the SDK (a unit test compares them with ``inspect.signature``), and errors are the SDK's own
``modal.exception`` classes. The fake keeps its own state — apps, sandboxes with their tags,
names, timeouts, tunnels and results, images — and runs commands and holds files in one
:class:`~tests.fakes.machine.FakeMachine` box per sandbox.

Reproduced (from the SDK source of modal 1.6.4, not from watching the service):

- ids in Modal's formats: ``ap-``, ``sb-``, ``im-`` followed by 22 alphanumerics; tunnels on
  ``<13 chars>.r<n>.modal.host:443`` for every ``encrypted_ports`` entry, only those.
- ``create`` validation: ``app`` required, ``timeout`` not None, absolute ``workdir``, valid ``name``
  (``AlreadyExistsError`` for a second running sandbox with the same name in an app); tags at create;
  the box's lifetime (``timeout``) and ``idle_timeout`` enforced lazily at the next call (result
  ``124``); ``terminate`` gives result ``137`` and is a no-op on a finished sandbox.
- lookups: ``from_id`` of a finished sandbox still answers, with ``returncode`` set, for
  ``finished_retention`` seconds, then raises ``NotFoundError("Modal sandbox <id> not found (has
  been terminated)")``; an unknown id raises ``NotFoundError``, a malformed one ``InvalidError``;
  ``list`` yields running sandboxes only (newest first) whose tags include the filter.
- ``exec`` on a finished sandbox: ``ConflictError("Sandbox already finished")`` from a handle that
  never ran a command (the SDK's task-id lookup), ``NotFoundError("Modal sandbox <id> is no longer
  running.")`` from one that did (its command router is gone); a box terminated under a running
  command fails that command's ``wait``/``read`` the same way. ``exec(timeout=)`` is whole seconds;
  a command past it is killed and ``wait`` returns ``-1`` (the SDK swallows ``ExecTimeoutError``).
- the filesystem API rewrites what ``exec`` raised as the SDK does: ``NotFoundError``,
  ``ServiceError`` and ``ConnectionError`` become ``NotFoundError("The Sandbox is unavailable. This
  Sandbox may have already shut down.")`` (so a transient failure *looks like* NotFound), any other
  ``modal.exception.Error`` a generic ``SandboxFilesystemError``; missing paths raise
  ``SandboxFilesystemNotFoundError``, directories ``SandboxFilesystemIsADirectoryError``.
- snapshots: ``snapshot_filesystem`` and ``snapshot_directory`` make ``im-`` images with their
  ``ttl`` (expired images are gone); ``Sandbox.create(image=...)`` of a filesystem snapshot starts a
  box with its files, ``mount_image`` of a directory snapshot replaces the directory;
  ``image_delete`` deletes (``NotFoundError`` the second time).
- credentials: with ``credentials=(id, secret)`` every call needs a client from
  ``Client.from_credentials`` with that pair, else ``AuthError``.
- failures and latency: every call first awaits ``faults.before(<operation>)`` with the operation
  names of the provider contract (``create``, ``get`` for ``from_id``/``from_name``, ``exec``,
  ``read``, ``write``, ``list``, ``terminate``, ``list_boxes``) and ``lookup_app``, ``poll``,
  ``stat``, ``tunnels``, ``tags``, ``snapshot``, ``mount``, ``image_delete``; ``create_after`` fires
  after a sandbox was made (a create whose response was lost).

Not reproduced: the real image (boxes see the host's read-only system, whatever image is asked
for; a registry image is only recorded, and a filesystem snapshot holds the workspace and
``/root``, not the whole disk); the entrypoint command (boxes stay up until terminated or timed
out, whatever ``*args`` says); streaming output (readers return everything once the command
ended), ``pty``, ``secrets`` (names recorded, values never injected), volumes, GPUs, regions,
networking (tunnel hosts do not resolve), sidecars, memory snapshots, the scheduling delay before a
new sandbox runs commands (inject ``exec`` faults for that), pagination, and the service's exact
wording of messages other than those quoted above.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import secrets
import stat as stat_module
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import modal
import modal.exception as mx
from modal.types import FileInfo, FileType

from sandbox.errors import BoxNotFound, ExecTimeout
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine

__all__ = ["FakeModal", "FakeSandboxRecord"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_ALPHABET = string.ascii_letters + string.digits
_ID_RE = re.compile(r"^sb-[A-Za-z0-9]+$")
_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
_UNAVAILABLE = "The Sandbox is unavailable. This Sandbox may have already shut down."
_RESULT_TIMEOUT = 124
_RESULT_TERMINATED = 137
_FILE_TYPES = {"file": FileType.FILE, "dir": FileType.DIRECTORY, "symlink": FileType.SYMLINK}
_STAT_SCRIPT = 'test -e "$1" || test -L "$1" || exit 2; find "$1" -maxdepth 0 -printf "%y\\0%s\\0%m\\0%T@\\0%l\\0"'
_SNAPSHOT_FS_SCRIPT = (
    'cd / && set -- && for d in "$0" root; do [ -e "$d" ] && set -- "$@" "$d"; done; exec tar -cf - "$@"'
)


def _new_id(prefix: str) -> str:
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def _label(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


class _Aio(Generic[_P, _R]):
    """A call of the SDK in its async form (``obj.method.aio(...)``); the blocking form is not modelled."""

    def __init__(self, fn: Callable[_P, Awaitable[_R]]) -> None:
        self.aio = fn

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("the Modal fake models the async interface only: call .aio(...)")


class _AioIter(Generic[_P, _R]):
    """An async-generator call of the SDK (``Sandbox.list.aio(...)``)."""

    def __init__(self, fn: Callable[_P, AsyncIterator[_R]]) -> None:
        self.aio = fn

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("the Modal fake models the async interface only: call .aio(...)")


# -- server-side state ---------------------------------------------------------------------------


@dataclass
class FakeSandboxRecord:
    """What the fake service knows about one sandbox (tests read it to check what the provider asked for)."""

    sandbox_id: str
    app_id: str
    name: str | None
    args: tuple[str, ...]
    tags: dict[str, str]
    image_id: str | None
    env: dict[str, str]
    secrets: tuple[str, ...]
    timeout: int
    idle_timeout: int | None
    workdir: str | None
    encrypted_ports: tuple[int, ...]
    created_at: float
    last_active: float
    tunnels: dict[int, modal.Tunnel] = field(default_factory=dict)
    returncode: int | None = None
    finished_at: float | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


@dataclass
class _ImageRecord:
    image_id: str
    kind: Literal["registry", "filesystem", "directory"]
    tag: str | None = None
    archive: bytes = b""
    expires_at: float | None = None


@dataclass
class _AppRecord:
    app_id: str
    name: str
    environment: str


# -- client-side objects -------------------------------------------------------------------------


class FakeClient:
    """``modal.Client`` made by ``Client.from_credentials``."""

    def __init__(self, token_id: str, token_secret: str) -> None:
        self.credentials = (token_id, token_secret)


class FakeApp:
    """``modal.App`` as ``App.lookup`` returns it."""

    def __init__(self, record: _AppRecord) -> None:
        self._record = record

    @property
    def app_id(self) -> str:
        """The ``ap-`` id."""
        return self._record.app_id

    @property
    def name(self) -> str:
        """The app name."""
        return self._record.name


class FakeImage:
    """``modal.Image``: lazy until a create, mount or snapshot gives it an ``im-`` id."""

    def __init__(self, *, object_id: str | None = None, tag: str | None = None, secret: object = None) -> None:
        self._object_id = object_id
        self._tag = tag
        self._secret = secret

    @property
    def object_id(self) -> str:
        """The ``im-`` id (raises ``InvalidError`` for an image never built)."""
        if self._object_id is None:
            raise mx.InvalidError("Image has not been hydrated; build it or use it in a Sandbox first")
        return self._object_id


class FakeSecret:
    """``modal.Secret`` looked up by name (lazily)."""

    def __init__(self, name: str, environment_name: str | None) -> None:
        self.name = name
        self.environment_name = environment_name


@dataclass
class _Outcome:
    code: int
    stdout: bytes
    stderr: bytes
    gone: bool = False


class FakeStreamReader:
    """``modal.io_streams.StreamReader`` of one exec stream (whole output once the command ended)."""

    def __init__(self, process: FakeContainerProcess, which: Literal["stdout", "stderr"]) -> None:
        self._process = process
        self._which = which
        self.read = _Aio(self._read)

    async def _read(self) -> Any:
        outcome = await self._process._outcome()
        data = outcome.stdout if self._which == "stdout" else outcome.stderr
        return data.decode(errors="replace") if self._process._text else data


class FakeStreamWriter:
    """``modal.io_streams.StreamWriter`` of an exec's stdin (the command starts when stdin is closed)."""

    def __init__(self, process: FakeContainerProcess) -> None:
        self._process = process
        self.drain = _Aio(self._drain)

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        """Buffer ``data`` for the command's stdin."""
        if self._process._eof:
            raise ValueError("Stdin is closed. Cannot write to it.")
        self._process._stdin.extend(data.encode() if isinstance(data, str) else bytes(data))

    def write_eof(self) -> None:
        """Close stdin once the buffer is flushed."""
        self._process._eof = True

    async def _drain(self) -> None:
        if self._process._eof:
            self._process._start()


class FakeContainerProcess:
    """``modal.container_process.ContainerProcess``: one command in a sandbox, run on the machine."""

    def __init__(
        self,
        service: FakeModal,
        record: FakeSandboxRecord,
        argv: Sequence[str],
        *,
        workdir: str | None,
        env: Mapping[str, str],
        timeout: int | None,
        text: bool,
    ) -> None:
        self._service = service
        self._record = record
        self._argv = list(argv)
        self._workdir = workdir
        self._env = dict(env)
        self._timeout = timeout
        self._text = text
        self._stdin = bytearray()
        self._eof = False
        self._task: asyncio.Task[_Outcome] | None = None
        self._returncode: int | None = None
        self.stdout = FakeStreamReader(self, "stdout")
        self.stderr = FakeStreamReader(self, "stderr")
        self.stdin = FakeStreamWriter(self)
        self.wait = _Aio(self._wait)
        self.poll = _Aio(self._poll)

    @property
    def returncode(self) -> int:
        """The exit code after ``wait`` (``InvalidError`` before, as the SDK)."""
        if self._returncode is None:
            raise mx.InvalidError("You must call wait() before accessing the returncode.")
        return self._returncode

    def _start(self) -> asyncio.Task[_Outcome]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._record.tasks.add(self._task)
            self._task.add_done_callback(self._record.tasks.discard)
        return self._task

    async def _run(self) -> _Outcome:
        record = self._record
        stdin = bytes(self._stdin) if self._eof else None
        try:
            done = await self._service.machine.exec(
                record.sandbox_id,
                self._argv,
                workdir=self._workdir or record.workdir or "/",
                env=self._env,
                timeout=float(self._timeout) if self._timeout is not None else None,
                stdin=stdin,
            )
        except ExecTimeout:
            return _Outcome(-1, b"", b"")
        except BoxNotFound:
            return _Outcome(-1, b"", b"", gone=True)
        if record.returncode is not None:
            return _Outcome(-1, b"", b"", gone=True)
        record.last_active = self._service.now()
        return _Outcome(done.exit_code, done.stdout, done.stderr)

    async def _outcome(self) -> _Outcome:
        outcome = await asyncio.shield(self._start())
        if outcome.gone:
            raise mx.NotFoundError(f"Modal sandbox {self._record.sandbox_id} is no longer running.")
        return outcome

    async def _wait(self) -> int:
        outcome = await self._outcome()
        self._returncode = outcome.code
        return outcome.code

    async def _poll(self) -> int | None:
        task = self._start()
        if not task.done():
            return None
        return await self._wait()


class FakeSandboxFilesystem:
    """``Sandbox.filesystem`` (modal 1.6): file calls that, in the SDK, are commands run in the box."""

    def __init__(self, sandbox: FakeSandbox) -> None:
        self._sandbox = sandbox
        self.read_bytes = _Aio(self._read_bytes)
        self.write_bytes = _Aio(self._write_bytes)
        self.list_files = _Aio(self._list_files)
        self.stat = _Aio(self._stat)

    async def _enter(self, operation: str, method: str, remote_path: str) -> str:
        if not posixpath.isabs(remote_path):
            raise mx.InvalidError(f"Sandbox.filesystem.{method}() currently only supports absolute remote_path values")
        sandbox = self._sandbox
        try:
            await sandbox._service._before(operation, sandbox._client)
            record = await sandbox._running_for_exec()
        except (mx.NotFoundError, mx.ServiceError, mx.ConnectionError):
            raise mx.NotFoundError(_UNAVAILABLE) from None
        except mx.Error:
            raise mx.SandboxFilesystemError("An unexpected error occurred, please contact support@modal.com") from None
        record.last_active = sandbox._service.now()
        return record.sandbox_id

    async def _read_bytes(self, remote_path: str) -> bytes:
        box = await self._enter("read", "read_bytes", remote_path)
        try:
            return await self._sandbox._service.machine.read(box, remote_path)
        except BoxNotFound:
            raise mx.NotFoundError(_UNAVAILABLE) from None
        except OSError as err:
            raise _fs_error(err, remote_path) from None

    async def _write_bytes(self, data: bytes | bytearray | memoryview, remote_path: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes-like")
        box = await self._enter("write", "write_bytes", remote_path)
        try:
            await self._sandbox._service.machine.write(box, remote_path, bytes(data))
        except BoxNotFound:
            raise mx.NotFoundError(_UNAVAILABLE) from None
        except OSError as err:
            raise _fs_error(err, remote_path) from None

    async def _list_files(self, remote_path: str) -> list[FileInfo]:
        box = await self._enter("list", "list_files", remote_path)
        try:
            entries = await self._sandbox._service.machine.list(box, remote_path)
        except BoxNotFound:
            raise mx.NotFoundError(_UNAVAILABLE) from None
        except OSError as err:
            raise _fs_error(err, remote_path) from None
        return [
            FileInfo(
                name=e.name,
                path=posixpath.join(remote_path, e.name),
                type=_FILE_TYPES.get(e.kind, FileType.FILE),
                size=e.size,
                mode=e.mode,
                permissions=stat_module.filemode(e.mode)[1:],
                owner="root",
                group="root",
                modified_time=0.0,
                symlink_target=None,
            )
            for e in entries
        ]

    async def _stat(self, remote_path: str) -> FileInfo:
        box = await self._enter("stat", "stat", remote_path)
        try:
            done = await self._sandbox._service.machine.exec(box, ["sh", "-c", _STAT_SCRIPT, "sh", remote_path])
        except BoxNotFound:
            raise mx.NotFoundError(_UNAVAILABLE) from None
        if done.exit_code != 0:
            raise mx.SandboxFilesystemNotFoundError(f"No such file or directory: {remote_path}")
        kind, size, mode, mtime, target = done.stdout.decode(errors="replace").split("\0")[:5]
        return FileInfo(
            name=posixpath.basename(remote_path.rstrip("/")) or "/",
            path=remote_path,
            type=_FILE_TYPES.get({"f": "file", "d": "dir", "l": "symlink"}.get(kind, "file"), FileType.FILE),
            size=int(size),
            mode=int(mode, 8),
            permissions=stat_module.filemode(int(mode, 8))[1:],
            owner="root",
            group="root",
            modified_time=float(mtime),
            symlink_target=target or None,
        )


def _fs_error(err: OSError, path: str) -> mx.SandboxFilesystemError:
    if isinstance(err, FileNotFoundError):
        return mx.SandboxFilesystemNotFoundError(f"No such file or directory: {path}")
    if isinstance(err, IsADirectoryError):
        return mx.SandboxFilesystemIsADirectoryError(f"Is a directory: {path}")
    if isinstance(err, NotADirectoryError):
        return mx.SandboxFilesystemNotADirectoryError(f"Not a directory: {path}")
    if isinstance(err, PermissionError):
        return mx.SandboxFilesystemPermissionError(f"Permission denied: {path}")
    return mx.SandboxFilesystemError(f"Operation on '{path}' failed with exit code 1")


class FakeSandbox:
    """``modal.Sandbox``: a client-side handle on one sandbox of the fake service."""

    def __init__(self, service: FakeModal, record: FakeSandboxRecord, client: object) -> None:
        self._service = service
        self._client = client  # the SDK binds a handle to the client that made or found it
        self._id = record.sandbox_id
        self._returncode = record.returncode
        self._ran_command = False
        self.filesystem = FakeSandboxFilesystem(self)
        self.exec = _Aio(self._exec)
        self.poll = _Aio(self._poll)
        self.wait = _Aio(self._wait)
        self.terminate = _Aio(self._terminate)
        self.tunnels = _Aio(self._tunnels)
        self.get_tags = _Aio(self._get_tags)
        self.set_tags = _Aio(self._set_tags)
        self.snapshot_filesystem = _Aio(self._snapshot_filesystem)
        self.snapshot_directory = _Aio(self._snapshot_directory)
        self.mount_image = _Aio(self._mount_image)

    def __repr__(self) -> str:
        return f"Sandbox({self._id})"

    @property
    def object_id(self) -> str:
        """The ``sb-`` id."""
        return self._id

    @property
    def returncode(self) -> int | None:
        """The result the handle last saw (None: running)."""
        return self._returncode

    async def _record(self) -> FakeSandboxRecord:
        record = await self._service._lookup(self._id)
        self._returncode = record.returncode
        return record

    async def _running_for_exec(self) -> FakeSandboxRecord:
        record = await self._record()
        if record.returncode is not None:
            if self._ran_command:
                raise mx.NotFoundError(f"Modal sandbox {self._id} is no longer running.")
            raise mx.ConflictError("Sandbox already finished")
        return record

    async def _exec(
        self,
        *args: str,
        timeout: int | None = None,
        workdir: str | None = None,
        env: dict[str, str | None] | None = None,
        text: bool = True,
    ) -> FakeContainerProcess:
        await self._service._before("exec", self._client)
        if workdir is not None and not workdir.startswith("/"):
            raise mx.InvalidError(f"workdir must be an absolute path, got: {workdir}")
        if not args or not all(isinstance(a, str) for a in args):
            raise mx.InvalidError("All entrypoint arguments must be strings")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise mx.InvalidError(f"timeout must be a positive whole number of seconds, got: {timeout!r}")
        record = await self._running_for_exec()
        self._ran_command = True
        record.last_active = self._service.now()
        call_env = {k: v for k, v in (env or {}).items() if v is not None}
        return FakeContainerProcess(
            self._service, record, args, workdir=workdir, env=call_env, timeout=timeout, text=text
        )

    async def _poll(self) -> int | None:
        await self._service._before("poll", self._client)
        return (await self._record()).returncode

    async def _wait(self, raise_on_termination: bool = True) -> None:
        while True:
            record = await self._record()
            if record.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if record.returncode == _RESULT_TIMEOUT:
            raise mx.SandboxTimeoutError()
        if record.returncode == _RESULT_TERMINATED and raise_on_termination:
            raise mx.SandboxTerminatedError()

    async def _terminate(self, *, wait: bool = False) -> int | None:
        await self._service._before("terminate", self._client)
        record = await self._record()
        await self._service._finish(record, _RESULT_TERMINATED)
        self._returncode = record.returncode
        return record.returncode if wait else None

    async def _tunnels(self, timeout: int = 50) -> dict[int, modal.Tunnel]:
        await self._service._before("tunnels", self._client)
        record = await self._running_for_exec()
        return dict(record.tunnels)

    async def _get_tags(self) -> dict[str, str]:
        await self._service._before("tags", self._client)
        return dict((await self._record()).tags)

    async def _set_tags(self, tags: dict[str, str], *, client: object = None) -> None:
        await self._service._before("tags", client or self._client)
        (await self._record()).tags = dict(tags)

    async def _snapshot_filesystem(self, timeout: int = 55, *, ttl: int | None = 2592000) -> FakeImage:
        await self._service._before("snapshot", self._client)
        record = await self._running_for_exec()
        workspace = self._service.machine.workspace_root.lstrip("/")
        done = await self._service.machine.exec(record.sandbox_id, ["sh", "-c", _SNAPSHOT_FS_SCRIPT, workspace])
        if done.exit_code != 0:
            raise mx.SnapshotCreationError(f"Filesystem snapshot failed: {done.stderr.decode(errors='replace')}")
        return self._service._new_image("filesystem", archive=done.stdout, ttl=ttl)

    async def _snapshot_directory(
        self,
        path: str,
        *,
        timeout: int = 55,
        ttl: int | None = 2592000,
        _experimental_encryption_key: bytes | None = None,
    ) -> FakeImage:
        await self._service._before("snapshot", self._client)
        path = str(path)
        if not path.startswith("/"):
            raise mx.InvalidError(f"Snapshot path must be absolute, got: {path}")
        record = await self._running_for_exec()
        done = await self._service.machine.exec(record.sandbox_id, ["tar", "-C", path, "-cf", "-", "."])
        if done.exit_code != 0:
            raise mx.InvalidError(f"Cannot snapshot {path}: {done.stderr.decode(errors='replace').strip()}")
        return self._service._new_image("directory", archive=done.stdout, ttl=ttl)

    async def _mount_image(
        self, path: str, image: object, *, _experimental_encryption_key: bytes | None = None
    ) -> None:
        await self._service._before("mount", self._client)
        path = str(path)
        if not path.startswith("/") or posixpath.normpath(path) == "/":
            raise mx.InvalidError(f"mount_image path must be an absolute directory other than /, got: {path}")
        if not isinstance(image, FakeImage):
            raise mx.InvalidError("Sandbox.mount_image requires an Image with an object id")
        image_record = self._service._image(image.object_id)
        if image_record.kind == "registry":
            raise mx.InvalidError("the Modal fake can mount snapshot images only")
        record = await self._running_for_exec()
        # The mount replaces what was there (the directory itself may be a mount point: empty it).
        script = 'mkdir -p "$1" && find "$1" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} + && tar -C "$1" -xf -'
        if image_record.kind == "filesystem":
            script = 'mkdir -p "$1" && tar -C "$1" -xf -'
        done = await self._service.machine.exec(
            record.sandbox_id, ["sh", "-c", script, "sh", path], stdin=image_record.archive
        )
        if done.exit_code != 0:
            raise mx.InvalidError(f"Cannot mount image at {path}: {done.stderr.decode(errors='replace').strip()}")


# -- class-level APIs ------------------------------------------------------------------------------


class _FakeAppApi:
    def __init__(self, service: FakeModal) -> None:
        self.lookup = _Aio(service._lookup_app)


class _FakeSandboxApi:
    def __init__(self, service: FakeModal) -> None:
        self.create = _Aio(service._create)
        self.from_id = _Aio(service._from_id)
        self.from_name = _Aio(service._from_name)
        self.list = _AioIter(service._list)


class _FakeImageApi:
    def __init__(self, service: FakeModal) -> None:
        self._service = service

    def from_registry(self, tag: str, secret: object = None) -> FakeImage:
        """A lazy registry image (built, and given its id, at the first create)."""
        return FakeImage(tag=tag, secret=secret)

    def from_id(self, image_id: str, client: object = None) -> FakeImage:
        """A lazy reference to an existing image by id."""
        return FakeImage(object_id=image_id)


class _FakeSecretApi:
    def from_name(self, name: str, *, environment_name: str | None = None) -> FakeSecret:
        """A lazy reference to a named Secret."""
        return FakeSecret(name, environment_name)


class _FakeClientApi:
    def __init__(self) -> None:
        self.from_credentials = _Aio(self._from_credentials)

    async def _from_credentials(self, token_id: str, token_secret: str) -> FakeClient:
        return FakeClient(token_id, token_secret)


# -- the service -----------------------------------------------------------------------------------


class FakeModal:
    """The fake ``modal`` package: pass it as ``ModalProvider(settings, sdk=FakeModal(machine))``.

    Args:
        machine: Runs the sandboxes' commands and holds their files.
        faults: Planned failures and latency (a fresh plan when None).
        credentials: The ``(token_id, token_secret)`` the service accepts; None accepts any caller.
        environment: The default Modal environment name.
        finished_retention: How long a finished sandbox still answers ``from_id`` (seconds).
    """

    def __init__(
        self,
        machine: FakeMachine,
        *,
        faults: FaultPlan | None = None,
        credentials: tuple[str, str] | None = None,
        environment: str = "main",
        finished_retention: float = 600.0,
    ) -> None:
        self.machine = machine
        self.faults = faults if faults is not None else FaultPlan()
        self.credentials = credentials
        self.environment = environment
        self.finished_retention = finished_retention
        self.clock_skew = 0.0
        self._apps: dict[tuple[str, str], _AppRecord] = {}
        self._sandboxes: dict[str, FakeSandboxRecord] = {}
        self._images: dict[str, _ImageRecord] = {}
        self._registry_images: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self.App = _FakeAppApi(self)
        self.Sandbox = _FakeSandboxApi(self)
        self.Image = _FakeImageApi(self)
        self.Secret = _FakeSecretApi()
        self.Client = _FakeClientApi()
        self.image_delete = _Aio(self._image_delete)

    # -- test hooks -----------------------------------------------------------------------------

    def now(self) -> float:
        """The service's clock (wall time plus :attr:`clock_skew`)."""
        return time.time() + self.clock_skew

    def advance(self, seconds: float) -> None:
        """Move the service's clock forward (to reach box timeouts, idle kills and image TTLs)."""
        self.clock_skew += seconds

    def record(self, sandbox_id: str) -> FakeSandboxRecord:
        """What the service holds for a sandbox (KeyError once it was purged)."""
        return self._sandboxes[sandbox_id]

    def records(self) -> list[FakeSandboxRecord]:
        """Every sandbox the service still knows, oldest first."""
        return sorted(self._sandboxes.values(), key=lambda r: r.created_at)

    def image_ids(self) -> list[str]:
        """Ids of the snapshot images that exist (not deleted, not expired)."""
        now = self.now()
        return [
            i.image_id
            for i in self._images.values()
            if i.kind != "registry" and (i.expires_at is None or i.expires_at > now)
        ]

    async def aclose(self) -> None:
        """Stop every box the service runs (the machine stays the caller's)."""
        for record in list(self._sandboxes.values()):
            for task in list(record.tasks):
                task.cancel()
            await self.machine.stop(record.sandbox_id)

    # -- internals ------------------------------------------------------------------------------

    async def _before(self, operation: str, client: object) -> None:
        await self.faults.before(operation)
        self._check_client(client)

    def _check_client(self, client: object) -> None:
        if self.credentials is None:
            return
        if not isinstance(client, FakeClient):
            raise mx.AuthError("Token missing. Could not authenticate client.")
        if client.credentials != self.credentials:
            raise mx.AuthError("Token ID or secret is invalid.")

    async def _lookup(self, sandbox_id: str) -> FakeSandboxRecord:
        if not _ID_RE.fullmatch(sandbox_id):
            raise mx.InvalidError(f"Invalid sandbox id: {sandbox_id!r}")
        record = self._sandboxes.get(sandbox_id)
        if record is None:
            raise mx.NotFoundError(f"Sandbox {sandbox_id} not found")
        await self._expire(record)
        if record.finished_at is not None and self.now() - record.finished_at > self.finished_retention:
            del self._sandboxes[sandbox_id]
            raise mx.NotFoundError(f"Modal sandbox {sandbox_id} not found (has been terminated)")
        return record

    async def _expire(self, record: FakeSandboxRecord) -> None:
        if record.returncode is not None:
            return
        now = self.now()
        if now - record.created_at > record.timeout:
            await self._finish(record, _RESULT_TIMEOUT, at=record.created_at + record.timeout)
        elif record.idle_timeout is not None and now - record.last_active > record.idle_timeout:
            await self._finish(record, _RESULT_TIMEOUT, at=record.last_active + record.idle_timeout)

    async def _finish(self, record: FakeSandboxRecord, code: int, *, at: float | None = None) -> None:
        if record.returncode is not None:
            return
        record.returncode = code
        record.finished_at = at if at is not None else self.now()
        await self.machine.stop(record.sandbox_id)

    def _image(self, image_id: str) -> _ImageRecord:
        image = self._images.get(image_id)
        if image is None or (image.expires_at is not None and image.expires_at <= self.now()):
            raise mx.NotFoundError(f"Image {image_id} not found")
        return image

    def _new_image(self, kind: Literal["filesystem", "directory"], *, archive: bytes, ttl: int | None) -> FakeImage:
        if ttl is not None and ttl <= 0:
            raise mx.InvalidError(f"ttl must be positive or None, got: {ttl}")
        image_id = _new_id("im")
        expires = self.now() + ttl if ttl is not None else None
        self._images[image_id] = _ImageRecord(image_id, kind, archive=archive, expires_at=expires)
        return FakeImage(object_id=image_id)

    async def _lookup_app(
        self,
        name: str,
        *,
        client: object = None,
        environment_name: str | None = None,
        create_if_missing: bool = False,
    ) -> FakeApp:
        await self._before("lookup_app", client)
        if not _NAME_RE.fullmatch(name):
            raise mx.InvalidError(f"Invalid App name: '{name}'.")
        key = (environment_name or self.environment, name)
        record = self._apps.get(key)
        if record is None:
            if not create_if_missing:
                raise mx.NotFoundError(f"Could not find App '{name}' in environment '{key[0]}'")
            record = self._apps[key] = _AppRecord(_new_id("ap"), name, key[0])
        return FakeApp(record)

    def _resolve_image(self, image: object) -> str | None:
        if image is None:
            return None
        if not isinstance(image, FakeImage):
            raise mx.InvalidError(f"image must be a modal.Image, not {type(image).__name__}")
        if image._tag is not None:
            image_id = self._registry_images.get(image._tag)
            if image_id is None:
                image_id = self._registry_images[image._tag] = _new_id("im")
                self._images[image_id] = _ImageRecord(image_id, "registry", tag=image._tag)
            image._object_id = image_id
            return image_id
        record = self._image(image.object_id)
        if record.kind == "directory":
            raise mx.InvalidError(f"Image {record.image_id} is a directory snapshot: mount it with mount_image")
        return record.image_id

    async def _create(
        self,
        *args: str,
        app: object = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        image: object = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[object] | None = None,
        timeout: int | None = 300,
        idle_timeout: int | None = None,
        workdir: str | None = None,
        encrypted_ports: Sequence[int] = (),
        client: object = None,
    ) -> FakeSandbox:
        await self._before("create", client)
        if not isinstance(app, FakeApp):
            raise mx.InvalidError("App must be provided when creating a Sandbox outside of a Modal container.")
        if timeout is None:
            raise mx.InvalidError("`timeout=None` is only supported for experimental persistent Sandboxes.")
        if not all(isinstance(a, str) for a in args):
            raise mx.InvalidError("All entrypoint arguments must be strings")
        if name is not None and not _NAME_RE.fullmatch(name):
            raise mx.InvalidError(f"Invalid Sandbox name: '{name}'.")
        if workdir is not None and not workdir.startswith("/"):
            raise mx.InvalidError(f"workdir must be an absolute path, got: {workdir}")
        for port in encrypted_ports:
            if not 1 <= int(port) <= 65535:
                raise mx.InvalidError(f"Invalid port: {port}")
        async with self._lock:
            image_id = self._resolve_image(image)
            if name is not None:
                for other in list(self._sandboxes.values()):
                    await self._expire(other)
                    if other.app_id == app.app_id and other.name == name and other.returncode is None:
                        raise mx.AlreadyExistsError(f"Sandbox with name '{name}' already exists in the App")
            now = self.now()
            record = FakeSandboxRecord(
                sandbox_id=_new_id("sb"),
                app_id=app.app_id,
                name=name,
                args=tuple(args),
                tags=dict(tags or {}),
                image_id=image_id,
                env={k: v for k, v in (env or {}).items() if v is not None},
                secrets=tuple(getattr(s, "name", repr(s)) for s in (secrets or ())),
                timeout=int(timeout),
                idle_timeout=idle_timeout,
                workdir=workdir,
                encrypted_ports=tuple(int(p) for p in encrypted_ports),
                created_at=now,
                last_active=now,
            )
            for n, port in enumerate(record.encrypted_ports):
                host = _label(13) + f".r{n + 3}.modal.host"
                record.tunnels[port] = modal.Tunnel(host=host, port=443, unencrypted_host="", unencrypted_port=0)
            self._sandboxes[record.sandbox_id] = record
        await self.machine.start(record.sandbox_id, record.env)
        if workdir is not None:
            await self.machine.exec(record.sandbox_id, ["mkdir", "-p", workdir], workdir="/")
        if image_id is not None and self._images[image_id].kind == "filesystem":
            done = await self.machine.exec(
                record.sandbox_id, ["tar", "-C", "/", "-xf", "-"], workdir="/", stdin=self._images[image_id].archive
            )
            if done.exit_code != 0:
                raise mx.RemoteError(f"Sandbox failed to start from {image_id}: {done.stderr.decode(errors='replace')}")
        await self.faults.before("create_after")
        return FakeSandbox(self, record, client)

    async def _from_id(self, sandbox_id: str, client: object = None) -> FakeSandbox:
        await self._before("get", client)
        return FakeSandbox(self, await self._lookup(sandbox_id), client)

    async def _from_name(
        self,
        app_name: str,
        name: str,
        *,
        environment_name: str | None = None,
        client: object = None,
    ) -> FakeSandbox:
        await self._before("get", client)
        app = self._apps.get((environment_name or self.environment, app_name))
        if app is not None:
            for record in list(self._sandboxes.values()):
                await self._expire(record)
                if record.app_id == app.app_id and record.name == name and record.returncode is None:
                    return FakeSandbox(self, record, client)
        raise mx.NotFoundError(f"Sandbox with name '{name}' not found in App '{app_name}'")

    async def _list(
        self, *, app_id: str | None = None, tags: dict[str, str] | None = None, client: object = None
    ) -> AsyncIterator[FakeSandbox]:
        await self._before("list_boxes", client)
        wanted = dict(tags or {})
        found: list[FakeSandboxRecord] = []
        for record in list(self._sandboxes.values()):
            await self._expire(record)
            if record.returncode is not None or (app_id and record.app_id != app_id):
                continue
            if all(record.tags.get(k) == v for k, v in wanted.items()):
                found.append(record)
        for record in sorted(found, key=lambda r: r.created_at, reverse=True):
            yield FakeSandbox(self, record, client)

    async def _image_delete(self, image_id: str, *, client: object = None) -> None:
        await self._before("image_delete", client)
        self._image(image_id)
        del self._images[image_id]
