"""``LeaseClient``: the scheduler-facing Python API of the lease workflow.

Every method raises the typed errors of :mod:`sandbox.errors` (``StaleEpoch``,
``HolderNotFound``, ``LeaseNotWarm``, ...) instead of Temporal's transport exceptions, so callers
branch on types, never on messages. One table, applied by :func:`sandbox.failures.translate` (every
call goes through :func:`sandbox.failures.call_workflow`; activities that call the lease use it too),
maps what the Temporal client raises:

| the Temporal client raises                                        | the caller gets                         |
|-------------------------------------------------------------------|-----------------------------------------|
| a failed update/workflow (``WorkflowUpdateFailedError``,          | ``T`` with its attributes (``stage``,   |
| ``WorkflowFailureError``) whose cause chain holds an              | ``path``, ...) and its ``retryable``;   |
| ``ApplicationError`` of type ``T`` (raised by the workflow, or    | a plain ``SandboxError`` when ``T`` is  |
| by an activity and forwarded)                                     | no sandbox error type                   |
| ``RPCError`` ``NOT_FOUND``: no such workflow, or it has completed | ``LeaseNotFound``                       |
| ``WorkflowUpdateRPCTimeoutOrCancelledError`` or ``RPCError``      | ``asyncio.CancelledError``              |
| ``CANCELLED`` because the calling task is being cancelled         |                                         |
| the same without a cancelled caller, or ``RPCError``              | ``OutcomeUnknown``: the call may or may |
| ``DEADLINE_EXCEEDED``                                             | not have taken effect                   |
| any other Temporal error (a failed query, ``UNAVAILABLE``, ...)   | ``SandboxError`` with its message       |

An update input (or lease spec) over :data:`~workflows.models.lease.MAX_UPDATE_INPUT_BYTES` is refused
here as ``InvalidRequest`` before anything is sent (:func:`check_update_input`); the lease's validators
refuse it too, so no caller can send what would fail every workflow task.

A ``SandboxError`` raised on this side (validation, the payload codec) passes unchanged; other
exceptions (programming errors) are not masked. Attributes and retryability arrive as the worker
sent them (:mod:`sandbox.failures` decodes the ``ApplicationError``'s details).

Example::

    leases = LeaseClient(await worker.connect(settings), settings)
    async with leases.hold("ws1", "g1", kind="turn") as grant:
        out = await leases.exec("ws1", "g1", ["echo", "hi"], epoch=grant.epoch)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.common import QueryRejectCondition, WorkflowIDConflictPolicy

from sandbox import errors
from sandbox.capabilities import (
    CapabilityOverlay,
    NegotiationContext,
    RuntimeDesktop,
    SessionCapabilities,
    negotiate_capabilities,
)
from sandbox.failures import call_workflow
from sandbox.selfhosted_capabilities import agent_report_overlays
from sandbox.settings import Settings
from store.database import Database, store_fingerprint
from store.heartbeats import HolderHeartbeats
from workflows.lease import LeaseWorkflow
from workflows.models.lease import (
    HOLDER_KINDS,
    ID_PATTERN,
    MAX_EXEC_TIMEOUT_SECONDS,
    MAX_ID_LENGTH,
    AcquireRequest,
    AttachViewerRequest,
    BoxLostReport,
    BoxLostResult,
    DrainRequest,
    ExecOutcome,
    ExecRequest,
    HeartbeatCheck,
    HeartbeatRequest,
    HeartbeatResult,
    HolderKind,
    HolderRef,
    HoldRequest,
    LeaseGrant,
    LeaseInput,
    LeaseSpec,
    LeaseTimers,
    LeaseView,
    PlaneEndpoint,
    ReleaseResult,
    ViewerAttachment,
    lease_workflow_id,
    oversized_update_input,
    stale_heartbeat_message,
)

log = logging.getLogger("sandbox.client")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

HEARTBEAT_INTERVAL_SECONDS = {
    "turn": 10.0,
    "viewer": 45.0,
    "direct": 10.0,
    "recording": 10.0,
    "process": 10.0,
}


def timers_from_settings(settings: Settings) -> LeaseTimers:
    """The lease timers configured by ``SANDBOX_*`` settings, checked against their bounds.

    Raises:
        SandboxConfigError: a timer is out of its bounds (names the ``SANDBOX_*`` variable), or the
            timers contradict each other (:meth:`Settings.check`).
    """
    timers = LeaseTimers(
        holder_ttl_seconds=settings.holder_ttl_seconds,
        warming_ttl_seconds=settings.warming_ttl_seconds,
        idle_grace_seconds=settings.idle_grace_seconds,
        probe_timeout_seconds=settings.probe_timeout_seconds,
        exec_timeout_seconds=settings.exec_timeout_seconds,
        activity_heartbeat_seconds=settings.activity_heartbeat_seconds,
        snapshot_interval_seconds=settings.snapshot_interval_seconds,
        capture_timeout_seconds=settings.capture_timeout_seconds,
        teardown_retry_seconds=settings.teardown_retry_seconds,
        rotation_lead_seconds=settings.rotation_lead_seconds,
        hard_lifetime_seconds=settings.hard_lifetime_seconds,
        continue_as_new_after_transitions=settings.continue_as_new_after_transitions,
        continue_as_new_after_updates=settings.continue_as_new_after_updates,
    )
    # Settings built with model_copy skip the settings model's own bounds: refuse them here too.
    violations = timers.violations()
    if violations:
        raise errors.SandboxConfigError(
            "; ".join(
                f"SANDBOX_{name.upper()} must be {rule}, not {getattr(timers, name)!r}" for name, rule in violations
            )
        )
    settings.check()
    return timers


def validate_lease_ids(workspace_id: str, group_id: str) -> None:
    """Reject empty, oversized or oddly shaped ids before anything is sent."""
    for name, value in (("workspace id", workspace_id), ("group id", group_id)):
        if not isinstance(value, str):
            raise errors.InvalidRequest(f"{name} must be a string, not {type(value).__name__} {value!r}")
        if not value:
            raise errors.InvalidRequest(f"{name} must not be empty")
        if len(value) > MAX_ID_LENGTH:
            raise errors.InvalidRequest(f"{name} is longer than {MAX_ID_LENGTH} characters")
        if not ID_PATTERN.fullmatch(value):
            raise errors.InvalidRequest(
                f"{name} {value!r} may only contain letters, digits and . _ : - (and must start with a letter or digit)"
            )


def check_update_input(what: str, arg: BaseModel) -> None:
    """Refuse an update input (or lease spec) too big for one workflow task, before it is sent.

    Raises:
        InvalidRequest: its JSON is over :data:`~workflows.models.lease.MAX_UPDATE_INPUT_BYTES`
            (the message names the limit); the lease's validator would refuse it too.
    """
    problem = oversized_update_input(what, arg)
    if problem is not None:
        raise errors.InvalidRequest(problem)


def _validate_kind(kind: str) -> None:
    if not isinstance(kind, str) or kind not in HOLDER_KINDS:
        raise errors.InvalidRequest(f"unknown holder kind {kind!r}; use one of {', '.join(HOLDER_KINDS)}")


def _validate_backend(backend: str) -> None:
    from sandbox.descriptors import select_backend

    descriptor = select_backend(backend)  # raises UnknownBackend
    if descriptor.tier == "none":
        raise errors.InvalidRequest(f"backend {backend!r} has no box to lease; use a real backend such as 'local'")


def validate_epoch(field: str, value: object, *, optional: bool = False) -> None:
    """Refuse an epoch that is not a non-negative int (a string, a bool, a float, a negative number).

    Epochs are counters the lease hands out (0, 1, 2, ...); anything else cannot be one the lease
    issued, so it is malformed input, not a stale epoch.
    """
    if value is None and optional:
        return
    if type(value) is not int:
        raise errors.InvalidRequest(
            f"{field} must be an int (the epoch of a grant), not {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise errors.InvalidRequest(f"{field} must be >= 0 (epochs count up from 0), not {value}")


def validate_timeout(field: str, value: object, *, limit: float = MAX_EXEC_TIMEOUT_SECONDS) -> None:
    """Refuse a timeout that is not a finite number of seconds in ``(0, limit]`` (None: the default).

    Checked here because JSON has no NaN or infinity: such a value would reach the lease as null,
    that is as "use the default timeout", instead of being refused.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.InvalidRequest(f"{field} must be a number of seconds, not {type(value).__name__} {value!r}")
    if not math.isfinite(value) or not 0 < value <= limit:
        raise errors.InvalidRequest(f"{field} must be a finite number of seconds in (0, {limit:g}], not {value!r}")


