"""Routing one session between boxes under an epoch fence.

A session's *active pointer* ``(active_sandbox_id, active_epoch, working_dir)`` lives in the store
(``session_pointers``); ``None`` means the session's home box (its group's lease box). A swap moves
the pointer by compare-and-set on ``active_epoch`` (:class:`store.machines.SessionPointerRepository`).

:class:`RoutingSession` is one stable :class:`~sandbox.box.BoxSession` whose ops land wherever
the pointer says *now* (upstream ``reference/upstream-runtime-contracts.md`` §9):

- every op re-reads the pointer; the backend resolved for ``(epoch, sandbox id)`` is cached and
  resolved again only when that changes;
- a fenced op (the target has seen a newer epoch) invalidates the cache; a *read* is retried, up
  to ``max_fence_retries`` times;
- after an op returns, the pointer is read again; if it moved, a read is retried and its result
  dropped;
- a *mutation* (exec, write, desktop input) is never replayed: when it is fenced or the route moved
  under it, :class:`~sandbox.errors.MutationOutcomeUnknown` is raised and the caller decides.

Sandbox ids name targets: ``selfhosted:<agent_id>`` (a machine of the session's workspace) or
``lease:<group_id>`` (another lease's box); :func:`make_backend_resolver` builds the resolver.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from sandbox.box import BoxSession, DirEntry, Endpoint, Envelope, ExecResult
from sandbox.control_protocol import NATS_DEFAULT_MAX_PAYLOAD, max_chunk_bytes
from sandbox.errors import (
    MutationOutcomeUnknown,
    RouteUnresolvable,
    RoutingError,
    SandboxError,
    SelfhostedControlError,
    StaleEpoch,
    Unsupported,
)

__all__ = [
    "DEFAULT_MAX_FENCE_RETRIES",
    "ActivePointer",
    "RouteEvent",
    "RoutingSession",
    "SandboxTarget",
    "is_fence_error",
    "make_backend_resolver",
    "parse_sandbox_id",
]

DEFAULT_MAX_FENCE_RETRIES: Final = 3
_T = TypeVar("_T")
_TARGET_RE: Final = re.compile(r"^(?P<kind>selfhosted|lease):(?P<ref>[A-Za-z0-9_-]{1,128})$")


class ActivePointer(BaseModel):
    """Where a session's ops go: ``active_sandbox_id`` None means home; the epoch fences old routes."""

    model_config = ConfigDict(frozen=True)

    active_sandbox_id: str | None = None
    active_epoch: int = Field(default=0, ge=0)
    working_dir: str | None = None

    @property
    def route(self) -> tuple[int, str | None]:
        """The cache key of the resolved backend."""
        return self.active_epoch, self.active_sandbox_id


@dataclass(frozen=True)
class SandboxTarget:
    """A parsed sandbox id: a selfhosted agent or another lease's group."""

    kind: Literal["selfhosted", "lease"]
    ref: str


def parse_sandbox_id(sandbox_id: str) -> SandboxTarget:
    """Parse ``selfhosted:<agent_id>`` or ``lease:<group_id>``.

    Raises:
        RouteUnresolvable: (code ``unsupported_backend_context``) any other form.
    """
    match = _TARGET_RE.fullmatch(sandbox_id) if isinstance(sandbox_id, str) else None
    if match is None:
        raise RouteUnresolvable(
            f"sandbox id {sandbox_id!r} is neither selfhosted:<agent_id> nor lease:<group_id>",
            code="unsupported_backend_context",
        )
    kind: Literal["selfhosted", "lease"] = "selfhosted" if match["kind"] == "selfhosted" else "lease"
    return SandboxTarget(kind, match["ref"])


def is_fence_error(err: BaseException) -> bool:
    """Whether ``err`` says the target has moved on to a newer epoch (typed first, then by its text)."""
    if isinstance(err, StaleEpoch):
        return True
    if isinstance(err, SelfhostedControlError):
        return err.fenced
    if getattr(err, "fenced", None) is True:
        return True
    text = f"{type(err).__name__} {err}".lower()
    return "fenced" in text or ("epoch" in text and "super" in text)


