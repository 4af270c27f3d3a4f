"""The ``selfhosted`` provider: a user's own machine, reached over NATS request/reply.

There is no box to create: the machine already exists and runs the agent daemon
(``sandboxctl agent run``), which answers on ``agent.<workspace_id>.<agent_id>.rpc``. So
:meth:`SelfhostedProvider.create` and :meth:`SelfhostedProvider.resume` both just bind a
:class:`SelfhostedSession` to that subject (``create`` also checks that the agent answers), the
persisted state is ``{"agentId": ...}`` only, and ``terminate`` never touches the machine.

The load-bearing rule: an agent that does not answer is *offline* (``AGENT_OFFLINE``) or
*reconnecting* (``TIMEOUT``), never a provider NotFound. A user's machine cannot be recreated, so
nothing here ever raises :class:`~sandbox.errors.BoxNotFound`, and the lease never cold-creates a
rival box for it.

Pieces:

- :class:`ControlRpc` is the transport seam; :class:`NatsControlRpc` dials NATS lazily (boot never
  needs NATS) and turns every transport failure into an error *response* (no responders →
  ``AGENT_OFFLINE``, timeout → ``TIMEOUT``, malformed reply → ``PROTOCOL``), never an exception.
  :class:`MockAgentResponder` is an in-process ControlRpc for tests.
- :class:`SelfhostedSession` implements :class:`~sandbox.box.BoxSession` over a ControlRpc:
  every op carries the session's epoch, retries follow :class:`RetryPolicy` (upstream §8.3), large
  files move in chunks that fit the link's per-message limit, and ``resolve_exposed_port`` returns
  the relay URL shape ``wss://<relay>/stream?ws=…&agent=…&port=…&channel=…``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import random
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, TypeVar, runtime_checkable
from urllib.parse import quote, urlsplit

from tenacity import AsyncRetrying, retry_if_exception

from providers.selfhosted_terminal import RemotePty
from sandbox.box import BoxSpec, DirEntry, Endpoint, Envelope, ExecResult, OwnedBox
from sandbox.control_auth import REQUEST_VALIDITY_SECONDS, ControlSigningKey, ReplyVerifier
from sandbox.control_protocol import (
    NATS_DEFAULT_MAX_PAYLOAD,
    ControlErrorCode,
    ControlOp,
    ControlRequest,
    ControlResponse,
    DesktopInputOp,
    DesktopInputReply,
    ExecOp,
    ExecReply,
    FsEntry,
    FsListOp,
    FsListReply,
    FsReadOp,
    FsReadReply,
    FsStatOp,
    FsStatReply,
    FsWriteOp,
    FsWriteReply,
    KeyEvent,
    PingOp,
    PingReply,
    PointerEvent,
    PtyOpenOp,
    PtyOpenReply,
    ScreenshotOp,
    ScreenshotReply,
    ScrollEvent,
    StreamEnsureOp,
    StreamEnsureReply,
    agent_error_to_control_error,
    agent_subject,
    build_op,
    decode_response,
    draining_message,
    encode_message,
    error_response,
    max_chunk_bytes,
    parse_agent_subject,
    payload_too_large_response,
    validate_agent_token,
)
from sandbox.descriptors import DESKTOP_STREAM_PORT, NEVER_SENT_DETAIL_KEY, get_descriptor
from sandbox.errors import (
    AgentOffline,
    ChannelAUnsupported,
    ControlUnauthenticated,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    SandboxConfigError,
    SelfhostedControlError,
    Unsupported,
)
from sandbox.nats_auth import NatsAuth
from sandbox.nats_dial import dial_within

if TYPE_CHECKING:
    from sandbox.channel_a.pty import ExitCallback, OutputCallback
    from sandbox.descriptors import CapabilityDescriptor
    from sandbox.settings import Settings

_log = logging.getLogger(__name__)

__all__ = [
    "BACKEND_ID",
    "DEFAULT_RELAY_HOST",
    "READ_ONLY_OPS",
    "SELFHOSTED_DEFAULT_TIMEOUT_SECONDS",
    "AgentProbe",
    "ControlRpc",
    "MockAgentResponder",
    "NatsControlRpc",
    "RelayConfig",
    "RetryPolicy",
    "SelfhostedProvider",
    "SelfhostedSession",
    "is_provider_sandbox_not_found",
    "parse_instance_id",
    "probe_agent",
    "selfhosted_instance_id",
    "to_machine_path",
]

BACKEND_ID: Final = "selfhosted"
SELFHOSTED_DEFAULT_TIMEOUT_SECONDS: Final = 30.0
EXEC_GRACE_SECONDS: Final = 5.0
"""An exec waits this much longer than the command's own deadline, so the agent can report the kill."""
DEFAULT_RELAY_HOST: Final = "relay.sandbox.local"
RELAY_STREAM_PATH: Final = "/stream"
VIRTUAL_ROOT: Final = "/workspace"
FS_CHUNK_BYTES: Final = 512 * 1024
"""File content moves in ranges of this size (base64 of it fits the default 1 MiB NATS message)."""
READ_ONLY_OPS: Final = frozenset({"ping", "fs_stat", "fs_list", "fs_read"})
"""Ops that may be repeated after an ambiguous TIMEOUT: they change nothing on the machine."""

_R = TypeVar("_R")


def is_provider_sandbox_not_found(err: BaseException) -> bool:
    """Always False: no selfhosted failure proves a box gone (a user's machine is never recreated)."""
    del err
    return False


# --- the transport seam ---------------------------------------------------------------------------


@runtime_checkable
class ControlRpc(Protocol):
    """Sends one request to an agent and returns its response; transport failures are responses too."""

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        """The agent's answer to ``request`` on ``subject``, or an error response; never raises."""
        ...


def _offline(request_id: str, message: str, *, never_sent: bool) -> ControlResponse:
    detail = {NEVER_SENT_DETAIL_KEY: "1"} if never_sent else {}
    return error_response(request_id, ControlErrorCode.AGENT_OFFLINE, message, detail=detail)


