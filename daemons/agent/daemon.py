"""The agent daemon: serves control requests for one machine over NATS (``sandboxctl agent run``).

It connects with its enrollment credential (:class:`~sandbox.control_auth.AgentCredential`: the
NATS server lets it subscribe only to its own subject and publish only replies), subscribes to
``agent.<workspace_id>.<agent_id>.rpc`` (in a queue group, so a duplicate daemon never runs an op
twice) and answers each request from a task of its own, admitting it first:

- a request that is unsigned, signed by a key other than the one pinned at enrollment, expired or
  replayed gets ``UNAUTHENTICATED`` and changes nothing (the fence only moves on verified requests);
- while draining (after SIGTERM) or at ``max_concurrent_ops``, a new op gets ``DRAINING``;
- an op whose epoch is older than the newest seen gets ``FENCED``; the newest epoch is kept in a
  state file outside the root, so a restart does not reopen the fence;
- everything else runs through :class:`~daemons.agent.operations.AgentOperations`, and a reply
  larger than the server's max payload is replaced by ``PAYLOAD_TOO_LARGE``.

Every reply, refusals included, is signed with the agent's reply key (the runtime drops replies
that do not verify, so an impostor on the subject cannot answer for this machine).

The NATS link is re-established forever (the first dial is retried too), so the daemon outlives
server restarts. :meth:`AgentDaemon.drain` (SIGTERM) refuses new ops, lets running ones finish
(killing commands left after ``drain_timeout``), then disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from daemons.agent.consent import AgentConsent
from daemons.agent.operations import AgentOperations, DisplayAccess
from sandbox.control_auth import AgentCredential, ReplayGuard, RequestVerifier, sign_reply
from sandbox.control_protocol import (
    ControlErrorCode,
    ControlResponse,
    agent_subject,
    decode_request,
    encode_message,
    error_response,
    payload_too_large_response,
    salvage_request_id,
)
from sandbox.errors import ControlUnauthenticated, InvalidRequest, SandboxConfigError
from sandbox.nats_auth import NatsAuth
from sandbox.nats_dial import dial_within, settle_abandoned_dials
from sandbox.nats_flush import flush_in_order

__all__ = ["AgentConfig", "AgentDaemon", "default_state_dir", "use_pidfd_child_watcher"]

_MAX_DIAL_WAIT: Final = 2.0
_REPLY_HEADER_BYTES: Final = 1024


def use_pidfd_child_watcher() -> bool:
    """On Python 3.11 Linux, reap commands with pidfds instead of one waiting thread per command.

    Call before the event loop starts (3.12+ already does this by default; then it is a no-op).
    Returns whether the watcher was installed.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher") or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    return True