def validate_cmd(cmd: object) -> None:
    """Refuse a command that is not a non-empty argv: a list of strings whose first one names a program."""
    if isinstance(cmd, str | bytes):
        raise errors.InvalidRequest(
            f"cmd must be a list of strings (argv), e.g. ['sh', '-c', {cmd!r:.80}], not a {type(cmd).__name__}"
        )
    if not isinstance(cmd, list | tuple) or not all(isinstance(arg, str) for arg in cmd):
        raise errors.InvalidRequest(f"cmd must be a list of strings (argv), e.g. ['echo', 'hi'], not {cmd!r}")
    if not cmd or not cmd[0]:
        raise errors.InvalidRequest("cmd must name a program first, e.g. ['echo', 'hi']")


def build_request(model: type[M], **fields: Any) -> M:
    """``model`` from ``fields`` in strict mode: a value of the wrong type is an ``InvalidRequest`` naming its field.

    Strict, so that nothing is coerced on the way (``"1"`` is no int, ``1`` is no str).
    """
    try:
        return model.model_validate(fields, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or model.__name__}: {err['msg']} (got {err['input']!r:.80})"
            for err in exc.errors()
        )
        raise errors.InvalidRequest(f"invalid {model.__name__}: {problems}") from None


PLANE_PORTS = {"desktop": 6080, "terminal": 7681}
"""The in-box ports of the planes (upstream DESKTOP_STREAM_PORT / TERMINAL_STREAM_PORT), carried in the token."""