class _NatsConnection(Protocol):
    """The slice of ``nats.aio.client.Client`` this module uses."""

    @property
    def is_closed(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    def new_inbox(self) -> str: ...

    async def subscribe(self, subject: str, *, cb: Callable[[Any], Awaitable[None]]) -> Any: ...

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
    ) -> None: ...

    async def close(self) -> None: ...


async def _quiet(_err: Exception) -> None:
    # nats-py logs every reconnect attempt through the error callback; outcomes reach callers as responses.
    return None


_NO_RESPONDERS: Final = "503"
_HEADER_ALLOWANCE: Final = 512
"""Bytes a request's signature headers take from the message limit (key id and signature: ~150)."""


class _ReplyBox:
    """The replies that arrived for one request, until one verifies."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.rejected: ControlUnauthenticated | None = None


class NatsControlRpc:
    """A :class:`ControlRpc` over NATS request/reply, connected lazily and shared by concurrent callers.

    Every request is signed with the deployment's :class:`~sandbox.control_auth.ControlSigningKey`
    and carries an expiry; a reply counts only if the agent the subject names signed it over this
    exact request (:class:`~sandbox.control_auth.ReplyVerifier`). Replies that do not verify are
    dropped and the wait goes on, so an impostor that answers first cannot displace the real
    agent's answer; if nothing genuine arrives, the outcome is ``UNAUTHENTICATED``.

    Outcomes (upstream §8.2): no connection, no responders, or a publish refused while the link
    reconnects → ``AGENT_OFFLINE`` marked never-sent; a request over the server's max payload →
    ``PAYLOAD_TOO_LARGE`` (never sent); a timeout → ``TIMEOUT`` (ambiguous: it may have run); any
    other transport error → ``AGENT_OFFLINE`` (not never-sent) and the connection is dropped so
    the next call re-dials. Replies are decoded with
    :func:`~sandbox.control_protocol.decode_response` (bad reply → ``PROTOCOL``).
    """

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        signing_key: ControlSigningKey,
        auth: NatsAuth | Callable[[], NatsAuth] | None = None,
        connect: Callable[[], Awaitable[_NatsConnection | None]] | None = None,
        name: str = "sandbox-runtime",
        connect_timeout: float = 2.0,
        reconnect_wait: float = 0.25,
    ) -> None:
        self._servers = [servers] if isinstance(servers, str) else list(servers)
        self._key = signing_key
        self._verifier = ReplyVerifier(signing_key.public)
        # A callable is resolved at the first dial: building the provider needs no credential.
        self._auth = auth or NatsAuth()
        self._connect = connect or self._dial
        self._name = name
        self._connect_timeout = connect_timeout
        self._reconnect_wait = reconnect_wait
        self._nc: _NatsConnection | None = None
        self._lock = asyncio.Lock()
        self._waiting: set[asyncio.Future[Any]] = set()
        self._cut_off: set[asyncio.Future[Any]] = set()
        self._inbox_prefix = ""
        self._boxes: dict[str, _ReplyBox] = {}

    @classmethod
    def for_settings(cls, settings: Settings, **kwargs: Any) -> NatsControlRpc:
        """The runtime's control RPC: ``SANDBOX_NATS_URL``, its NATS credential and the deployment key.

        Raises:
            SandboxConfigError: no NATS credential (while auth is on) or an unreadable signing key.
        """
        return cls(
            settings.nats_url,
            signing_key=ControlSigningKey.load(settings.control_key_path()),
            auth=lambda: NatsAuth.for_role(settings, "runtime"),
            **kwargs,
        )

    async def _on_disconnect(self) -> None:
        # A reply cannot cross a dropped link: fail the waiting requests now (ambiguously, they may
        # have run) instead of letting each wait out its own deadline, which for an exec is minutes.
        for waiter in list(self._waiting):
            if not waiter.done():
                self._cut_off.add(waiter)
                waiter.cancel()

    async def _dial(self) -> _NatsConnection | None:
        import nats

        # Reconnect forever once connected; the first dial is bounded so a caller is never stuck.
        # A publish while reconnecting fails fast (no pending buffer) instead of being replayed later.
        auth = self._auth() if callable(self._auth) else self._auth
        options = auth.connect_options()
        connection: _NatsConnection = await dial_within(
            lambda: nats.connect(
                self._servers,
                name=self._name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=self._reconnect_wait,
                connect_timeout=max(1, int(self._connect_timeout)),
                pending_size=0,
                error_cb=_quiet,
                disconnected_cb=self._on_disconnect,
                **options,
            ),
            self._connect_timeout,
        )
        return connection

    async def _on_reply(self, msg: Any) -> None:
        box = self._boxes.get(msg.subject.rpartition(".")[2])
        if box is not None:
            box.queue.put_nowait(msg)

    async def _connection(self) -> _NatsConnection | None:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            return nc
        async with self._lock:
            nc = self._nc
            if nc is not None and not nc.is_closed:
                return nc
            try:
                nc = await self._connect()
                if nc is None:
                    return None
                # One wildcard inbox per connection; each request waits on its own last token.
                self._inbox_prefix = nc.new_inbox()
                await nc.subscribe(f"{self._inbox_prefix}.*", cb=self._on_reply)
            except asyncio.CancelledError:
                raise
            except SandboxConfigError as err:
                # No credential: every op answers AGENT_OFFLINE; say why once per attempt in the log.
                _log.warning("cannot connect to NATS: %s", err.message)
                return None
            except Exception:
                return None
            self._nc = nc
            return nc

    async def _drop(self, nc: _NatsConnection) -> None:
        if self._nc is nc:
            self._nc = None
        with contextlib.suppress(Exception):
            await nc.close()

    @property
    def max_payload(self) -> int:
        """The connected server's per-message limit (the NATS default before the first connection)."""
        nc = self._nc
        return nc.max_payload if nc is not None else NATS_DEFAULT_MAX_PAYLOAD

    async def _genuine_reply(
        self, box: _ReplyBox, subject: str, workspace_id: str, agent_id: str, payload: bytes, timeout: float
    ) -> Any:
        """The first reply in ``box`` that verifies, a no-responders notice, or TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            msg = await asyncio.wait_for(box.queue.get(), remaining)
            headers = msg.headers or {}
            if not msg.data and headers.get("Status") == _NO_RESPONDERS:
                return msg
            try:
                self._verifier.verify(subject, workspace_id, agent_id, payload, msg.data, headers)
            except ControlUnauthenticated as err:
                box.rejected = err
                continue
            return msg

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        """Send ``request`` signed and return the agent's verified response or a synthesized error; never raises."""
        from nats import errors as nats_errors

        rid = request.request_id
        workspace_id, agent_id = parse_agent_subject(subject)
        nc = await self._connection()
        if nc is None:
            return _offline(rid, "no connection to the NATS server", never_sent=True)
        expires = int((time.time() + REQUEST_VALIDITY_SECONDS) * 1000)
        payload = encode_message(request.model_copy(update={"expires_at_ms": expires}))
        if len(payload) + _HEADER_ALLOWANCE > nc.max_payload:
            # Refused before publishing: the agent never saw it, so the caller may safely resend smaller.
            return error_response(
                rid,
                ControlErrorCode.PAYLOAD_TOO_LARGE,
                f"request of {len(payload)} bytes exceeds the server's max payload {nc.max_payload}",
                detail={
                    "encoded_bytes": str(len(payload)),
                    "max_payload": str(nc.max_payload),
                    NEVER_SENT_DETAIL_KEY: "1",
                },
            )
        token = uuid.uuid4().hex
        box = _ReplyBox()
        self._boxes[token] = box
        try:
            try:
                await nc.publish(
                    subject,
                    payload,
                    reply=f"{self._inbox_prefix}.{token}",
                    headers=self._key.sign_request(subject, payload),
                )
            except nats_errors.MaxPayloadError:
                return payload_too_large_response(rid, len(payload), nc.max_payload)
            except (nats_errors.OutboundBufferLimitError, nats_errors.ConnectionReconnectingError):
                return _offline(rid, "the NATS link is reconnecting", never_sent=True)
            except nats_errors.ConnectionClosedError:
                await self._drop(nc)
                return _offline(rid, "the NATS connection is closed", never_sent=True)
            waiter: asyncio.Future[Any] = asyncio.ensure_future(
                self._genuine_reply(box, subject, workspace_id, agent_id, payload, timeout)
            )
            self._waiting.add(waiter)
            try:
                msg = await waiter
            except asyncio.CancelledError:
                if waiter not in self._cut_off:
                    raise
                return error_response(
                    rid, ControlErrorCode.TIMEOUT, "the NATS link dropped while waiting for the agent's reply"
                )
            except (TimeoutError, nats_errors.TimeoutError):
                if box.rejected is not None:
                    return error_response(
                        rid,
                        ControlErrorCode.UNAUTHENTICATED,
                        f"no reply from the agent verified within {timeout:g}s ({box.rejected.message})",
                        retryable=False,
                        detail={"reason": box.rejected.reason},
                    )
                return error_response(rid, ControlErrorCode.TIMEOUT, f"the agent did not answer within {timeout:g}s")
            except Exception as err:
                await self._drop(nc)
                return _offline(rid, f"NATS request failed: {type(err).__name__}", never_sent=False)
            finally:
                self._waiting.discard(waiter)
                self._cut_off.discard(waiter)
        except Exception as err:
            await self._drop(nc)
            return _offline(rid, f"NATS request failed: {type(err).__name__}", never_sent=False)
        finally:
            self._boxes.pop(token, None)
        if not msg.data and (msg.headers or {}).get("Status") == _NO_RESPONDERS:
            return _offline(rid, "no agent responded (offline)", never_sent=True)
        return decode_response(msg.data, request_id=rid, op_type=request.op.type)

    async def close(self) -> None:
        """Close the connection, if one was made; a later request dials again."""
        nc = self._nc
        if nc is not None:
            await self._drop(nc)