RouteEvent = Literal["resolved", "epoch-changed", "fenced-retry"]
PointerReader = Callable[[], Awaitable[ActivePointer]]
BackendResolver = Callable[[ActivePointer], Awaitable[BoxSession]]
RouteListener = Callable[[RouteEvent, ActivePointer], None]


class RoutingSession:
    """A session-shaped proxy that routes every op to the pointer's current backend (module docstring)."""

    exec_reply_budget: Final = max_chunk_bytes(NATS_DEFAULT_MAX_PAYLOAD)
    """It may land on a selfhosted machine, so its exec replies are bounded as that one's are."""

    def __init__(
        self,
        read_pointer: PointerReader,
        resolve: BackendResolver,
        *,
        session_id: str = "",
        max_fence_retries: int = DEFAULT_MAX_FENCE_RETRIES,
        on_event: RouteListener | None = None,
    ) -> None:
        self._read_pointer = read_pointer
        self._resolve = resolve
        self.session_id = session_id
        self.max_fence_retries = max_fence_retries
        self._on_event = on_event
        self._cached: tuple[tuple[int, str | None], BoxSession] | None = None

    @property
    def instance_id(self) -> str:
        """A stable id for the routed session (its backends change underneath)."""
        return f"route:{self.session_id}"

    def _emit(self, event: RouteEvent, pointer: ActivePointer) -> None:
        if self._on_event is not None:
            self._on_event(event, pointer)

    async def backend(self, pointer: ActivePointer) -> BoxSession:
        """The backend for ``pointer``, from the cache when its route is unchanged."""
        cached = self._cached
        if cached is not None and cached[0] == pointer.route:
            return cached[1]
        backend = await self._resolve(pointer)
        if backend is self:
            raise RoutingError("the backend resolver returned the routing session itself")
        self._emit("resolved" if cached is None else "epoch-changed", pointer)
        self._cached = (pointer.route, backend)
        return backend

    def invalidate(self) -> None:
        """Forget the cached backend; the next op resolves again."""
        self._cached = None

    async def run(self, op: str, fn: Callable[[BoxSession], Awaitable[_T]], *, mutation: bool) -> _T:
        """Run ``fn`` on the current backend under the routing rules; reads retry, mutations never replay.

        Raises:
            MutationOutcomeUnknown: a mutation was fenced or its route moved while it ran.
            RoutingError: reads kept being fenced past ``max_fence_retries``.
        """
        last: BaseException | None = None
        for _attempt in range(self.max_fence_retries + 1):
            pointer = await self._read_pointer()
            backend = await self.backend(pointer)
            try:
                result = await fn(backend)
            except Exception as err:
                if not is_fence_error(err):
                    raise
                self.invalidate()
                self._emit("fenced-retry", pointer)
                if mutation:
                    raise MutationOutcomeUnknown(
                        f"{op} was fenced at epoch {pointer.active_epoch}; it was not replayed and its outcome is "
                        "unknown: re-read the state before repeating it",
                        op=op,
                    ) from err
                last = err
                continue
            after = await self._read_pointer()
            if after.route != pointer.route:
                self.invalidate()
                if mutation:
                    raise MutationOutcomeUnknown(
                        f"{op} completed on a superseded route (epoch {pointer.active_epoch} -> "
                        f"{after.active_epoch}); it was not replayed on the new target",
                        op=op,
                    )
                last = RoutingError(f"sandbox route changed while {op} was in flight")
                continue
            return result
        if last is not None:
            if isinstance(last, SandboxError):
                raise last
            raise RoutingError(f"{op}: exhausted {self.max_fence_retries} fence retries: {last}") from last
        raise RoutingError(f"{op}: exhausted fence retries")

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
        """Run a command on the active target (a mutation: never replayed)."""
        return await self.run(
            "exec",
            lambda b: b.exec(cmd, workdir=workdir, timeout=timeout, env=env, stdin=stdin),
            mutation=True,
        )

    async def read_file(self, path: str) -> bytes:
        """Read a file on the active target (retried on a fence)."""
        return await self.run("read_file", lambda b: b.read_file(path), mutation=False)

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a file on the active target (a mutation: never replayed)."""
        await self.run("write_file", lambda b: b.write_file(path, data), mutation=True)

    async def list_dir(self, path: str) -> list[DirEntry]:
        """List a directory on the active target (retried on a fence)."""
        return await self.run("list_dir", lambda b: b.list_dir(path), mutation=False)

    async def path_exists(self, path: str) -> bool:
        """Whether a path exists on the active target (retried on a fence)."""
        return await self.run("path_exists", lambda b: b.path_exists(path), mutation=False)

    async def resolve_exposed_port(self, port: int) -> Endpoint:
        """The endpoint of a port on the active target (retried on a fence)."""
        return await self.run("resolve_exposed_port", lambda b: b.resolve_exposed_port(port), mutation=False)

    def serialize_state(self) -> Envelope:
        """A routed session is persisted as its pointer, not as a box envelope.

        Raises:
            Unsupported: always.
        """
        raise Unsupported("a routed session has no box envelope; its route is the session pointer in the store")

    async def screenshot(self) -> Any:
        """A screenshot of the active target's display (retried on a fence)."""

        async def shot(backend: BoxSession) -> Any:
            method = getattr(backend, "screenshot", None)
            if method is None:
                raise Unsupported("the active target cannot take screenshots")
            return await method()

        return await self.run("screenshot", shot, mutation=False)

    async def desktop_input(self, event: Any) -> None:
        """Inject one input event on the active target (a mutation: never replayed)."""

        async def inject(backend: BoxSession) -> None:
            method = getattr(backend, "desktop_input", None)
            if method is None:
                raise Unsupported("the active target has no desktop input")
            await method(event)

        await self.run("desktop_input", inject, mutation=True)