class ViewerCell(BaseModel):
    """What a viewer needs to connect: the edge URL and a short-lived token to offer in-band.

    The token goes in the WebSocket subprotocol list (``["binary", token]``), never in the URL.
    ``mode`` is what the token allows: ``view`` (watch only) or ``control`` (input too).
    """

    lease_id: str
    plane: Literal["desktop", "terminal"]
    viewer_id: str
    epoch: int
    instance_id: str
    url: str
    token: str = Field(repr=False)
    expires_at: datetime
    transport: str
    resolution: str | None = None
    mode: Literal["view", "control"] = "view"


class LeaseClient:
    """Acquire, heartbeat, release and operate leases through their workflows."""

    def __init__(self, client: Client, settings: Settings | None = None) -> None:
        self._client: Client | None = client
        self.settings = settings or Settings()
        # The client path checks its settings as the worker's boot does: a lease started with a
        # negative holder TTL would drop every holder at once.
        self.timers = timers_from_settings(self.settings)
        # Where heartbeats are recorded (opened at the first heartbeat; None: not opened yet).
        self._beats: HolderHeartbeats | None = None
        self._beats_db: Database | None = None
        # Heartbeat checks the lease accepted, by (lease, kind, holder, epoch): until when they stand.
        self._checked: dict[tuple[str, str, str, int], tuple[float, HeartbeatCheck]] = {}

    @property
    def client(self) -> Client:
        """The Temporal client the calls go through.

        Raises:
            InvalidRequest: :meth:`close` was called.
        """
        if self._client is None:
            raise errors.InvalidRequest("this LeaseClient is closed; connect a new one (client.open_leases)")
        return self._client

    def close(self) -> None:
        """Let go of the Temporal client, so it is freed now rather than while the interpreter exits.

        The SDK's native client freed during interpreter finalization can abort the process
        ("Fatal Python error: PyGILState_Release"); :func:`client.connection.open_leases` calls this
        (and collects) when its block ends. Later calls raise :class:`~sandbox.errors.InvalidRequest`.
        """
        self._client = None

    def handle(self, workspace_id: str, group_id: str) -> WorkflowHandle[LeaseWorkflow, LeaseView]:
        """The workflow handle of one lease (validated ids)."""
        validate_lease_ids(workspace_id, group_id)
        return self.client.get_workflow_handle_for(LeaseWorkflow.run, lease_workflow_id(workspace_id, group_id))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await call_workflow(fn)

    async def acquire(
        self,
        workspace_id: str,
        group_id: str,
        *,
        kind: HolderKind = "turn",
        holder_id: str | None = None,
        subject: str | None = None,
        expected_epoch: int | None = None,
        backend: str | None = None,
        image: str | None = None,
        environment: dict[str, str] | None = None,
        agent_id: str | None = None,
    ) -> LeaseGrant:
        """Hold the lease of a sandbox group, creating its workflow and box as needed; waits until warm."""
        validate_lease_ids(workspace_id, group_id)
        _validate_kind(kind)
        validate_epoch("expected_epoch", expected_epoch, optional=True)
        chosen = backend or self.settings.default_backend
        _validate_backend(chosen)
        if chosen == "selfhosted" and not (agent_id or self.settings.selfhosted_agent_id):
            raise errors.InvalidRequest(
                "a selfhosted lease runs on one machine: pass its agent id (--agent AGENT_ID); "
                "see `sandboxctl machine list`"
            )
        spec = self._spec(workspace_id, group_id, chosen, image, environment, agent_id)
        req = build_request(
            AcquireRequest,
            kind=kind,
            holder_id=holder_id or f"{kind}-{uuid.uuid4()}",
            subject=subject,
            expected_epoch=expected_epoch,
            backend=backend,
        )
        check_update_input("acquire", req)
        result: LeaseGrant = await self._call(
            lambda: self.client.execute_update_with_start_workflow(
                LeaseWorkflow.acquire, req, start_workflow_operation=self._start_operation(spec)
            )
        )
        return result

    def _spec(
        self,
        workspace_id: str,
        group_id: str,
        backend: str,
        image: str | None,
        environment: dict[str, str] | None,
        agent_id: str | None = None,
    ) -> LeaseSpec:
        return LeaseSpec(
            workspace_id=workspace_id,
            group_id=group_id,
            backend=backend,
            image=image,
            environment=environment or {},
            agent_id=agent_id,
            desktop_enabled=self.settings.desktop_enabled,
            terminal_enabled=self.settings.terminal_enabled,
            snapshots_enabled=self.settings.snapshots_enabled,
            timers=self.timers,
        )

    def _start_operation(self, spec: LeaseSpec) -> WithStartWorkflowOperation[LeaseWorkflow, LeaseView]:
        # Every activity of the lease's box carries the spec: it must fit in a workflow task as an update does.
        check_update_input("lease spec (image, environment)", spec)
        # update-with-start: the first call for a group creates its lease workflow, later ones join it.
        return WithStartWorkflowOperation(
            LeaseWorkflow.run,
            LeaseInput(spec=spec),
            id=spec.lease_id,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            task_queue=self.settings.task_queue,
            static_summary=f"lease {spec.workspace_id}/{spec.group_id} ({spec.backend})",
        )

    async def attach_viewer(
        self,
        workspace_id: str,
        group_id: str,
        *,
        viewer_id: str | None = None,
        subject: str | None = None,
        plane: Literal["desktop", "terminal"] = "desktop",
        geometry: str = "1280x800",
        mode: Literal["view", "control"] = "view",
    ) -> ViewerCell:
        """Hold the lease as a viewer, bring up the plane and mint a stream token for it (here, not in history).

        ``mode="view"`` (the default) lets the viewer watch only; ``"control"`` also lets it type
        and move the pointer (the edge routes the token to the plane's input-taking server).
        """
        validate_lease_ids(workspace_id, group_id)
        if mode not in ("view", "control"):
            raise errors.InvalidRequest(f"mode must be 'view' or 'control', not {mode!r}")
        backend = self.settings.default_backend
        spec = self._spec(workspace_id, group_id, backend, None, None)
        req = build_request(
            AttachViewerRequest,
            viewer_id=viewer_id or str(uuid.uuid4()),
            subject=subject,
            plane=plane,
            geometry=geometry,
            mode=mode,
        )
        check_update_input("attach_viewer", req)
        attachment: ViewerAttachment = await self._call(
            lambda: self.client.execute_update_with_start_workflow(
                LeaseWorkflow.attach_viewer, req, start_workflow_operation=self._start_operation(spec)
            )
        )
        return self.mint_viewer_cell(attachment.grant, attachment.endpoint, subject=subject, mode=attachment.mode)

    def mint_viewer_cell(
        self,
        grant: LeaseGrant,
        endpoint: PlaneEndpoint,
        *,
        subject: str | None = None,
        mode: Literal["view", "control"] = "view",
    ) -> ViewerCell:
        """A fresh token of ``mode`` for a viewer of ``grant``'s epoch; call again (after a heartbeat) to renew it."""
        from sandbox.stream_token import StreamTokenKey, claim_id, root_secret_for

        ttl = self.settings.stream_token_ttl_seconds
        key = StreamTokenKey.for_lease(root_secret_for(self.settings), grant.lease_id, grant.epoch)
        now = int(time.time())
        token = key.mint_for(
            {
                "workspace_id": claim_id(grant.lease_id.split("/")[1]),
                "session_id": claim_id(grant.lease_id),
                "viewer_id": claim_id(grant.holder_id),
                "lease_epoch": grant.epoch,
                "mode": mode,
                "port": PLANE_PORTS[endpoint.plane],
                "subject_id": subject,
            },
            now=now,
            ttl_seconds=ttl,
        )
        return ViewerCell(
            lease_id=grant.lease_id,
            plane=endpoint.plane,
            viewer_id=grant.holder_id,
            epoch=grant.epoch,
            instance_id=grant.instance_id,
            url=endpoint.url,
            token=token,
            expires_at=datetime.fromtimestamp(now + ttl, tz=UTC),
            transport=endpoint.transport,
            resolution=endpoint.resolution,
            mode=mode,
        )

    async def heartbeat(
        self, workspace_id: str, group_id: str, holder_id: str, epoch: int, *, kind: HolderKind = "turn"
    ) -> HeartbeatResult:
        """Refresh a holder's TTL; raises ``StaleEpoch`` or ``HolderNotFound`` when fenced.

        Off the lease's history: the lease is asked by a query (``heartbeat_check``) whether it
        would accept the heartbeat (refused with the same typed errors as the update), and the
        heartbeat is recorded as one row write in the store the lease's worker reads at the
        holder's deadline. ``expires_at`` is then the earliest the holder can expire (now + TTL;
        see ``LeaseWorkflow._expire_holders`` for the latest). A lease started before this path, a
        client whose store is not the worker's (another database URL), or a failed store write
        falls back to the ``heartbeat`` update, as before.

        The query (a billed action on Temporal Cloud, and a round trip to a worker) is asked at
        most once per half holder TTL for the same holder and epoch; in between, the store write
        itself refuses an epoch the lease's projection has moved past (``StaleEpoch``, same
        words). So a fence is seen at once when the epoch moved (once projected) and within half a
        TTL when only the holder was dropped; ``liveness`` is the one the last query saw.
        """
        _validate_kind(kind)
        validate_epoch("epoch", epoch)
        h = self.handle(workspace_id, group_id)
        req = build_request(HeartbeatRequest, kind=kind, holder_id=holder_id, epoch=epoch)
        check_update_input("heartbeat", req)

        async def ask() -> HeartbeatCheck | None:
            try:
                return await h.query(LeaseWorkflow.heartbeat_check, req, reject_condition=QueryRejectCondition.NOT_OPEN)
            except WorkflowQueryRejectedError:
                raise errors.LeaseNotFound(f"lease {h.id} has completed; acquire again") from None
            except WorkflowQueryFailedError:
                return None  # a worker from before the query: heartbeat by update

        key = (h.id, kind, holder_id, epoch)
        checked = self._checked.get(key)
        check: HeartbeatCheck | None
        if checked is not None and time.monotonic() < checked[0]:
            check = checked[1]
        else:
            self._checked.pop(key, None)
            check = await self._call(ask)
            if check is not None and check.refusal is not None:
                raise errors.error_from_type(check.refusal, check.message or check.refusal)
            if check is not None:
                self._remember_check(key, check)
        beats = self._heartbeat_store(check.store_id) if check is not None else None
        if check is not None and beats is not None:
            now = datetime.now(UTC)
            try:
                outcome = await beats.beat(h.id, kind, holder_id, epoch, now)
            except Exception as err:  # noqa: BLE001 - any store failure: the update still works
                log.warning(
                    "recording the heartbeat of %s in the store failed (%s); sending it as an update", h.id, err
                )
            else:
                if outcome.beats is None:
                    self._checked.pop(key, None)
                    raise errors.StaleEpoch(stale_heartbeat_message(epoch, outcome.lease_epoch or 0))
                return HeartbeatResult(
                    alive=True,
                    epoch=check.epoch,
                    liveness=check.liveness,
                    expires_at=now + timedelta(seconds=check.holder_ttl_seconds),
                )
        result: HeartbeatResult = await self._call(lambda: h.execute_update(LeaseWorkflow.heartbeat, req))
        return result

    def _remember_check(self, key: tuple[str, str, str, int], check: HeartbeatCheck) -> None:
        """Keep an accepted heartbeat check for half a holder TTL (see :meth:`heartbeat`)."""
        now = time.monotonic()
        if len(self._checked) > 10_000:  # holders come and go: forget the stale ones
            self._checked = {k: v for k, v in self._checked.items() if v[0] > now}
        self._checked[key] = (now + check.holder_ttl_seconds / 2, check)

    def _heartbeat_store(self, store_id: str | None) -> HolderHeartbeats | None:
        """The store to record heartbeats in when it is the one the lease's worker reads (else None)."""
        if store_id is None:
            return None
        try:
            if store_fingerprint(self.settings.resolved_database_url()) != store_id:
                return None
        except errors.SandboxConfigError:
            return None
        if self._beats is None:
            # One connection per heartbeat (NullPool): nothing pooled outlives this client.
            self._beats_db = Database.for_settings(self.settings, pooled=False)
            self._beats = HolderHeartbeats(self._beats_db)
        return self._beats

    async def release(
        self, workspace_id: str, group_id: str, holder_id: str, *, kind: HolderKind = "turn"
    ) -> ReleaseResult:
        """Stop holding; raises ``HolderNotFound`` for a holder the lease does not have."""
        _validate_kind(kind)
        h = self.handle(workspace_id, group_id)
        ref = build_request(HolderRef, kind=kind, holder_id=holder_id)
        check_update_input("release", ref)
        result: ReleaseResult = await self._call(lambda: h.execute_update(LeaseWorkflow.release, ref))
        return result

    async def describe(self, workspace_id: str, group_id: str) -> LeaseView:
        """The lease's full state from its workflow (works on completed leases too)."""
        h = self.handle(workspace_id, group_id)
        result: LeaseView = await self._call(lambda: h.query(LeaseWorkflow.describe))
        return result

    async def capabilities(
        self, workspace_id: str, group_id: str, *, runtime_desktop: RuntimeDesktop | None = None
    ) -> SessionCapabilities:
        """The negotiated capability document of the lease's session, as the agent turn sees it.

        Negotiated from the lease's backend, OS, liveness and epoch and this client's settings
        (desktop/terminal/computer-use toggles, whether a stream-token secret is configured).
        ``runtime_desktop`` is what the worker can run beyond the backend's descriptor (see
        :func:`activities.planes.runtime_desktop`; the local backend's desktop). A ``selfhosted``
        lease's machine is pinged: what its agent reports (whether it answers, its display, its
        owner's consents) refines the document
        (:func:`sandbox.selfhosted_capabilities.agent_report_overlays`), so an offline machine's
        cells are all ``agent_offline``.
        """
        view = await self.describe(workspace_id, group_id)
        overlays = await self._agent_report_overlays(view) if view.backend == "selfhosted" else []
        context = NegotiationContext(
            session_id=view.lease_id,
            backend=view.backend,
            os=view.os,
            liveness=view.liveness,
            lease_epoch=view.epoch,
            desktop_enabled=self.settings.desktop_enabled,
            terminal_enabled=self.settings.terminal_enabled,
            computer_use_enabled=self.settings.computer_use_enabled,
            computer_use_read_only=self.settings.computer_use_read_only,
            # Without SANDBOX_STREAM_TOKEN_SECRET the worker creates its root secret in the data dir.
            stream_token_secret_available=(
                self.settings.stream_token_secret is None or bool(self.settings.stream_token_secret.get_secret_value())
            ),
            runtime_desktop=runtime_desktop,
        )
        return negotiate_capabilities(context, overlays=overlays)

    async def _agent_report_overlays(self, view: LeaseView) -> list[CapabilityOverlay]:
        """Ping the agent of a selfhosted lease once; the overlays of what it reported (offline: no answer)."""
        from providers.selfhosted import NatsControlRpc, probe_agent

        state = view.envelope.state if view.envelope is not None else {}
        agent_id = state.get("agentId") or view.agent_id or self.settings.selfhosted_agent_id
        if not isinstance(agent_id, str) or not agent_id:
            return agent_report_overlays(False, None)  # no machine to ask: nothing is known to be there
        rpc = NatsControlRpc.for_settings(self.settings)
        try:
            probe = await probe_agent(
                rpc, view.workspace_id, agent_id, timeout=self.settings.selfhosted_probe_timeout_seconds
            )
        finally:
            await rpc.close()
        return agent_report_overlays(probe.responded, probe.reply)

    async def drain(
        self, workspace_id: str, group_id: str, *, reason: str = "operator", wait: bool = False
    ) -> LeaseView:
        """Drop every holder and tear the box down; with ``wait`` returns once the lease is cold."""
        h = self.handle(workspace_id, group_id)
        req = build_request(DrainRequest, reason=reason, wait=wait)
        check_update_input("drain", req)
        result: LeaseView = await self._call(lambda: h.execute_update(LeaseWorkflow.drain, req))
        return result

    async def exec(
        self,
        workspace_id: str,
        group_id: str,
        cmd: list[str],
        *,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
        env: dict[str, str] | None = None,
        epoch: int | None = None,
    ) -> ExecOutcome:
        """Run a command in the warm box; raises ``LeaseNotWarm`` on a cold lease.

        Raises:
            InvalidRequest: ``cmd`` is no non-empty list of strings, ``timeout_seconds`` is not a
                finite number in (0, 86400], ``epoch`` is not a non-negative int, or another
                argument has the wrong type (the message names the field).
        """
        validate_cmd(cmd)
        validate_timeout("timeout_seconds", timeout_seconds)
        validate_epoch("epoch", epoch, optional=True)
        h = self.handle(workspace_id, group_id)
        req = build_request(
            ExecRequest, cmd=list(cmd), workdir=workdir, timeout_seconds=timeout_seconds, env=env or {}, epoch=epoch
        )
        check_update_input("exec", req)
        result: ExecOutcome = await self._call(lambda: h.execute_update(LeaseWorkflow.exec, req))
        return result

    async def report_box_lost(self, workspace_id: str, group_id: str, epoch: int, instance_id: str) -> BoxLostResult:
        """Tell the lease its box looks gone; it confirms with the provider before going cold."""
        validate_epoch("epoch", epoch)
        h = self.handle(workspace_id, group_id)
        report = build_request(BoxLostReport, epoch=epoch, instance_id=instance_id)
        check_update_input("report_box_lost", report)
        result: BoxLostResult = await self._call(lambda: h.execute_update(LeaseWorkflow.report_box_lost, report))
        return result

    async def hold_teardown(self, workspace_id: str, group_id: str, until: datetime, reason: str) -> None:
        """Operator hold: no automatic teardown until ``until``."""
        h = self.handle(workspace_id, group_id)
        req = build_request(HoldRequest, until=until, reason=reason)
        await self._call(lambda: h.signal(LeaseWorkflow.hold, req))

    async def unhold(self, workspace_id: str, group_id: str) -> None:
        """Lift an operator hold."""
        h = self.handle(workspace_id, group_id)
        await self._call(lambda: h.signal(LeaseWorkflow.unhold))

    async def stop(self, workspace_id: str, group_id: str) -> None:
        """Drain and complete the lease workflow."""
        h = self.handle(workspace_id, group_id)
        await self._call(lambda: h.signal(LeaseWorkflow.stop))

    @contextlib.asynccontextmanager
    async def hold(
        self,
        workspace_id: str,
        group_id: str,
        *,
        kind: HolderKind = "turn",
        holder_id: str | None = None,
        subject: str | None = None,
        backend: str | None = None,
        heartbeat_interval: float | None = None,
    ) -> AsyncIterator[LeaseGrant]:
        """Acquire, heartbeat in the background, and release on exit.

        If a heartbeat is fenced (``StaleEpoch``/``HolderNotFound``) the background loop stops and
        logs it; the grant's epoch is then no longer valid and operations using it will be fenced.
        """
        grant = await self.acquire(
            workspace_id, group_id, kind=kind, holder_id=holder_id, subject=subject, backend=backend
        )
        interval = heartbeat_interval or min(HEARTBEAT_INTERVAL_SECONDS[kind], self.timers.holder_ttl_seconds / 3)

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.heartbeat(workspace_id, group_id, grant.holder_id, grant.epoch, kind=kind)
                except (errors.StaleEpoch, errors.HolderNotFound) as err:
                    log.warning("lease %s fenced: %s", grant.lease_id, err.message)
                    return
                except errors.SandboxError as err:  # transient: keep trying until the TTL decides
                    log.warning("heartbeat for %s failed: %s", grant.lease_id, err.message)

        task = asyncio.create_task(beat())
        try:
            yield grant
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(errors.HolderNotFound, errors.StaleEpoch, errors.LeaseNotFound):
                await self.release(workspace_id, group_id, grant.holder_id, kind=kind)