# --- the in-process responder for tests -----------------------------------------------------------

ExecHandler = Callable[[ExecOp], Awaitable[ExecReply] | ExecReply]


class MockAgentResponder:
    """An in-process :class:`ControlRpc` that behaves like a small agent (for unit tests).

    Checks, in order: offline → ``AGENT_OFFLINE`` (never sent); draining → ``DRAINING``; an epoch
    older than the newest seen → ``FENCED``. Then: ``ping`` echoes the nonce; ``exec`` runs
    ``exec_handler`` (default: echo argv, or print ``hostname`` when asked for it); files live in
    memory (paths normalised, ``..`` refused); ``desktop_input`` needs ``consented`` and a display;
    ``screenshot`` needs a display; ``stream_ensure`` returns ``<ws>:<agent>:<port>`` channels.
    Every request is recorded in :attr:`requests`.
    """

    PNG_1X1: Final = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )

    def __init__(
        self,
        *,
        online: bool = True,
        consented: bool = True,
        draining: bool = False,
        has_display: bool = False,
        files: Mapping[str, bytes | str] | None = None,
        exec_handler: ExecHandler | None = None,
        hostname: str = "mock-machine",
    ) -> None:
        self.online = online
        self.consented = consented
        self.draining = draining
        self.has_display = has_display
        self.hostname = hostname
        self.exec_handler = exec_handler
        self.newest_epoch = 0
        self.files: dict[str, bytes] = {}
        self.inputs: list[DesktopInputOp] = []
        self.requests: list[tuple[str, ControlRequest]] = []
        self._uploads: dict[str, bytearray] = {}
        for path, content in (files or {}).items():
            self.files[self._norm(path)] = content.encode() if isinstance(content, str) else bytes(content)

    def set_online(self, online: bool) -> None:
        """Take the mock agent offline or bring it back."""
        self.online = online

    def file_bytes(self, path: str) -> bytes | None:
        """The content of a file the mock holds, or None."""
        return self.files.get(self._norm(path))

    @staticmethod
    def _norm(path: str) -> str:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise InvalidRequest(f"path escapes the agent root: {path}")
        return "/".join(parts)

    async def request(self, subject: str, request: ControlRequest, *, timeout: float) -> ControlResponse:
        """Answer like an agent would (see the class docstring)."""
        del timeout
        parse_agent_subject(subject)
        self.requests.append((subject, request))
        rid = request.request_id
        if not self.online:
            return _offline(rid, "the enrolled agent is offline", never_sent=True)
        if self.draining:
            return error_response(rid, ControlErrorCode.DRAINING, "the agent is draining")
        if request.epoch < self.newest_epoch:
            return error_response(
                rid, ControlErrorCode.FENCED, f"epoch {request.epoch} is older than {self.newest_epoch}"
            )
        self.newest_epoch = request.epoch
        try:
            result = await self._handle(request.op)
        except InvalidRequest as err:
            return error_response(rid, ControlErrorCode.OS, err.message, detail={"reason": "path_escape"})
        if isinstance(result, ControlResponse):
            return result.model_copy(update={"request_id": rid})
        return ControlResponse(request_id=rid, result=result)

    async def _handle(self, op: Any) -> Any:
        if isinstance(op, PingOp):
            return PingReply(
                nonce=op.nonce,
                hostname=self.hostname,
                has_display=self.has_display,
                screen_control=self.consented,
                newest_epoch=self.newest_epoch,
            )
        if isinstance(op, ExecOp):
            if self.exec_handler is not None:
                out = self.exec_handler(op)
                return await out if asyncio.iscoroutine(out) else out
            text = self.hostname if any("hostname" in a for a in op.command) else " ".join(op.command)
            return ExecReply(exit_code=0, stdout=(text + "\n").encode(), duration_ms=1)
        if isinstance(op, FsReadOp):
            key = self._norm(op.path)
            if key not in self.files:
                return error_response("", ControlErrorCode.NOT_FOUND, f"no such file: {op.path}")
            data = self.files[key]
            end = len(data) if op.length == 0 else op.offset + op.length
            return FsReadReply(content=data[op.offset : end], total_size=len(data))
        if isinstance(op, FsWriteOp):
            return self._write(op)
        if isinstance(op, FsListOp):
            prefix = self._norm(op.path)
            entries = []
            for name, data in sorted(self.files.items()):
                rel = name[len(prefix) + 1 :] if prefix else name
                if (not prefix or name.startswith(prefix + "/")) and (op.recursive or "/" not in rel):
                    entries.append(
                        FsEntry(name=posixpath.basename(name), path=rel, kind="file", size=len(data), mode=0o644)
                    )
            return FsListReply(entries=entries)
        if isinstance(op, FsStatOp):
            key = self._norm(op.path)
            if key in self.files:
                entry = FsEntry(name=posixpath.basename(key), path=key, kind="file", size=len(self.files[key]))
                return FsStatReply(exists=True, entry=entry)
            return FsStatReply(exists=False)
        if isinstance(op, ScreenshotOp):
            if not self.has_display:
                return error_response(
                    "", ControlErrorCode.UNSUPPORTED, "no display", detail={"reason": "display_unavailable"}
                )
            return ScreenshotReply(png=self.PNG_1X1, width=1, height=1)
        if isinstance(op, DesktopInputOp):
            if not self.consented:
                return error_response("", ControlErrorCode.CONSENT_REQUIRED, "screen control is not allowed")
            if not self.has_display:
                return error_response(
                    "", ControlErrorCode.UNSUPPORTED, "no display", detail={"reason": "display_unavailable"}
                )
            self.inputs.append(op)
            return DesktopInputReply()
        if isinstance(op, StreamEnsureOp):
            return StreamEnsureReply(channel=None)
        return error_response("", ControlErrorCode.UNSUPPORTED, f"mock does not implement {op.type}")

    def _write(self, op: FsWriteOp) -> Any:
        key = self._norm(op.path)
        if op.upload_id is not None:
            buf = self._uploads.setdefault(op.upload_id, bytearray())
            del buf[op.upload_offset :]
            if len(buf) != op.upload_offset:
                return error_response("", ControlErrorCode.PROTOCOL, "upload chunk leaves a gap")
            buf += op.content
            if op.final:
                self.files[key] = bytes(self._uploads.pop(op.upload_id))
            return FsWriteReply(bytes_written=len(op.content))
        if op.append:
            self.files[key] = self.files.get(key, b"") + op.content
        else:
            self.files[key] = op.content
        return FsWriteReply(bytes_written=len(op.content))