class _SelfhostedSessions(Protocol):
    def session(self, workspace_id: str, agent_id: str, epoch: int = 0, *, working_dir: str = "") -> BoxSession: ...


EnrollmentCheck = Callable[[str], Awaitable[bool]]
LeaseSessions = Callable[[str, ActivePointer], Awaitable[BoxSession]]


def make_backend_resolver(
    *,
    workspace_id: str,
    home: Callable[[ActivePointer], Awaitable[BoxSession]] | None = None,
    selfhosted: _SelfhostedSessions | None = None,
    is_enrolled: EnrollmentCheck | None = None,
    lease_session: LeaseSessions | None = None,
) -> BackendResolver:
    """A resolver for :class:`RoutingSession` over the targets this runtime knows.

    ``None`` → ``home(pointer)`` (the session's group box); ``selfhosted:<agent>`` → a selfhosted
    session bound to the pointer's epoch and working dir, if ``is_enrolled`` says the agent is
    enrolled and active; ``lease:<group>`` → ``lease_session(group, pointer)``.

    The resolver raises :class:`~sandbox.errors.RouteUnresolvable` with code
    ``home_unavailable_this_turn`` (no home), ``offline_enrollment`` (not enrolled or revoked) or
    ``unsupported_backend_context`` (a target kind this deployment cannot reach).
    """

    async def resolve(pointer: ActivePointer) -> BoxSession:
        if pointer.active_sandbox_id is None:
            if home is None:
                raise RouteUnresolvable("this session has no home box to route to", code="home_unavailable_this_turn")
            return await home(pointer)
        target = parse_sandbox_id(pointer.active_sandbox_id)
        if target.kind == "selfhosted":
            if selfhosted is None:
                raise RouteUnresolvable("selfhosted machines are not configured", code="unsupported_backend_context")
            if is_enrolled is not None and not await is_enrolled(target.ref):
                raise RouteUnresolvable(
                    f"agent {target.ref!r} is not enrolled (or was revoked) in workspace {workspace_id!r}",
                    code="offline_enrollment",
                )
            return selfhosted.session(
                workspace_id, target.ref, pointer.active_epoch, working_dir=pointer.working_dir or ""
            )
        if lease_session is None:
            raise RouteUnresolvable(
                "routing to another lease's box is not configured", code="unsupported_backend_context"
            )
        return await lease_session(target.ref, pointer)

    return resolve