def default_state_dir() -> Path:
    """Where the agent keeps its fence state: ``$XDG_STATE_HOME/sandbox-agent`` (else ``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sandbox-agent"


@dataclass
class AgentConfig:
    """How one agent daemon runs."""

    workspace_id: str
    agent_id: str
    root: Path
    credential: AgentCredential | None = None
    nats_url: str = "nats://127.0.0.1:4222"
    # None: the credential's nkey (the normal case); NatsAuth() without identity for SANDBOX_NATS_AUTH=off.
    nats_auth: NatsAuth | None = None
    consent: AgentConsent = field(default_factory=AgentConsent)
    display: str | None = field(default_factory=lambda: os.environ.get("DISPLAY") or None)
    state_dir: Path = field(default_factory=default_state_dir)
    max_concurrent_ops: int = 64
    drain_timeout: float = 60.0
    reconnect_wait: float = 0.25


class AgentDaemon:
    """One running agent: a NATS subscription, the admission rules and the op handlers."""

    def __init__(self, config: AgentConfig) -> None:
        """Check the config against its credential and load the fence and replay state.

        Raises:
            SandboxConfigError: no credential, or one made for another workspace or agent id.
            InvalidRequest: the ids cannot form a subject.
        """
        self.config = config
        self.subject = agent_subject(config.workspace_id, config.agent_id)
        credential = config.credential
        if credential is None:
            raise SandboxConfigError(
                "the agent needs its enrollment credential: `sandboxctl machine enroll` makes it, "
                "`sandboxctl agent run --credential FILE` uses it"
            )
        if (credential.workspace_id, credential.agent_id) != (config.workspace_id, config.agent_id):
            raise SandboxConfigError(
                f"the credential is for {credential.workspace_id}/{credential.agent_id}, "
                f"not {config.workspace_id}/{config.agent_id}"
            )
        self.credential = credential
        self.nats_auth = config.nats_auth or NatsAuth(nkey_seed=credential.nats_seed)
        self.operations = AgentOperations(
            workspace_id=config.workspace_id,
            agent_id=config.agent_id,
            root=config.root,
            display=DisplayAccess(config.display),
            consent=config.consent,
        )
        # Absolute: the daemon process works in its root (run_until_signalled), not where it started.
        self._state_file = config.state_dir.absolute() / f"{config.workspace_id}.{config.agent_id}.json"
        self.operations.newest_epoch = self._load_epoch()
        self.verifier = RequestVerifier(
            credential.runtime_public(),
            ReplayGuard(config.state_dir.absolute() / f"{config.workspace_id}.{config.agent_id}.seen"),
        )
        self.ready = asyncio.Event()
        self.draining = False
        self._done = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._nc: Any = None

    # --- fence state ---

    @property
    def newest_epoch(self) -> int:
        """The newest epoch any admitted op carried."""
        return self.operations.newest_epoch

    def _load_epoch(self) -> int:
        try:
            value = json.loads(self._state_file.read_text())["newest_epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return value if isinstance(value, int) and value >= 0 else 0

    def _store_epoch(self, epoch: int) -> None:
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_name(f".{self._state_file.name}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps({"newest_epoch": epoch}))
        os.replace(tmp, self._state_file)

    # --- serving ---

    async def _dial(self) -> Any:
        import nats

        async def quiet(_err: Exception) -> None:
            return None

        async def disconnected() -> None:
            note("NATS link lost; reconnecting")

        async def reconnected() -> None:
            note("NATS link restored")

        return await nats.connect(
            self.config.nats_url,
            name=f"sandbox-agent {self.config.workspace_id}/{self.config.agent_id}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.config.reconnect_wait,
            connect_timeout=2,
            error_cb=quiet,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **self.nats_auth.connect_options(),
        )

    async def _dial_until_connected(self) -> Any:
        """The NATS connection, dialled again after each failure (backoff from ``reconnect_wait`` doubling up
        to 2 s) until it connects; None once the agent drains."""
        if self.draining:
            return None
        redial = AsyncRetrying(
            retry=retry_if_exception_type(Exception),  # never a cancellation: that ends the dialling
            stop=lambda _state: self.draining,
            wait=wait_exponential(multiplier=self.config.reconnect_wait, max=_MAX_DIAL_WAIT),
            retry_error_callback=lambda _state: None,
        )
        return await redial(dial_within, self._dial, 5)

    async def run(self) -> None:
        """Connect (retrying forever), serve until drained, then disconnect."""
        # A drain (SIGTERM) ends the dialling at once, even in the middle of a dial.
        dialling = asyncio.ensure_future(self._dial_until_connected())
        stopped = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait([dialling, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not dialling.done():
                dialling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dialling
        if dialling.cancelled() or dialling.result() is None:
            return
        self._nc = dialling.result()
        nc = self._nc
        self.operations.max_payload = nc.max_payload
        await nc.subscribe(self.subject, queue=self.subject, cb=self._on_message)
        await flush_in_order(nc)  # only then is a request sent to the subject sure to reach us
        self.ready.set()
        try:
            await self._done.wait()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _respond(self, msg: Any, response: ControlResponse) -> None:
        data = encode_message(response)
        limit = self._nc.max_payload if self._nc is not None else self.operations.max_payload
        # Headers count against the limit too: a certificate and a signature, well under 1 KiB.
        if len(data) + _REPLY_HEADER_BYTES > limit:
            data = encode_message(payload_too_large_response(response.request_id, len(data), limit))
        headers = sign_reply(self.credential, self.subject, msg.data, data)
        with contextlib.suppress(Exception):
            # A reply lost with the link is the caller's timeout, which it treats as ambiguous.
            await self._nc.publish(msg.reply, data, headers=headers)

    async def _refuse_unauthenticated(self, msg: Any, request_id: str, err: ControlUnauthenticated) -> None:
        note(f"refused a request ({err.reason}): {err.message}")
        await self._respond(
            msg,
            error_response(
                request_id,
                ControlErrorCode.UNAUTHENTICATED,
                err.message,
                retryable=False,
                detail={"reason": err.reason},
            ),
        )

    async def _on_message(self, msg: Any) -> None:
        if not msg.reply:
            return
        # Authenticity first: nothing of an unverified request is trusted, not even its shape.
        try:
            self.verifier.verify_signature(self.subject, msg.data, msg.headers)
        except ControlUnauthenticated as err:
            await self._refuse_unauthenticated(msg, salvage_request_id(msg.data), err)
            return
        try:
            request = decode_request(msg.data)
        except InvalidRequest as err:
            await self._respond(
                msg, error_response(salvage_request_id(msg.data), ControlErrorCode.PROTOCOL, err.message)
            )
            return
        rid = request.request_id
        try:
            self.verifier.admit(rid, request.expires_at_ms)
        except ControlUnauthenticated as err:
            await self._refuse_unauthenticated(msg, rid, err)
            return
        if self.draining:
            await self._respond(
                msg,
                error_response(rid, ControlErrorCode.DRAINING, "the agent is shutting down", detail={"draining": "1"}),
            )
            return
        if len(self._inflight) >= self.config.max_concurrent_ops:
            await self._respond(
                msg,
                error_response(
                    rid,
                    ControlErrorCode.DRAINING,
                    "the agent is at capacity",
                    detail={"in_flight": str(len(self._inflight))},
                ),
            )
            return
        newest = self.operations.newest_epoch
        if request.epoch < newest:
            await self._respond(
                msg,
                error_response(
                    rid,
                    ControlErrorCode.FENCED,
                    f"epoch {request.epoch} is older than the newest epoch {newest} this agent has seen",
                    detail={"epoch": str(request.epoch), "newest_epoch": str(newest)},
                ),
            )
            return
        if request.epoch > newest:
            self.operations.newest_epoch = request.epoch
            try:
                self._store_epoch(request.epoch)
            except OSError as err:
                note(f"cannot persist the fence epoch: {err}")

        async def serve() -> None:
            try:
                response = await self.operations.handle(request)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # Every request gets one reply: a handler that raises answers a typed error whose
                # message names only the exception type (no traceback, no host paths).
                response = error_response(
                    rid, ControlErrorCode.UNSPECIFIED, f"the agent failed the op ({type(err).__name__})"
                )
            await self._respond(msg, response)

        task = asyncio.get_running_loop().create_task(serve())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # --- draining ---

    async def drain(self) -> None:
        """Refuse new ops with ``DRAINING``, let running ones finish (bounded), then stop serving."""
        self.draining = True
        # Shells end with the agent; this also answers the PTY output polls that are waiting.
        await self.operations.terminals.close_all()
        if self._inflight:
            _done, pending = await asyncio.wait(set(self._inflight), timeout=self.config.drain_timeout)
            if pending:
                self.operations.kill_running()
                await asyncio.wait(pending, timeout=5)
        self._done.set()

    async def run_until_signalled(self) -> None:
        """:meth:`run` as the agent's process, draining on SIGTERM or SIGINT.

        The process moves into the agent's root first: commands run there unless an op names
        another directory, and a command started in the process's own directory can be started
        with ``posix_spawn`` (:mod:`daemons.agent.spawn`).
        """
        os.chdir(self.operations.root.real)
        loop = asyncio.get_running_loop()
        drains: list[asyncio.Task[None]] = []

        def on_signal() -> None:
            if not self.draining:
                note("draining: finishing running ops, refusing new ones")
                drains.append(loop.create_task(self.drain()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            # End abandoned dials while the loop still runs: asyncio.run's own shutdown cancels each
            # task once, and a dial that swallows that cancellation would keep the process alive.
            await settle_abandoned_dials(2.0)


def note(message: str) -> None:
    """A status line on stderr (the daemon's only output)."""
    with contextlib.suppress(OSError):
        print(f"sandbox-agent: {message}", file=sys.stderr, flush=True)