# --- relay ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    """Where viewers dial the relay that pairs them with a machine's stream channel."""

    host: str = DEFAULT_RELAY_HOST
    port: int = 443
    tls: bool = True
    path: str = RELAY_STREAM_PATH

    @classmethod
    def from_url(cls, raw: str | None) -> RelayConfig:
        """Parse ``SANDBOX_SELFHOSTED_RELAY_URL`` (upstream rules): no scheme means ``wss://``;
        ``wss``/``https`` are TLS; the port defaults to 443 or 80; an empty or ``/`` path is
        ``/stream``; unset gives the default relay, and text that does not parse becomes the host.
        """
        if raw is None or not raw.strip():
            return cls()
        text = raw.strip()
        url = text if "://" in text else f"wss://{text}"
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port
        except ValueError:
            return cls(host=text)
        if not host:
            return cls(host=text)
        tls = parts.scheme.lower() in ("wss", "https")
        path = parts.path if parts.path not in ("", "/") else RELAY_STREAM_PATH
        return cls(host=host, port=port or (443 if tls else 80), tls=tls, path=path)


# --- retry policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed op is sent again (upstream §8.3), always with a new request id.

    Never-sent failures retry up to ``never_sent`` times for any op; a draining agent up to
    ``draining_exec`` times for ``exec`` and ``draining`` times otherwise; a reconnecting agent
    (TIMEOUT) only for read-only ops, ``reconnecting`` times. Everything else fails at once.
    The delay before retry ``n`` is ``jitter * min(max_delay, base_delay * 2**n)``.
    """

    never_sent: int = 3
    draining_exec: int = 10
    draining: int = 3
    reconnecting: int = 1
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return jitter * min(self.max_delay, self.base_delay * 2.0**attempt)

    def retry_class(self, err: SelfhostedControlError, op_type: str) -> tuple[str, int] | None:
        """The retry class of a failure and its budget, or None when it must not be retried."""
        if err.never_sent:
            return "never_sent", self.never_sent
        if err.draining:
            return "draining", self.draining_exec if op_type == "exec" else self.draining
        if err.reason == "agent_reconnecting" and op_type in READ_ONLY_OPS:
            return "reconnecting", self.reconnecting
        return None


# --- paths and ids --------------------------------------------------------------------------------


def to_machine_path(path: str, working_dir: str = "") -> str:
    """Map a session path to the agent's: the virtual root ``/workspace`` (and ``""``) is the working
    dir (``""`` = the agent's root), ``/workspace/x`` and bare relative paths are under it, and any
    other absolute path is passed through (the agent refuses it unless it lies inside its root).

    Raises:
        InvalidRequest: the path holds a NUL character (no file can be named so; nothing is sent).
    """
    if "\0" in path:
        raise InvalidRequest("path contains a NUL character")
    if path in ("", VIRTUAL_ROOT, VIRTUAL_ROOT + "/"):
        return working_dir
    if path.startswith(VIRTUAL_ROOT + "/"):
        rest = path[len(VIRTUAL_ROOT) + 1 :]
        return posixpath.join(working_dir, rest) if working_dir else rest
    if path.startswith("/"):
        return path
    return posixpath.join(working_dir, path) if working_dir else path


_INSTANCE_RE: Final = re.compile(r"^(?P<ws>[A-Za-z0-9_-]{1,128})/(?P<agent>[A-Za-z0-9_-]{1,128})@(?P<epoch>\d{1,10})$")


def selfhosted_instance_id(workspace_id: str, agent_id: str, epoch: int) -> str:
    """The instance id of a binding: ``<workspace_id>/<agent_id>@<epoch>`` (the machine plus its fence)."""
    validate_agent_token(workspace_id, "workspace id")
    validate_agent_token(agent_id, "agent id")
    return f"{workspace_id}/{agent_id}@{epoch}"


def parse_instance_id(instance_id: str) -> tuple[str, str, int]:
    """``(workspace_id, agent_id, epoch)`` of a selfhosted instance id.

    Raises:
        InvalidRequest: the id is not ``<workspace>/<agent>@<epoch>``.
    """
    match = _INSTANCE_RE.fullmatch(instance_id) if isinstance(instance_id, str) else None
    if match is None:
        raise InvalidRequest(f"not a selfhosted instance id (<workspace>/<agent>@<epoch>): {instance_id!r}")
    return match["ws"], match["agent"], int(match["epoch"])


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _draining_exhausted(err: SelfhostedControlError, retries: int) -> SelfhostedControlError:
    # Rebuilt from our own count once the draining retries run out (upstream §8.3): the mapping
    # itself never reads an agent-supplied count into the message.
    return SelfhostedControlError(
        draining_message(retries),
        code=err.code,
        reason=err.reason,
        retryable=err.retryable,
        fenced=err.fenced,
        draining=err.draining,
        agent_offline=err.agent_offline,
        os_not_found=err.os_not_found,
        payload_too_large=err.payload_too_large,
        never_sent=err.never_sent,
        control_request_id=err.control_request_id,
        detail={**err.detail, "retries": str(retries)},
    )


# --- the session ----------------------------------------------------------------------------------


class _RetryBudget:
    """The retries one call has spent per class of :meth:`RetryPolicy.retry_class`, and whether one more is allowed."""

    def __init__(self, policy: RetryPolicy, op_type: str) -> None:
        self._policy = policy
        self._op_type = op_type
        self.spent: dict[str, int] = {}

    def allows(self, err: BaseException) -> bool:
        """Whether ``err`` may be retried (and, if so, spend one retry of its class)."""
        if not isinstance(err, SelfhostedControlError):
            return False
        retry = self._policy.retry_class(err, self._op_type)
        if retry is None or self.spent.get(retry[0], 0) >= retry[1]:
            return False
        self.spent[retry[0]] = self.spent.get(retry[0], 0) + 1
        return True


def _sniff_image(data: bytes, path: str) -> str:
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"BM", "image/bmp"),
        (b"II*\x00", "image/tiff"),
        (b"MM\x00*", "image/tiff"),
    )
    for magic, mime in signatures:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "image/svg+xml"
    by_ext = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".gif": "image/gif",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
        ".tif": "image/tiff",
        ".tiff": "image/tiff",
        ".svg": "image/svg+xml",
    }
    return by_ext.get(posixpath.splitext(path)[1].lower(), "application/octet-stream")


class SelfhostedSession:
    """A :class:`~sandbox.box.BoxSession` on a user's machine, over a :class:`ControlRpc`.

    Every op carries :attr:`epoch`; the agent refuses it with ``FENCED`` once it has seen a newer
    one. Failures raise :class:`~sandbox.errors.SelfhostedControlError` (never ``BoxNotFound``),
    except where the BoxSession contract names a type: a missing file is
    :class:`~sandbox.errors.PathNotFound`, a path outside the agent's root
    :class:`~sandbox.errors.InvalidRequest`, and a command killed at its deadline
    :class:`~sandbox.errors.ExecTimeout`.
    """

    backend_id: Final = BACKEND_ID
    exec_reply_budget: Final = max_chunk_bytes(NATS_DEFAULT_MAX_PAYLOAD)
    """Raw output bytes one exec reply can carry (:class:`~sandbox.box.BoundedExecReplies`)."""

    def __init__(
        self,
        rpc: ControlRpc,
        *,
        workspace_id: str,
        agent_id: str,
        epoch: int = 0,
        relay: RelayConfig | None = None,
        timeout: float = SELFHOSTED_DEFAULT_TIMEOUT_SECONDS,
        default_exec_timeout: float = 600.0,
        working_dir: str = "",
        retry: RetryPolicy | None = None,
        chunk_bytes: int = FS_CHUNK_BYTES,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rpc = rpc
        self.workspace_id = workspace_id
        self.agent_id = agent_id
        self.subject = agent_subject(workspace_id, agent_id)
        self.epoch = epoch
        self.relay = relay or RelayConfig()
        self.timeout = timeout
        self.default_exec_timeout = default_exec_timeout
        self.working_dir = working_dir
        self.retry = retry or RetryPolicy()
        self._chunk = max(1, min(chunk_bytes, max_chunk_bytes(NATS_DEFAULT_MAX_PAYLOAD)))
        self._sleep = sleep
        self._instance_id = selfhosted_instance_id(workspace_id, agent_id, epoch)

    @property
    def instance_id(self) -> str:
        """``<workspace_id>/<agent_id>@<epoch>``."""
        return self._instance_id

    @property
    def chunk_bytes(self) -> int:
        """The most payload bytes one request carries (file pieces, typed input)."""
        return self._chunk

    # --- the one call path ---

    async def call(self, op: ControlOp, reply_type: type[_R], *, timeout: float | None = None) -> _R:
        """Send ``op`` under this session's epoch, retrying per :attr:`retry`; return the typed reply.

        Raises:
            SelfhostedControlError: the agent (or the transport in its name) answered with an error.
        """
        wait = self.timeout if timeout is None else timeout
        budget = _RetryBudget(self.retry, op.type)

        async def attempt() -> _R:
            request = ControlRequest(request_id=_new_request_id(), epoch=self.epoch, op=op)
            response = await self._rpc.request(self.subject, request, timeout=wait)
            if response.error is None and isinstance(response.result, reply_type):
                return response.result
            if response.error is None:
                response = error_response(
                    request.request_id, ControlErrorCode.PROTOCOL, f"agent answered {op.type} with the wrong result"
                )
            assert response.error is not None
            raise agent_error_to_control_error(response.error, request.request_id)

        # Every retry is a new request (a new id); the delay before retry n is RetryPolicy.delay(n, jitter).
        retrying = AsyncRetrying(
            retry=retry_if_exception(budget.allows),
            wait=lambda state: self.retry.delay(state.attempt_number - 1, random.random()),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except SelfhostedControlError as err:
            drained = budget.spent.get("draining")
            if err.draining and drained:
                raise _draining_exhausted(err, drained) from None
            raise

    def _path(self, path: str) -> str:
        return to_machine_path(path, self.working_dir)

    @staticmethod
    def _raise_typed(err: SelfhostedControlError, path: str) -> NoReturn:
        # The agent's own error is re-raised as it is: ``raise err from err`` would make a cause
        # cycle, on which Temporal's failure converter recurses until RecursionError.
        if err.os_not_found:
            raise PathNotFound(f"no such file or directory on the machine: {path}", path=path) from err
        if err.detail.get("reason") == "path_escape":
            raise InvalidRequest(f"path {path!r} is outside the agent's root: {err.message}") from err
        raise err

    # --- BoxSession ---

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        workdir: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run argv ``cmd`` on the machine (cwd under the working dir) and wait for it.

        Raises:
            ExecTimeout: the agent killed the command at ``timeout`` seconds.
            SelfhostedControlError: the agent is offline, draining, fenced, or refused the command.
        """
        deadline = self.default_exec_timeout if timeout is None else timeout
        op = build_op(
            ExecOp,
            command=list(cmd),
            cwd=self._path(workdir or ""),
            env=dict(env or {}),
            stdin=stdin or b"",
            timeout_ms=max(1, int(deadline * 1000)),
        )
        try:
            reply = await self.call(op, ExecReply, timeout=deadline + EXEC_GRACE_SECONDS)
        except SelfhostedControlError as err:
            self._raise_typed(err, workdir or "")
        if reply.timed_out:
            raise ExecTimeout(f"command ran past its {deadline:g}s timeout on the machine", timeout=deadline)
        return ExecResult(exit_code=reply.exit_code, stdout=reply.stdout, stderr=reply.stderr)

    async def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole file (binary safe) in ranges that fit the link, up to ``max_bytes`` when set.

        Raises:
            PathNotFound: the file does not exist.
            InvalidRequest: the path is outside the agent's root.
        """
        out = bytearray()
        offset = 0
        while True:
            want = self._chunk if max_bytes is None else min(self._chunk, max_bytes - offset)
            if want <= 0:
                break
            try:
                reply = await self.call(
                    build_op(FsReadOp, path=self._path(path), offset=offset, length=want), FsReadReply
                )
            except SelfhostedControlError as err:
                self._raise_typed(err, path)
            out += reply.content
            offset += len(reply.content)
            if not reply.content or offset >= reply.total_size:
                break
        return bytes(out)

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a whole file, creating parents; content larger than one message goes up in chunks
        to a staging file that replaces ``path`` only when complete.

        Raises:
            InvalidRequest: the path is outside the agent's root.
            SelfhostedControlError: the agent failed the write.
        """
        target = self._path(path)
        try:
            if len(data) <= self._chunk:
                await self.call(build_op(FsWriteOp, path=target, content=data), FsWriteReply)
                return
            upload = secrets.token_hex(12)
            for offset in range(0, len(data), self._chunk):
                chunk = data[offset : offset + self._chunk]
                final = offset + len(chunk) >= len(data)
                op = build_op(
                    FsWriteOp, path=target, content=chunk, upload_id=upload, upload_offset=offset, final=final
                )
                await self.call(op, FsWriteReply)
        except SelfhostedControlError as err:
            self._raise_typed(err, path)

    async def append_file(self, path: str, data: bytes) -> int:
        """Append to a file (creating it); returns the bytes written."""
        try:
            reply = await self.call(build_op(FsWriteOp, path=self._path(path), content=data, append=True), FsWriteReply)
        except SelfhostedControlError as err:
            self._raise_typed(err, path)
        return reply.bytes_written

    async def list_files(self, path: str, *, recursive: bool = False) -> list[FsEntry]:
        """The agent's entries for a directory (paths relative to it)."""
        try:
            reply = await self.call(build_op(FsListOp, path=self._path(path), recursive=recursive), FsListReply)
        except SelfhostedControlError as err:
            self._raise_typed(err, path)
        return list(reply.entries)

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List one directory level."""
        kinds = {"file": "file", "directory": "dir", "symlink": "symlink"}
        return [
            DirEntry(name=e.name, kind=kinds.get(e.kind, "other"), size=e.size, mode=e.mode)
            for e in await self.list_files(path)
        ]

    async def stat(self, path: str) -> FsStatReply:
        """Whether a path exists on the machine, and what it is."""
        try:
            return await self.call(build_op(FsStatOp, path=self._path(path)), FsStatReply)
        except SelfhostedControlError as err:
            self._raise_typed(err, path)

    async def path_exists(self, path: str) -> bool:
        """Whether the path exists on the machine."""
        return (await self.stat(path)).exists

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """Ask the agent for a stream channel for ``port`` and return the relay endpoint to dial:
        ``<relay>/stream?ws=<ws>&agent=<agent>&port=<port>&channel=<channel>`` (the viewer sends
        its ``ogs_`` token in-band, never in the URL). Port 6080 is the desktop, others a PTY.
        """
        kind = "desktop" if port == DESKTOP_STREAM_PORT else "pty"
        reply = await self.call(StreamEnsureOp(kind=kind, port=port), StreamEnsureReply)
        channel = reply.channel.channel_id if reply.channel and reply.channel.channel_id else None
        channel = channel or f"{self.workspace_id}:{self.agent_id}:{port}"
        query = "&".join(
            (
                f"ws={quote(self.workspace_id, safe='')}",
                f"agent={quote(self.agent_id, safe='')}",
                f"port={port}",
                f"channel={quote(channel, safe='')}",
            )
        )
        return Endpoint(
            host=self.relay.host, port=self.relay.port, tls=self.relay.tls, path=self.relay.path, query=query
        )

    def serialize_state(self) -> Envelope:
        """``{"agentId": ...}`` only: resume re-addresses the machine, which is its own persistence."""
        return Envelope(backend_id=BACKEND_ID, instance_id=self._instance_id, state={"agentId": self.agent_id})

    # --- beyond BoxSession ---

    async def ping_reply(self, *, timeout: float | None = None) -> PingReply:
        """Ping the agent and return what it reports (display, consent, newest epoch)."""
        nonce = str(random.getrandbits(63))
        return await self.call(PingOp(nonce=nonce), PingReply, timeout=timeout)

    async def ping(self, *, timeout: float | None = None) -> bool:
        """True iff the agent answered a ping without an error."""
        try:
            await self.ping_reply(timeout=timeout)
        except SelfhostedControlError:
            return False
        return True

    async def screenshot(self) -> ScreenshotReply:
        """One PNG of the machine's display (not consent gated; needs a display)."""
        reply = await self.call(ScreenshotOp(), ScreenshotReply)
        if reply.native_width == 0 or reply.native_height == 0:
            reply = reply.model_copy(update={"native_width": reply.width, "native_height": reply.height})
        return reply

    async def desktop_input(self, event: PointerEvent | KeyEvent | ScrollEvent) -> None:
        """Inject one input event (``CONSENT_REQUIRED`` unless the owner allowed screen control)."""
        await self.call(DesktopInputOp(event=event), DesktopInputReply)

    async def open_pty(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        cols: int,
        rows: int,
        on_output: OutputCallback,
        on_exit: ExitCallback,
    ) -> RemotePty:
        """Start ``argv`` on a PTY the agent holds, in ``cwd`` on the machine (a Channel-A ``PtyHost``).

        Raises:
            PathNotFound: ``cwd`` does not exist on the machine.
            InvalidRequest: ``cwd`` is outside the agent's root.
            ChannelAUnsupported: the agent predates the PTY ops.
            SelfhostedControlError: the agent is offline, draining, fenced, or could not start the shell.
        """
        term = env.get("TERM", "xterm-256color")
        rest = {name: value for name, value in env.items() if name != "TERM"}
        op = build_op(PtyOpenOp, command=list(argv), cwd=self._path(cwd), env=rest, cols=cols, rows=rows, term=term)
        try:
            reply = await self.call(op, PtyOpenReply)
        except SelfhostedControlError as err:
            code = ControlErrorCode.from_wire(err.code)
            if code in (ControlErrorCode.UNSUPPORTED, ControlErrorCode.PROTOCOL):
                raise ChannelAUnsupported(
                    f"the agent on {self.agent_id} cannot open PTYs ({err.message}); "
                    "upgrade it to this runtime's version"
                ) from err
            self._raise_typed(err, cwd)
        pty = RemotePty(self, reply.pty_id, cols=cols, rows=rows, on_output=on_output, on_exit=on_exit)
        pty.start()
        return pty

    async def view_image(self, path: str) -> tuple[bytes, str]:
        """An image file's bytes and MIME type (sniffed from magic bytes, else the extension)."""
        data = await self.read_file(path)
        return data, _sniff_image(data, path)


# --- probing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentProbe:
    """The outcome of one ping: whether the agent answered at all, and its report when it did."""

    responded: bool
    reply: PingReply | None = None
    error: SelfhostedControlError | None = None
    latency_ms: float = 0.0


async def probe_agent(rpc: ControlRpc, workspace_id: str, agent_id: str, *, timeout: float = 5.0) -> AgentProbe:
    """Ping an agent once (epoch 0, no retries). Any answer from the agent, even a refusal, counts as
    responded; only ``AGENT_OFFLINE`` and ``TIMEOUT`` (the transport's verdicts) do not.
    """
    request = ControlRequest(request_id=_new_request_id(), epoch=0, op=PingOp(nonce=str(random.getrandbits(63))))
    started = time.monotonic()
    response = await rpc.request(agent_subject(workspace_id, agent_id), request, timeout=timeout)
    latency = (time.monotonic() - started) * 1000
    if response.error is None and isinstance(response.result, PingReply):
        return AgentProbe(responded=True, reply=response.result, latency_ms=latency)
    if response.error is None:
        response = error_response(request.request_id, ControlErrorCode.PROTOCOL, "ping answered with another result")
    err = agent_error_to_control_error(response.error, request.request_id)  # type: ignore[arg-type]
    responded = not (err.agent_offline or err.reason == "agent_reconnecting")
    return AgentProbe(responded=responded, error=err, latency_ms=latency)


# --- the provider ---------------------------------------------------------------------------------


class SelfhostedProvider:
    """The ``selfhosted`` backend: binds sessions to enrolled agents; creates and destroys nothing."""

    def __init__(
        self,
        rpc: ControlRpc,
        *,
        relay: RelayConfig | None = None,
        timeout: float = SELFHOSTED_DEFAULT_TIMEOUT_SECONDS,
        probe_timeout: float = 5.0,
        default_exec_timeout: float = 600.0,
        default_agent_id: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.rpc = rpc
        self.relay = relay or RelayConfig()
        self.timeout = timeout
        self.probe_timeout = probe_timeout
        self.default_exec_timeout = default_exec_timeout
        self.default_agent_id = default_agent_id
        self.retry = retry

    @property
    def descriptor(self) -> CapabilityDescriptor:
        """The static ``selfhosted`` descriptor."""
        return get_descriptor(BACKEND_ID)

    @property
    def backend_id(self) -> str:
        """``selfhosted``."""
        return BACKEND_ID

    def validate_credentials(self) -> None:
        """Nothing to check offline: NATS is dialled lazily on the first op."""
        if self.default_agent_id is not None:
            validate_agent_token(self.default_agent_id, "default agent id")

    def session(self, workspace_id: str, agent_id: str, epoch: int = 0, *, working_dir: str = "") -> SelfhostedSession:
        """Bind a session to an agent under ``epoch`` (no I/O)."""
        return SelfhostedSession(
            self.rpc,
            workspace_id=workspace_id,
            agent_id=agent_id,
            epoch=epoch,
            relay=self.relay,
            timeout=self.timeout,
            default_exec_timeout=self.default_exec_timeout,
            working_dir=working_dir,
            retry=self.retry,
        )

    def _agent_for(self, spec: BoxSpec) -> str:
        # BoxSpec gains an agent id field with the selfhosted lease work; until then the default applies.
        agent = getattr(spec, "agent_id", None) or self.default_agent_id
        if not agent:
            raise InvalidRequest(
                "a selfhosted lease needs an agent id (acquire with --agent AGENT_ID, or set "
                "SANDBOX_SELFHOSTED_AGENT_ID)"
            )
        return str(agent)

    async def create(self, spec: BoxSpec, idempotency_key: str) -> SelfhostedSession:
        """Bind to the spec's agent under the spec's epoch, once the agent answers a ping.

        Nothing is created anywhere, so a repeated call is naturally idempotent.

        Raises:
            AgentOffline: the agent did not answer (offline or reconnecting); retry later.
            SelfhostedControlError: the agent answered but refused (e.g. ``FENCED``: it has seen a newer epoch).
            InvalidRequest: no agent id, or ids that cannot form a subject.
        """
        del idempotency_key
        agent = self._agent_for(spec)
        session = self.session(spec.workspace_id, agent, spec.epoch)
        try:
            await session.ping_reply(timeout=self.probe_timeout)
        except SelfhostedControlError as err:
            if err.agent_offline or err.reason == "agent_reconnecting":
                raise AgentOffline(
                    f"agent {agent!r} of workspace {spec.workspace_id!r} did not answer: {err.message}",
                    agent_id=agent,
                    reason=err.reason or "agent_offline",
                ) from err
            raise
        return session

    async def resume(self, envelope: Envelope) -> SelfhostedSession:
        """Re-bind to the machine an envelope names; no I/O, and never ``BoxNotFound``.

        Raises:
            InvalidRequest: the envelope is not a selfhosted one, or its agent ids disagree.
        """
        if envelope.backend_id != BACKEND_ID:
            raise InvalidRequest(f"envelope is for backend {envelope.backend_id!r}, not {BACKEND_ID!r}")
        workspace_id, instance_agent, epoch = parse_instance_id(envelope.instance_id)
        state = envelope.state
        nested = state.get("providerState")
        agent = state.get("agentId") or (nested.get("agentId") if isinstance(nested, dict) else None)
        if agent is not None and agent != instance_agent:
            raise InvalidRequest(
                f"envelope names agent {agent!r} in its state but {instance_agent!r} in its instance id"
            )
        return self.session(workspace_id, instance_agent, epoch)

    async def terminate(self, envelope: Envelope) -> None:
        """Nothing to destroy: the machine belongs to its owner and is the persistence."""
        del envelope

    async def list_owned(self) -> list[OwnedBox]:
        """No boxes: selfhosted machines are never swept as orphans."""
        return []

    # -- workspace snapshots: the machine is the persistence, nothing is archived ----------------

    async def capture_workspace(self, envelope: Envelope) -> AsyncIterator[bytes]:
        """Refused: a user's machine is never archived (its files stay where they are).

        Raises (on first iteration):
            Unsupported: always; a draining selfhosted lease goes cold without a snapshot.
        """
        del envelope
        raise Unsupported("selfhosted machines are not archived: the machine itself is the persistence")
        yield b""  # pragma: no cover - makes this an async generator

    async def restore_workspace(self, envelope: Envelope, chunks: AsyncIterable[bytes]) -> None:
        """Refused: an archive is never unpacked over a user's machine.

        Raises:
            Unsupported: always.
        """
        del envelope, chunks
        raise Unsupported("selfhosted machines are never restored from an archive")

    async def workspace_fingerprint(self, envelope: Envelope) -> str | None:
        """None: there is nothing to capture, so there is nothing to compare."""
        del envelope
        return None

    async def delete_snapshot(self, native_id: str) -> None:
        """Refused: selfhosted has no native snapshots.

        Raises:
            Unsupported: always.
        """
        del native_id
        raise Unsupported("selfhosted has no native snapshots")


def build_provider(settings: Settings) -> SelfhostedProvider:
    """The selfhosted provider: signed control RPC over the runtime's NATS, relay from ``SANDBOX_SELFHOSTED_RELAY_URL``.

    Raises:
        SandboxConfigError: no NATS credential (while auth is on) or an unreadable signing key.
    """
    return SelfhostedProvider(
        NatsControlRpc.for_settings(settings),
        relay=RelayConfig.from_url(settings.selfhosted_relay_url),
        timeout=settings.selfhosted_rpc_timeout_seconds,
        probe_timeout=settings.selfhosted_probe_timeout_seconds,
        default_exec_timeout=settings.exec_timeout_seconds,
        default_agent_id=settings.selfhosted_agent_id,
    )
