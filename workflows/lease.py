"""The lease workflow: the single writer of one sandbox group's lease.

One workflow per sandbox group, id ``lease/<workspace>/<group>``, started by update-with-start
on the first ``acquire``. It owns the lifecycle ``cold → warming → warm → draining → cold``,
the holders and their TTLs, the idle grace, and the **epoch** that fences everything done
against a box that has since been replaced. All I/O happens in activities called by name
(:class:`~workflows.activity_names.ActivityName`).

Liveness moves only along these edges (:data:`LIVENESS_EDGES`, checked by every transition)::

                  acquire on a cold lease
        +------+ ------------------------> +---------+
        | cold |                           | warming |
        +------+ <------------------------ +---------+
         ^    ^       warming failed            |
         |    |                                 | box ready
         |    |        box lost                 v
         |    +------------------------------ +------+
         |                                    | warm |
         |                                    +------+
         |                     no holders,     |    ^
         |                     drain, stop,    |    | re-armed by
         |                     rotation due    v    | a new holder
         |    teardown done, box lost       +----------+
         +--------------------------------- | draining |
                                            +----------+

Epoch rules (and only these): +1 on warm commit, on warming failure, on box lost, and on
draining → cold. Attach, release, re-arm and warm → draining leave it unchanged.

State: everything that must survive continue-as-new is one :class:`~workflows.models.lease.LeaseState`
(``self.s``), carried whole into the next run with the unchanged spec; the other attributes are
bookkeeping of the current run (waiters, in-flight operations, the projector's progress).

Concurrency: handlers run as asyncio tasks on one deterministic loop, and another handler may run
at every ``await`` (each one says what it waits for). The main loop in :meth:`LeaseWorkflow.run`
performs every transition that needs an activity (warm-up, teardown); handlers only change
in-memory state and wake it, except those that run their own activity on the warm box (``exec``,
``report_box_lost``, ``attach_viewer``, ``screenshot``, ``desktop_input``): they count as in-flight
operations (:meth:`LeaseWorkflow._in_flight`) so the box is never torn down under them. Each
update's validator sits right under it; a validator raises to reject the update before anything
is written to history, and every one first refuses an input over
:data:`~workflows.models.lease.MAX_UPDATE_INPUT_BYTES` (too big to write, it would fail every task).

Box loss reaches recordings: when the lease loses its box (an ``exec`` or box operation saw
NotFound, a ``report_box_lost`` was confirmed, a periodic capture saw NotFound), every
``recording`` holder of that box gets the ``box_lost`` signal, so its RecordingWorkflow stops and
finalizes as ``box-death`` at once instead of at its next check (patch
``recording-box-lost-signal``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from sandbox import errors
    from sandbox.box import Envelope
    from store.records import HolderRecord, LeaseEventRecord, LeaseRecord
    from workflows import search_attributes as sa
    from workflows.activity_names import ActivityName
    from workflows.backend_profile import backend_profile
    from workflows.errors import failure, forwarded
    from workflows.models.boxes import (
        BoxRef,
        CaptureRequest,
        CheckResult,
        DiscardInput,
        DiscardResult,
        ExecInput,
        ExecOutput,
        HolderBeats,
        HolderBeatsInput,
        ProjectionInput,
        ProvisionInput,
        ProvisionResult,
        PublishRequest,
        SeedInput,
        SeedResult,
    )
    from workflows.models.computer_use import (
        DesktopInputInput,
        DesktopInputRequest,
        DesktopInputResult,
        Screenshot,
        ScreenshotInput,
        ScreenshotRequest,
    )
    from workflows.models.lease import (
        MAX_EXEC_TIMEOUT_SECONDS,
        MAX_HOLDER_ID_LENGTH,
        TRANSITIONS_KEPT,
        AcquireRequest,
        ArchiveRef,
        AttachViewerRequest,
        BackendProfile,
        BoxLostReport,
        BoxLostResult,
        DrainRequest,
        ExecOutcome,
        ExecRequest,
        HeartbeatCheck,
        HeartbeatRequest,
        HeartbeatResult,
        Holder,
        HolderRef,
        HolderView,
        HoldRequest,
        LeaseGrant,
        LeaseInput,
        LeaseState,
        LeaseView,
        Liveness,
        PlaneEndpoint,
        ReleaseResult,
        Role,
        Transition,
        ViewerAttachment,
        oversized_update_input,
        stale_heartbeat_message,
    )
    from workflows.models.planes import PlaneRequest, TearDownPlanesRequest
    from workflows.models.recording import BoxLostNotice, RecordingRequest, RecordingStarted, recording_workflow_id
    from workflows.models.session_events import session_events_subject, stream_url_rotated
    from workflows.recording import RecordingWorkflow, start_recording_child

# Activities that must not be retried blindly use explicit policies; the rest retry forever with
# backoff because the lease cannot move on without them (projection, terminate).
_RETRY_FOREVER = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=30))
# Histories recorded before the lease published stream.url.rotated replay without it.
_STREAM_URL_ROTATED_PATCH = "stream-url-rotated-event"
# Histories recorded before the lease told its recordings about a lost box replay without the signals.
_RECORDING_BOX_LOST_PATCH = "recording-box-lost-signal"
# Histories recorded before a failed discard after a failed warming was survived (and its typed
# cause reached the acquirer) replay as they ran: the discard's failure failed the workflow.
_WARMING_FAILURE_KEEPS_LEASE_PATCH = "warming-failure-keeps-lease"

# Histories recorded before an offline agent ended a warming at once replay with the retried provision.
_OFFLINE_AGENT_FAILS_WARMING_PATCH = "offline-agent-fails-warming"

# Histories recorded before holder heartbeats left the history replay with holders expired on the
# workflow's own record only (no read of the store's heartbeat marks at a holder's deadline).
_HEARTBEATS_OFF_HISTORY_PATCH = "holder-heartbeats-off-history"


_WARMING_CAUSES_FORWARDED: Final = frozenset(
    {
        errors.SandboxConfigError.error_type,
        errors.ProviderAuthError.error_type,
        errors.Unsupported.error_type,
        errors.AgentOffline.error_type,
    }
)
"""Why a warming failed, passed to the acquirer as its own type: what the caller (or the worker's
operator) must fix or wait for, which a retried warm-up would only meet again."""

LIVENESS_EDGES: Final[Mapping[Liveness, frozenset[Liveness]]] = {
    "cold": frozenset({"warming"}),
    "warming": frozenset({"warm", "cold"}),  # box ready; warming failed
    "warm": frozenset({"draining", "cold"}),  # no holders, drain, stop or rotation; box lost
    "draining": frozenset({"warm", "cold"}),  # re-armed by a new holder; teardown done or box lost
}
"""The liveness changes a lease makes (the module docstring draws them); any other is a bug."""


class IllegalTransition(RuntimeError):
    """A liveness change outside :data:`LIVENESS_EDGES`: a bug, so it fails the workflow task, not the lease.

    Not an ``ApplicationError``: Temporal retries the workflow task (after a fix is deployed the
    lease goes on from its history) instead of failing the workflow.
    """


@workflow.defn(name="LeaseWorkflow")
class LeaseWorkflow:
    """Durable owner of one sandbox group's box."""

    @workflow.init
    def __init__(self, inp: LeaseInput) -> None:
        self.spec = inp.spec
        self.s: LeaseState = inp.state if inp.state is not None else LeaseState()
        self.timers = inp.spec.timers
        self._wake = False
        self._waiters = 0
        self._inflight = 0
        self._failures = 0
        self._tearing_down = False
        self._teardown_retry_at: datetime | None = None
        self._projected_version = self.s.version
        self._projecting = False
        self._pending_events: list[Transition] = []
        self._run_transitions = 0
        self._run_updates = 0
        self._session_events: list[dict[str, Any]] = []
        self._publishing_events = False
        self._notifying: set[asyncio.Task[None]] = set()
        # The typed cause of the last failed warming of this run (what its waiting acquirers are told).
        self._warming_cause: ApplicationError | None = None
        # Lean attach/release (see ``run``), decided once per run at its start.
        self._lean = False
        self._deadline_timer: asyncio.Task[None] | None = None
        self._timer_at: datetime | None = None
        self._published: tuple[str, int] | None = None
        self._flush_upto = 0  # lean: versions up to this one are due in the store now
        self._ending = False  # waiting to continue-as-new or to complete: nothing is deferred then
        self._projected_key: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ main loop

    @workflow.run
    async def run(self, inp: LeaseInput) -> LeaseView:
        """Drive the lifecycle until ``stop``; continue-as-new when history grows."""
        if not self.s.seeded:
            # Updates wait for the seed (acquire waits on ``seeded``); nothing else can change meanwhile.
            await self._seed()
        # Lean attach/release: the deadline timer kept, search attributes upserted and the store
        # written only on change. Versioned by the seed rather than a patch marker (a marker in every
        # lease's history would be a payload the codec never encrypts): leases seeded before the
        # seed carried a store id replay as they ran, with a new timer at every wake, an upsert on
        # every publish and a projection of every change at once.
        self._lean = self.s.store_id is not None
        self._publish()
        projector = asyncio.create_task(self._project_loop())
        publisher = asyncio.create_task(self._session_event_loop())
        while True:
            self._wake = False
            # A wake (deadline or handler) writes what holder-only changes deferred (see ``_project_loop``).
            self._flush_upto = self.s.version
            # At a holder's deadline this reads its heartbeats from the store (handlers run meanwhile).
            await self._expire_holders()
            # The one transition due now, if any; handlers run during its activities.
            await self._advance()
            if self.s.stop_requested and self.s.liveness == "cold" and self._waiters == 0:
                break
            if self._should_continue_as_new():
                # Let running handlers and the projector finish before handing the state to the next run.
                self._ending = True  # every change is projected at once from here (see ``_project_loop``)
                await workflow.wait_condition(
                    lambda: (workflow.all_handlers_finished() and self._projection_idle()) or not self._quiescent()
                )
                self._ending = False
                if self._quiescent():
                    workflow.continue_as_new(LeaseInput(spec=self.spec, state=self.s))
                continue
            # Until a handler wakes us or the next deadline (holder TTL, grace, hold, rotation) passes.
            await self._sleep_until_woken()
        # Stopping: let the last handlers finish and the final state be projected.
        self._ending = True
        await workflow.wait_condition(lambda: workflow.all_handlers_finished() and self._projection_idle())
        projector.cancel()
        publisher.cancel()
        return self._view()

    async def _seed(self) -> None:
        # A fresh run continues the epoch of any earlier incarnation of this lease, so a token or
        # grant minted by a previous run can never validate against a new box.
        seed = await workflow.execute_activity(
            ActivityName.LOAD_LEASE_SEED,
            SeedInput(lease_id=self.spec.lease_id, backend=self.spec.backend),
            result_type=SeedResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_RETRY_FOREVER,
            summary="load epoch of earlier incarnation",
        )
        self.s.epoch = seed.epoch
        self.s.version = max(self.s.version, seed.version)
        # Frozen for the lease's life (and in its history); a seed recorded before profiles has
        # none, and that lease reads the descriptor table as it goes, as it always did.
        self.s.backend_profile = seed.backend_profile
        self.s.store_id = seed.store_id
        self._projected_version = self.s.version
        self.s.seeded = True
        self._touch()

    async def _advance(self) -> None:
        """Perform the one transition the current state calls for, if any."""
        s = self.s
        now = workflow.now()
        if s.liveness == "cold":
            # Holders kept through a rotation also want the next box.
            if (self._waiters > 0 or s.holders) and not s.stop_requested:
                # Acquires and drains arrive meanwhile; waiters are granted when the box is warm.
                await self._warm_up()
        elif s.liveness == "warm":
            forced = s.drain_requested or ("stop" if s.stop_requested else None)
            if s.rotation_due_at is not None and now >= s.rotation_due_at and not s.rotation_requested:
                # The provider would kill the box soon: capture and replace it while we still can.
                s.rotation_requested = True
                s.drain_deadline = now
                self._transition("draining", f"rotation: provider lifetime ends, rotating at {s.rotation_due_at}")
            elif forced:
                # The drain/stop handler already dropped the holders it fenced; holders present now
                # arrived afterwards and wait for the next box.
                s.drain_deadline = now
                self._transition("draining", f"drain: {forced}")
            elif not s.holders:
                s.drain_deadline = now + timedelta(seconds=self.timers.idle_grace_seconds)
                self._transition("draining", "no holders left")
            elif self._periodic_capture_due(now):
                # Handlers run meanwhile; a teardown waits for the capture (it counts as in flight).
                await self._periodic_capture()
        elif s.liveness == "draining":
            if self._teardown_due(now):
                # Handlers run meanwhile; new acquires wait for the next box (see ``_tearing_down``).
                await self._tear_down()

    def _teardown_due(self, now: datetime) -> bool:
        s = self.s
        if self._inflight or self._tearing_down:
            return False
        if self._teardown_retry_at and now < self._teardown_retry_at:
            return False
        if s.drain_requested or s.stop_requested or s.rotation_requested:
            return True  # drain, stop and rotation override holders (they wait for the next box), grace and hold
        if s.holders:
            return False
        if s.hold_until and now < s.hold_until:
            return False
        return s.drain_deadline is None or now >= s.drain_deadline

    async def _warm_up(self) -> None:
        s = self.s
        self._transition("warming", "acquire on a cold lease")
        key = f"{self.spec.lease_id}/epoch-{s.epoch}"
        t = self.timers
        # An agent that does not answer is known at once (no responders): its acquirers hear so now,
        # instead of after the warming TTL of retries. The machine is never replaced by another box.
        offline_is_final = (
            [errors.AgentOffline.error_type]
            if self.spec.backend == "selfhosted" and workflow.patched(_OFFLINE_AGENT_FAILS_WARMING_PATCH)
            else None
        )
        try:
            # Holders keep arriving (and may drop out) while the box comes up; their TTL starts at warm.
            result = await workflow.execute_activity(
                ActivityName.PROVISION_BOX,
                ProvisionInput(
                    lease_id=self.spec.lease_id,
                    workspace_id=self.spec.workspace_id,
                    group_id=self.spec.group_id,
                    backend=self.spec.backend,
                    epoch=s.epoch,
                    idempotency_key=key,
                    image=self.spec.image,
                    os=self.spec.os,
                    environment=self.spec.environment,
                    agent_id=self.spec.agent_id,
                    probe_timeout_seconds=t.probe_timeout_seconds,
                    restore=[a for a in (s.archive_current, s.archive_previous) if a is not None]
                    if self._snapshots_on()
                    else [],
                ),
                result_type=ProvisionResult,
                schedule_to_close_timeout=timedelta(seconds=t.warming_ttl_seconds),
                heartbeat_timeout=timedelta(seconds=t.activity_heartbeat_seconds),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=250),
                    maximum_interval=timedelta(seconds=5),
                    non_retryable_error_types=offline_is_final,
                ),
                summary=f"provision {self.spec.backend} box",
            )
        except ActivityError as err:
            message = _cause_message(err)
            survives = workflow.patched(_WARMING_FAILURE_KEEPS_LEASE_PATCH)
            self._warming_cause = _cause_application_error(err) if survives else None
            try:
                # Whatever the provider made for this attempt must not outlive it.
                await workflow.execute_activity(
                    ActivityName.DISCARD_LEASE_BOXES,
                    DiscardInput(backend=self.spec.backend, lease_id=self.spec.lease_id),
                    result_type=DiscardResult,
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=_RETRY_FOREVER,
                    summary="discard boxes of failed warming",
                )
            except ActivityError as discard_err:
                if not survives:
                    raise
                # Non-retryable (the provider cannot even be built, e.g. a missing setting): the lease
                # goes cold all the same; a box left behind is the orphan sweep's once the epoch moves on.
                workflow.logger.warning(
                    "discarding the boxes of a failed warming failed: %s", _cause_message(discard_err)
                )
            s.last_error = message
            self._failures += 1
            self._transition("cold", f"warming failed: {message}", bump=True)
            return
        s.envelope = result.envelope
        s.last_error = None
        now = workflow.now()
        for h in s.holders:  # they waited through warming; their TTL starts now
            h.last_heartbeat_at = now
        s.warm_since = now
        s.last_capture_at = now
        lifetime = self._hard_lifetime_seconds()
        s.rotation_due_at = (
            now + timedelta(seconds=max(lifetime - t.rotation_lead_seconds, 0)) if lifetime is not None else None
        )
        self._transition("warm", self._hydration_reason(result), bump=True)

    def _hydration_reason(self, result: ProvisionResult) -> str:
        s = self.s
        outcome = result.restore
        if outcome is None or (outcome.restored_from is None and not outcome.degraded):
            s.restore_status = "empty"
            return "box ready"
        notes = "; ".join(outcome.notes)
        if outcome.degraded:
            s.restore_status = "degraded"
            s.last_error = f"restore degraded: {notes}"
            return f"box ready, restore DEGRADED (no archive verified): {notes}"
        if s.archive_current is not None and outcome.restored_from != s.archive_current.snapshot_id:
            s.restore_status = "fell-back"
            return f"box ready, restored previous archive {outcome.restored_from} ({notes})"
        s.restore_status = "restored"
        return f"box ready, restored archive {outcome.restored_from}"

    def _profile(self) -> BackendProfile:
        """The backend's profile frozen in the state; a lease seeded before profiles reads today's table."""
        if self.s.backend_profile is not None:
            return self.s.backend_profile
        return backend_profile(self.spec.backend)

    def _snapshots_on(self) -> bool:
        """Whether capture/restore apply: on, and the backend keeps snapshots (selfhosted: the machine persists)."""
        return self.spec.snapshots_enabled and self._profile().keeps_snapshots

    def _hard_lifetime_seconds(self) -> float | None:
        if self.timers.hard_lifetime_seconds is not None:
            return self.timers.hard_lifetime_seconds
        return self._profile().hard_lifetime_seconds

    def _periodic_capture_due(self, now: datetime) -> bool:
        s = self.s
        interval = self.timers.snapshot_interval_seconds
        if not self._snapshots_on() or interval <= 0 or s.last_capture_at is None:
            return False
        return now >= s.last_capture_at + timedelta(seconds=interval)

    async def _periodic_capture(self) -> None:
        s = self.s
        assert s.envelope is not None
        envelope, epoch = s.envelope, s.epoch
        try:
            with self._in_flight(wake=False):
                # Handlers may run meanwhile; the box stays up for this capture.
                await self._capture("periodic", only_if_changed=True)
        except ActivityError as err:
            if _cause_type(err) == errors.BoxNotFound.error_type:
                self._box_lost(epoch, envelope.instance_id, "box lost (periodic capture saw NotFound)")
                return
            # The next interval tries again; the last good archive still stands.
            s.last_error = f"periodic capture failed: {_cause_message(err)}"
            s.last_capture_at = workflow.now()
            self._touch()

    async def _capture(
        self, reason: Literal["drain", "periodic", "rotation"], *, only_if_changed: bool = False
    ) -> None:
        """Capture the workspace, publish it as current (previous kept), and remember both slots."""
        s = self.s
        assert s.envelope is not None
        t = self.timers
        # Handlers run meanwhile; the box is not terminated until the archive is verified.
        ref = await workflow.execute_activity(
            ActivityName.CAPTURE_WORKSPACE,
            CaptureRequest(
                backend=self.spec.backend,
                envelope=s.envelope,
                lease_id=self.spec.lease_id,
                workspace_id=self.spec.workspace_id,
                group_id=self.spec.group_id,
                epoch=s.epoch,
                reason=reason,
                only_if_changed=only_if_changed,
                previous_sha256=s.archive_current.sha256 if s.archive_current else None,
            ),
            result_type=ArchiveRef,
            start_to_close_timeout=timedelta(seconds=t.capture_timeout_seconds),
            heartbeat_timeout=timedelta(seconds=max(t.activity_heartbeat_seconds, 5)),
            retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=[errors.BoxNotFound.error_type]),
            summary=f"capture workspace ({reason})",
        )
        s.last_capture_at = workflow.now()
        if ref.unchanged:
            return
        # Only a published archive is restored into the next box.
        await workflow.execute_activity(
            ActivityName.PUBLISH_SNAPSHOT,
            PublishRequest(lease_id=self.spec.lease_id, snapshot_id=ref.snapshot_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_RETRY_FOREVER,
            summary="publish snapshot",
        )
        s.archive_previous, s.archive_current = s.archive_current, ref
        self._touch()

    async def _tear_down(self) -> None:
        s = self.s
        viewed = self._viewed()
        reason = s.drain_requested or ("stop" if s.stop_requested else None)
        reason = reason or ("rotation" if s.rotation_requested else "idle grace expired")
        self._tearing_down = True
        try:
            if s.envelope is not None and self._snapshots_on():
                # Never terminate a box without a verified archive, unless NotFound proves it is already gone.
                try:
                    # A drain, stop or rotation captures first; handlers may add holders (they wait for the next box).
                    await self._capture("rotation" if s.rotation_requested else "drain")
                except ActivityError as err:
                    if _cause_type(err) != errors.BoxNotFound.error_type:
                        raise
                    reason = f"{reason}; box already gone, nothing to capture"
            if s.envelope is not None and s.planes:
                # Planes first, so no viewer edge outlives its box.
                await self._tear_down_planes(s.envelope)
            if s.envelope is not None:
                # The box goes; handlers run meanwhile and see ``_tearing_down``.
                await workflow.execute_activity(
                    ActivityName.TERMINATE_BOX,
                    BoxRef(backend=self.spec.backend, envelope=s.envelope),
                    start_to_close_timeout=timedelta(seconds=120),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(milliseconds=200),
                        maximum_interval=timedelta(seconds=30),
                        maximum_attempts=10,
                    ),
                    summary="terminate box",
                )
        except ActivityError as err:
            # Keep the lease draining and the box running and known; try again later rather than lose anything.
            s.last_error = f"teardown failed, will retry: {_cause_message(err)}"
            self._teardown_retry_at = workflow.now() + timedelta(seconds=self.timers.teardown_retry_seconds)
            self._touch()
            return
        finally:
            self._tearing_down = False
        self._teardown_retry_at = None
        self._reset_to_cold(reason, viewed=viewed)

    async def _tear_down_planes(self, envelope: Envelope) -> None:
        # Best effort: the box is terminated next anyway, so a failure here only costs a log line.
        try:
            # Handlers run meanwhile (they see ``_tearing_down``).
            await workflow.execute_activity(
                ActivityName.TEAR_DOWN_PLANES,
                TearDownPlanesRequest(backend=self.spec.backend, envelope=envelope),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=2),
                summary="tear down planes",
            )
        except ActivityError as err:
            workflow.logger.warning("tearing down planes failed: %s", _cause_message(err))
        self.s.planes = []

    async def _sleep_until_woken(self) -> None:
        deadline = self._next_deadline()
        timeout: float | None = None
        if deadline is not None:
            timeout = (deadline - workflow.now()).total_seconds()
            if timeout <= 0:
                return
            timeout = max(timeout, 0.001)
        if self._lean:
            # Until a handler wakes us or the kept deadline timer fires.
            await self._sleep_on_kept_timer(deadline)
            return
        try:
            # Handlers set ``_wake``; a timer covers the next deadline.
            await workflow.wait_condition(
                lambda: self._wake or self._should_continue_as_new(),
                timeout=timeout,
                timeout_summary="next lease deadline",
            )
        except TimeoutError:
            pass

    async def _sleep_on_kept_timer(self, deadline: datetime | None) -> None:
        """Sleep until woken or the next deadline, keeping the running timer when it still serves.

        A timer that fires at or before ``deadline`` is kept (an attach or release that leaves the
        earliest deadline where it was writes no timer events); one that fires early finds nothing
        due and is replaced then. Only a deadline earlier than the timer, or none at all, cancels it.
        """
        timer = self._deadline_timer
        if timer is not None and not timer.done():
            if deadline is None or self._timer_at is None or self._timer_at > deadline:
                timer.cancel()
                timer = None
        else:
            timer = None
        if timer is None and deadline is not None:
            self._timer_at = deadline
            seconds = max((deadline - workflow.now()).total_seconds(), 0.001)
            timer = asyncio.create_task(workflow.sleep(seconds, summary="next lease deadline"))
        self._deadline_timer = timer
        armed = timer
        # Handlers set ``_wake``; the kept timer covers the next deadline.
        await workflow.wait_condition(
            lambda: self._wake or self._should_continue_as_new() or (armed is not None and armed.done())
        )

    def _next_deadline(self) -> datetime | None:
        s = self.s
        candidates: list[datetime] = []
        ttl = timedelta(seconds=self.timers.holder_ttl_seconds)
        if s.liveness != "warming":
            candidates += [h.last_heartbeat_at + ttl for h in s.holders]
        if s.liveness == "warm":
            if s.rotation_due_at is not None and not s.rotation_requested:
                candidates.append(s.rotation_due_at)
            interval = self.timers.snapshot_interval_seconds
            if self._snapshots_on() and interval > 0 and s.last_capture_at is not None and s.holders:
                candidates.append(s.last_capture_at + timedelta(seconds=interval))
        if s.liveness == "draining":
            if s.drain_deadline is not None:
                candidates.append(s.drain_deadline)
            if s.hold_until is not None:
                candidates.append(s.hold_until)
            if self._teardown_retry_at is not None:
                candidates.append(self._teardown_retry_at)
        # A deadline already past was acted on (or is blocked by something that wakes us): only a
        # future one is worth a timer, else the loop would spin without yielding.
        now = workflow.now()
        future = [c for c in candidates if c > now]
        return min(future) if future else None

    async def _expire_holders(self) -> None:
        """Drop the holders past their deadline, after asking the store whether they heartbeat since.

        Heartbeats do not reach the workflow: a client records them in the store
        (``sandbox_holder_heartbeats``), and only when a holder's deadline (``last_heartbeat_at`` +
        TTL) passes does the lease read them, in one local activity for all holders
        (:meth:`_read_heartbeats`), and either re-arm the holder or drop it. So a held lease writes a
        few events per TTL, none per heartbeat.

        Bound: a holder that stops heartbeating is dropped at most **2 x TTL** (plus two reads of the
        store) after its last heartbeat, whatever the clocks say: each re-arm needs beats newer than
        the previous look, and looks are at most one TTL apart. When the writer's and the worker's
        clocks agree it is dropped within **TTL plus one read**: the re-armed deadline is its last
        heartbeat plus the TTL, and a mark that old expires.
        """
        s = self.s
        if s.liveness == "warming" or not s.holders:
            return
        now = workflow.now()
        ttl = timedelta(seconds=self.timers.holder_ttl_seconds)
        due = any(h.last_heartbeat_at + ttl <= now for h in s.holders)
        if due and s.store_id is not None and workflow.patched(_HEARTBEATS_OFF_HISTORY_PATCH):
            # Handlers may run meanwhile (a holder released, acquired or dropped by a drain).
            await self._read_heartbeats(ttl)
            now = workflow.now()
        alive = [h for h in s.holders if h.last_heartbeat_at + ttl > now]
        if len(alive) != len(s.holders):
            s.holders = alive
            self._touch()

    async def _read_heartbeats(self, ttl: timedelta) -> None:
        """Re-arm each holder past its deadline whose heartbeats moved on since the last look (see above)."""
        s = self.s
        try:
            # One quick read of the store; a local activity, so it costs one marker event.
            read = await workflow.execute_local_activity(
                ActivityName.READ_HOLDER_BEATS,
                HolderBeatsInput(lease_id=self.spec.lease_id, forget_older_than_seconds=3 * ttl.total_seconds()),
                result_type=HolderBeats,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3),
                summary="read holder heartbeats",
            )
        except ActivityError as err:
            # The store is unreachable: a client could not have recorded heartbeats there either (it
            # falls back to the heartbeat update), so the workflow's own record decides.
            workflow.logger.warning("reading holder heartbeats failed: %s", _cause_message(err))
            return
        marks = {(m.kind, m.holder_id): m for m in read.marks}
        now = workflow.now()
        for h in s.holders:
            if h.last_heartbeat_at + ttl > now:
                continue  # not due: acquired or re-armed by an update meanwhile
            mark = marks.get((h.kind, h.holder_id))
            if mark is None or mark.beats <= h.beats or mark.epoch != s.epoch:
                continue  # no heartbeat for this epoch since the last look: it expires
            age = max(read.read_at - mark.last_seen_at, timedelta(0))
            if age >= ttl:
                continue  # its latest heartbeat is older than the TTL by the store's clock: it expires
            h.beats = mark.beats
            # Deadline = its last heartbeat + TTL (in the future, as age < TTL).
            h.last_heartbeat_at = now - age

    # ------------------------------------------------------------------ continue-as-new

    def _quiescent(self) -> bool:
        return (
            self.s.liveness != "warming"
            and not self._tearing_down
            and self._waiters == 0
            and self._inflight == 0
            and not self.s.stop_requested
        )

    def _should_continue_as_new(self) -> bool:
        if not self._quiescent():
            return False
        return (
            workflow.info().is_continue_as_new_suggested()
            or self._run_transitions >= self.timers.continue_as_new_after_transitions
            or self._run_updates >= self.timers.continue_as_new_after_updates
        )

    # ------------------------------------------------------------------ projection

    def _projection_idle(self) -> bool:
        return (
            not self._projecting
            and self._projected_version >= self.s.version
            and not self._session_events
            and not self._publishing_events
            and not self._notifying
        )

    async def _project_loop(self) -> None:
        """Write the lease's state to the store after it changes, one write per burst of changes.

        Lean (a lease seeded with a store id, see ``run``): a transition is written at once; a change of holders
        only (an attach or release that moves no liveness) waits for the lease's next wake, that is
        at most until the next deadline (one holder TTL while the lease has holders), so an attach
        and a release in between cost no write at all; a write that would store what the store
        already has (heartbeat times aside) is skipped. The store never goes backwards: each write
        carries the version it projects, and the store keeps only newer ones.
        """
        while True:
            # Until some change bumps the version past the last projection (lean: and it is due).
            await workflow.wait_condition(
                lambda: (
                    self.s.version > self._projected_version
                    and (self._flush_upto > self._projected_version or self._ending or not self._lean)
                )
            )
            version = self.s.version
            events, self._pending_events = self._pending_events, []
            record = self._record()
            key = _projected_key(record)
            if self._lean and not events and key == self._projected_key:
                self._projected_version = version  # nothing a reader sees changed
                continue
            self._projecting = True
            try:
                # The projection of this version; later changes are projected by the next round.
                await workflow.execute_activity(
                    ActivityName.PROJECT_LEASE,
                    ProjectionInput(record=record, events=[self._event(t) for t in events]),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=_RETRY_FOREVER,
                    summary=f"project v{version}",
                )
            except ActivityError as err:
                # A non-retryable projection failure must not wedge the lease; the next change rewrites it.
                workflow.logger.warning("projection v%s failed: %s", version, _cause_message(err))
            finally:
                self._projecting = False
            self._projected_version = version
            self._projected_key = key

    async def _session_event_loop(self) -> None:
        # Best effort, in order: a lost event costs a viewer one heartbeat interval, never the lease.
        subject = session_events_subject(self.spec.workspace_id, self.spec.group_id)
        while True:
            # Until a transition queues an event.
            await workflow.wait_condition(lambda: bool(self._session_events))
            payload = self._session_events.pop(0)
            self._publishing_events = True
            try:
                # Best effort, one event at a time, in order.
                await workflow.execute_activity(
                    ActivityName.PUBLISH_SESSION_EVENT,
                    args=[subject, payload],
                    result_type=bool,
                    start_to_close_timeout=timedelta(seconds=10),
                    retry_policy=RetryPolicy(maximum_attempts=2),
                    summary=f"publish {payload['type']} epoch {payload['leaseEpoch']}",
                )
            except ActivityError as err:
                workflow.logger.warning("publishing %s failed: %s", payload["type"], _cause_message(err))
            finally:
                self._publishing_events = False

    def _record(self) -> LeaseRecord:
        s = self.s
        last = s.transitions[-1] if s.transitions else None
        return LeaseRecord(
            lease_id=self.spec.lease_id,
            workspace_id=self.spec.workspace_id,
            group_id=self.spec.group_id,
            backend=self.spec.backend,
            os=self.spec.os,
            liveness=s.liveness,
            epoch=s.epoch,
            instance_id=s.envelope.instance_id if s.envelope else None,
            envelope=s.envelope.model_dump(mode="json") if s.envelope else None,
            transition_seq=s.version,
            reason=last.reason if last else "created",
            updated_at=workflow.now(),
            holders=[
                HolderRecord(
                    kind=h.kind,
                    holder_id=h.holder_id,
                    subject=h.subject,
                    acquired_at=h.acquired_at,
                    last_heartbeat_at=h.last_heartbeat_at,
                )
                for h in s.holders
            ],
        )

    def _event(self, t: Transition) -> LeaseEventRecord:
        return LeaseEventRecord(
            lease_id=self.spec.lease_id,
            transition_seq=t.seq,
            from_liveness=t.from_liveness,
            to_liveness=t.to_liveness,
            epoch=t.epoch,
            reason=t.reason,
            at=t.at,
        )

    # ------------------------------------------------------------------ state changes

    def _touch(self) -> None:
        self.s.version += 1

    def _transition(self, to: Liveness, reason: str, *, bump: bool = False, viewed: bool = False) -> None:
        """Move to ``to`` along one of :data:`LIVENESS_EDGES` (``bump``: epoch+1), record and project it."""
        s = self.s
        if to not in LIVENESS_EDGES[s.liveness]:
            raise IllegalTransition(f"lease {self.spec.lease_id}: {s.liveness} -> {to} is not a lease transition")
        previous = s.epoch
        if bump:
            s.epoch += 1
        self._touch()
        t = Transition(
            seq=s.version,
            from_liveness=s.liveness,
            to_liveness=to,
            epoch=s.epoch,
            reason=reason,
            at=workflow.now(),
        )
        s.liveness = to
        s.transitions = [*s.transitions, t][-TRANSITIONS_KEPT:]
        self._pending_events.append(t)
        self._flush_upto = s.version  # a transition is written at once
        self._run_transitions += 1
        self._wake = True
        self._publish()
        # Viewers of the box just left hold tokens of a dead epoch: tell them to re-attach.
        if bump and viewed and workflow.patched(_STREAM_URL_ROTATED_PATCH):
            self._session_events.append(
                stream_url_rotated(self.spec.lease_id, s.epoch, previous, workflow.now(), reason=reason)
            )

    def _reset_to_cold(self, reason: str, *, viewed: bool) -> None:
        """Forget the box and everything about it, and go cold at epoch+1 (teardown done, or the box was lost)."""
        s = self.s
        s.envelope = None
        s.planes = []
        s.drain_deadline = None
        s.drain_requested = None
        s.rotation_requested = False
        s.rotation_due_at = None
        s.warm_since = None
        self._transition("cold", reason, bump=True, viewed=viewed)

    @contextlib.contextmanager
    def _in_flight(self, *, wake: bool = True) -> Iterator[None]:
        """Count an operation on the box while it runs: no teardown starts under it (see :meth:`_teardown_due`).

        ``wake``: wake the main loop when it ends, so a teardown it held back goes ahead (the main
        loop's own periodic capture needs no waking).
        """
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1
            if wake:
                self._wake = True

    def _publish(self) -> None:
        s = self.s
        published = (s.liveness, s.epoch)
        # Lean: upsert only what changed (once per run at its start, then on liveness or epoch moves).
        if not self._lean or self._published != published:
            workflow.upsert_search_attributes(
                [
                    sa.LEASE_LIVENESS.value_set(s.liveness),
                    sa.LEASE_EPOCH.value_set(s.epoch),
                    sa.SANDBOX_BACKEND.value_set(self.spec.backend),
                    sa.WORKSPACE_ID.value_set(self.spec.workspace_id),
                ]
            )
            self._published = published
        box = s.envelope.instance_id if s.envelope else "no box"
        workflow.set_current_details(f"**{s.liveness}** · epoch {s.epoch} · {len(s.holders)} holder(s) · {box}")

    def _viewed(self) -> bool:
        """Whether a viewer watches the current box (a plane is up for one, or a viewer holds the lease)."""
        return bool(self.s.planes) or any(h.kind == "viewer" for h in self.s.holders)

    def _find(self, kind: str, holder_id: str) -> Holder | None:
        for h in self.s.holders:
            if h.kind == kind and h.holder_id == holder_id:
                return h
        return None

    def _box_lost(self, epoch: int, instance_id: str, reason: str) -> bool:
        s = self.s
        if s.epoch != epoch or s.envelope is None or s.envelope.instance_id != instance_id or self._tearing_down:
            return False
        viewed = self._viewed()
        recordings = [h.holder_id for h in s.holders if h.kind == "recording"]
        s.holders = []
        self._reset_to_cold(reason, viewed=viewed)
        if recordings and workflow.patched(_RECORDING_BOX_LOST_PATCH):
            for recording_id in recordings:
                task = asyncio.create_task(self._tell_recording_box_lost(recording_id, epoch))
                self._notifying.add(task)
                task.add_done_callback(self._notifying.discard)
        return True

    async def _tell_recording_box_lost(self, recording_id: str, epoch: int) -> None:
        """Signal a recording that held the lost box; it stops and finalizes as ``box-death`` now."""
        handle = workflow.get_external_workflow_handle_for(RecordingWorkflow.run, recording_workflow_id(recording_id))
        try:
            # A signal to another workflow; the lease goes on meanwhile.
            await handle.signal(RecordingWorkflow.box_lost, BoxLostNotice(epoch=epoch))
        except FailureError as err:
            # Already finished (or never started under that id): nothing left to stop.
            workflow.logger.info("recording %s was not told about the lost box: %s", recording_id, err)

    def _grant(self, req: AcquireRequest, role: Role) -> LeaseGrant:
        s = self.s
        assert s.envelope is not None
        return LeaseGrant(
            lease_id=self.spec.lease_id,
            epoch=s.epoch,
            role=role,
            liveness=s.liveness,
            backend=self.spec.backend,
            backend_id=s.envelope.backend_id,
            instance_id=s.envelope.instance_id,
            envelope=s.envelope,
            holder_id=req.holder_id,
            kind=req.kind,
        )

    # ------------------------------------------------------------------ updates

    @workflow.update(description="Become a holder and wait until the box is warm (creating it if the lease is cold).")
    async def acquire(self, req: AcquireRequest) -> LeaseGrant:
        """Become a holder and wait until the box is warm (creating it if the lease is cold)."""
        self._run_updates += 1
        # Until the box is warm (or the acquire fails); other handlers run meanwhile.
        return await self._admit(req)

    @acquire.validator
    def _validate_acquire(self, req: AcquireRequest) -> None:
        _check_input_size("acquire", req)
        s = self.s
        _check_holder_id(req.holder_id)
        _check_epoch("expected_epoch", req.expected_epoch)
        self._check_timers()
        if s.stop_requested:
            raise failure(errors.LeaseStopping, "the lease is stopping; acquire again after it completes")
        if req.backend is not None and req.backend != self.spec.backend:
            raise failure(
                errors.InvalidRequest,
                f"lease {self.spec.lease_id} uses backend {self.spec.backend!r}, not {req.backend!r}; "
                "drain and stop it first to change backend",
            )
        if s.seeded and req.expected_epoch is not None and req.expected_epoch != s.epoch:
            raise failure(
                errors.StaleEpoch,
                f"expected epoch {req.expected_epoch} but the lease is at epoch {s.epoch}; "
                "the box you knew was replaced, acquire without an expected epoch",
            )

    async def _admit(self, req: AcquireRequest) -> LeaseGrant:
        """Add or refresh the holder, then wait for a warm box: attach, re-arm, or spawn one."""
        # A fresh run loads its epoch first (see ``_seed``).
        await workflow.wait_condition(lambda: self.s.seeded)
        s = self.s
        if s.stop_requested:
            raise failure(errors.LeaseStopping, "the lease is stopping; start a new acquire after it completes")
        now = workflow.now()
        holder = self._find(req.kind, req.holder_id)
        if holder is None:
            s.holders = [
                *s.holders,
                Holder(
                    kind=req.kind,
                    holder_id=req.holder_id,
                    subject=req.subject,
                    acquired_at=now,
                    last_heartbeat_at=now,
                ),
            ]
            self._touch()
        else:
            holder.last_heartbeat_at = now
        if s.liveness == "warm" and not self._tearing_down and not self._box_closing():
            return self._grant(req, "attached")
        if s.liveness == "draining" and not self._tearing_down and not self._box_closing():
            s.drain_deadline = None
            self._transition("warm", f"re-armed by {req.kind} {req.holder_id}")
            return self._grant(req, "rearmed")
        role: Role = "spawner" if s.liveness == "cold" and self._waiters == 0 else "attached"
        failures = self._failures
        self._waiters += 1
        self._wake = True
        try:
            # The main loop warms the box up; a drain, stop or failed warming also ends the wait.
            await workflow.wait_condition(
                lambda: (
                    (s.liveness == "warm" and not self._tearing_down and not self._box_closing())
                    or self._failures > failures
                    or s.stop_requested
                    or self._find(req.kind, req.holder_id) is None
                )
            )
        finally:
            self._waiters -= 1
        if s.liveness == "warm" and self._find(req.kind, req.holder_id) is not None:
            return self._grant(req, role)
        if self._find(req.kind, req.holder_id) is not None:
            s.holders = [h for h in s.holders if not (h.kind == req.kind and h.holder_id == req.holder_id)]
            self._touch()
        if s.stop_requested:
            raise failure(errors.LeaseStopping, "the lease was stopped while this acquire waited")
        if self._failures > failures:
            raise self._warming_refusal()
        raise failure(errors.LeaseNotWarm, "the holder was dropped (drain) while waiting; acquire again")

    def _check_timers(self) -> None:
        """Refuse new holders of a lease started with timers out of bounds (a negative holder TTL, ...)."""
        violations = self.timers.violations()
        if violations:
            problems = "; ".join(f"timers.{name} must be {rule}" for name, rule in violations)
            raise failure(
                errors.InvalidRequest,
                f"lease {self.spec.lease_id} was started with invalid timers ({problems}); "
                "stop it and acquire again with valid settings",
            )

    def _warming_refusal(self) -> ApplicationError:
        """What an acquirer that waited through a failed warming gets: its cause's type when that says
        what to fix or wait for (:data:`_WARMING_CAUSES_FORWARDED`), else ``ProvisionFailed``."""
        s = self.s
        what = f"could not bring up a {self.spec.backend} box: {s.last_error}; the lease is cold at epoch {s.epoch}"
        cause = self._warming_cause
        if cause is not None and cause.type in _WARMING_CAUSES_FORWARDED:
            then = "acquire again to retry" if not cause.non_retryable else "fix that, then acquire again"
            return ApplicationError(
                f"{what}, {then}", *cause.details, type=cause.type, non_retryable=cause.non_retryable
            )
        return failure(errors.ProvisionFailed, f"{what}, acquire again to retry")

    def _box_closing(self) -> bool:
        """A drain or rotation is pending: new holders wait for the next box instead of joining this one."""
        return bool(self.s.drain_requested) or self.s.rotation_requested

    def _drop_holder(self, kind: str, holder_id: str) -> None:
        s = self.s
        if self._find(kind, holder_id) is not None:
            s.holders = [h for h in s.holders if not (h.kind == kind and h.holder_id == holder_id)]
            self._touch()
            self._wake = True

    @workflow.update(description="Hold the lease as a viewer and bring up the plane's edge (desktop or terminal).")
    async def attach_viewer(self, req: AttachViewerRequest) -> ViewerAttachment:
        """Hold the lease as a viewer and bring up the plane's edge; the caller mints the token of ``req.mode``.

        The stream token is deliberately not minted here: a workflow's results live in its history,
        and a token must never be written where it outlives its purpose.
        """
        self._run_updates += 1
        # The viewer is a holder like any other: wait for the warm box first.
        grant = await self._admit(
            AcquireRequest(kind="viewer", holder_id=req.viewer_id, subject=req.subject, backend=None)
        )
        s = self.s
        assert s.envelope is not None
        try:
            with self._in_flight():
                # The plane comes up; other handlers go on, but no teardown starts.
                endpoint = await workflow.execute_activity(
                    ActivityName.ENSURE_PLANE,
                    PlaneRequest(
                        backend=self.spec.backend,
                        envelope=s.envelope,
                        lease_id=self.spec.lease_id,
                        epoch=grant.epoch,
                        plane=req.plane,
                        geometry=req.geometry,
                    ),
                    result_type=PlaneEndpoint,
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=2)),
                    summary=f"ensure {req.plane} plane",
                )
        except ActivityError as err:
            self._drop_holder("viewer", req.viewer_id)
            cause = err.cause
            if isinstance(cause, ApplicationError):
                raise forwarded(cause) from None
            raise failure(errors.ProviderError, f"{req.plane} plane failed: {_cause_message(err)}") from None
        if req.plane not in s.planes:
            s.planes = [*s.planes, req.plane]
            self._touch()
        return ViewerAttachment(grant=grant, endpoint=endpoint, mode=req.mode)

    @attach_viewer.validator
    def _validate_attach_viewer(self, req: AttachViewerRequest) -> None:
        _check_input_size("attach_viewer", req)
        _check_holder_id(req.viewer_id)
        self._check_timers()
        if self.s.stop_requested:
            raise failure(errors.LeaseStopping, "the lease is stopping; attach again after it completes")
        enabled = self.spec.desktop_enabled if req.plane == "desktop" else self.spec.terminal_enabled
        if not enabled:
            raise failure(
                errors.Unsupported,
                f"the {req.plane} plane is disabled for lease {self.spec.lease_id} by its policy",
            )

    @workflow.update(description="Refresh a holder's TTL.")
    def heartbeat(self, req: HeartbeatRequest) -> HeartbeatResult:
        """Refresh a holder's TTL."""
        self._run_updates += 1
        holder = self._find(req.kind, req.holder_id)
        assert holder is not None  # the validator guarantees it
        holder.last_heartbeat_at = workflow.now()
        return HeartbeatResult(
            alive=True,
            epoch=self.s.epoch,
            liveness=self.s.liveness,
            expires_at=holder.last_heartbeat_at + timedelta(seconds=self.timers.holder_ttl_seconds),
        )

    @workflow.query(description="Whether a heartbeat of this holder is accepted, and in which store to record it.")
    def heartbeat_check(self, req: HeartbeatRequest) -> HeartbeatCheck:
        """Whether a heartbeat of this holder is accepted (else the update's typed refusal), and where to record it.

        Clients heartbeat by this query plus one write to the store named by ``store_id`` (no
        history event); the lease reads the store at the holder's deadline (:meth:`_expire_holders`).
        """
        s = self.s
        refusal: ApplicationError | None = None
        try:
            self._validate_heartbeat(req)
        except ApplicationError as err:
            refusal = err
        holder = self._find(req.kind, req.holder_id)
        ttl = timedelta(seconds=self.timers.holder_ttl_seconds)
        return HeartbeatCheck(
            refusal=refusal.type if refusal is not None else None,
            message=refusal.message if refusal is not None else None,
            epoch=s.epoch,
            liveness=s.liveness,
            expires_at=holder.last_heartbeat_at + ttl if holder is not None else None,
            holder_ttl_seconds=self.timers.holder_ttl_seconds,
            store_id=s.store_id,
        )

    @heartbeat.validator
    def _validate_heartbeat(self, req: HeartbeatRequest) -> None:
        _check_input_size("heartbeat", req)
        _check_holder_id(req.holder_id)
        _check_epoch("epoch", req.epoch)
        if req.epoch != self.s.epoch:
            raise failure(errors.StaleEpoch, stale_heartbeat_message(req.epoch, self.s.epoch))
        if self._find(req.kind, req.holder_id) is None:
            raise failure(
                errors.HolderNotFound,
                f"no {req.kind} holder {req.holder_id!r} on {self.spec.lease_id} (expired or released); acquire again",
            )

    @workflow.update(description="Stop holding the lease; the last release starts the idle grace.")
    def release(self, ref: HolderRef) -> ReleaseResult:
        """Stop holding the lease; the last release starts the idle grace."""
        self._run_updates += 1
        s = self.s
        s.holders = [h for h in s.holders if not (h.kind == ref.kind and h.holder_id == ref.holder_id)]
        self._touch()
        if not s.holders:
            self._wake = True
        return ReleaseResult(released=True, liveness=s.liveness, remaining_holders=len(s.holders))

    @release.validator
    def _validate_release(self, ref: HolderRef) -> None:
        _check_input_size("release", ref)
        _check_holder_id(ref.holder_id)
        if self._find(ref.kind, ref.holder_id) is None:
            raise failure(
                errors.HolderNotFound,
                f"no {ref.kind} holder {ref.holder_id!r} on {self.spec.lease_id}; it already expired or was released",
            )

    @workflow.update(description="Drop every holder and tear the box down now (wait returns once cold).")
    async def drain(self, req: DrainRequest) -> LeaseView:
        """Drop every holder and tear the box down now (``wait`` returns once cold)."""
        self._run_updates += 1
        s = self.s
        if s.liveness != "cold" or self._waiters:
            s.drain_requested = req.reason or "operator"
            s.holders = []
            self._touch()
            self._wake = True
        if req.wait:
            # Until the main loop has torn the box down.
            await workflow.wait_condition(lambda: s.liveness == "cold" and not self._tearing_down)
        return self._view()

    @drain.validator
    def _validate_drain(self, req: DrainRequest) -> None:
        _check_input_size("drain", req)

    @workflow.update(description="Run a command in the warm box as an audited activity.")
    async def exec(self, req: ExecRequest) -> ExecOutcome:
        """Run a command in the warm box as an audited activity."""
        self._run_updates += 1
        s = self.s
        assert s.envelope is not None
        envelope, epoch = s.envelope, s.epoch
        t = self.timers
        timeout = req.timeout_seconds or t.exec_timeout_seconds
        try:
            with self._in_flight():
                # The command runs; other handlers (and the main loop) go on, but no teardown starts.
                out = await workflow.execute_activity(
                    ActivityName.EXEC_IN_BOX,
                    ExecInput(
                        backend=self.spec.backend,
                        envelope=envelope,
                        cmd=req.cmd,
                        workdir=req.workdir,
                        timeout_seconds=timeout,
                        env=req.env,
                        epoch=epoch,
                    ),
                    result_type=ExecOutput,
                    start_to_close_timeout=timedelta(seconds=timeout + 30),
                    # A dead worker is noticed within the heartbeat timeout instead of after the command's timeout.
                    heartbeat_timeout=timedelta(seconds=max(t.activity_heartbeat_seconds, 5)),
                    retry_policy=RetryPolicy(maximum_attempts=1),  # never run a command twice
                    # The UI names the program only: the rest of an argv can hold a secret.
                    summary=f"exec {req.cmd[0][:60]}" if req.cmd else "exec",
                )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type == errors.BoxNotFound.error_type:
                self._box_lost(epoch, envelope.instance_id, "box lost (exec saw NotFound)")
                raise failure(
                    errors.BoxNotFound,
                    f"the box of epoch {epoch} is gone; the lease is now cold at epoch {s.epoch}, acquire again",
                ) from None
            if isinstance(cause, ApplicationError):
                raise forwarded(cause) from None
            raise failure(errors.ProviderError, f"exec failed: {_cause_message(err)}") from None
        return ExecOutcome(epoch=epoch, **out.model_dump())

    @exec.validator
    def _validate_exec(self, req: ExecRequest) -> None:
        _check_input_size("exec", req)
        s = self.s
        if not req.cmd or not req.cmd[0]:
            raise failure(errors.InvalidRequest, "exec needs a command, e.g. ['echo', 'hi']")
        if req.timeout_seconds is not None and not 0 < req.timeout_seconds <= MAX_EXEC_TIMEOUT_SECONDS:
            raise failure(errors.InvalidRequest, f"timeout_seconds must be between 0 and {MAX_EXEC_TIMEOUT_SECONDS}")
        _check_epoch("epoch", req.epoch)
        if req.epoch is not None and req.epoch != s.epoch:
            raise failure(errors.StaleEpoch, f"exec for epoch {req.epoch} but the lease is at epoch {s.epoch}")
        if s.liveness != "warm" or s.envelope is None or self._tearing_down:
            raise failure(
                errors.LeaseNotWarm,
                f"lease {self.spec.lease_id} is {s.liveness}; acquire it first "
                f"(sandboxctl lease acquire {self.spec.workspace_id} {self.spec.group_id})",
            )

    @workflow.update(description="An observer saw NotFound: confirm with the provider, then go cold with epoch+1.")
    async def report_box_lost(self, report: BoxLostReport) -> BoxLostResult:
        """An observer saw NotFound: confirm with the provider, then go cold with epoch+1."""
        self._run_updates += 1
        s = self.s
        assert s.envelope is not None
        envelope = s.envelope
        with self._in_flight():
            # Ask the provider; the box may meanwhile be lost by another path (then this changes nothing).
            check = await workflow.execute_activity(
                ActivityName.CHECK_BOX,
                BoxRef(backend=self.spec.backend, envelope=envelope),
                result_type=CheckResult,
                start_to_close_timeout=timedelta(seconds=self.timers.probe_timeout_seconds + 10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary="confirm box lost",
            )
        lost = not check.alive and self._box_lost(report.epoch, report.instance_id, "box lost (reported)")
        return BoxLostResult(lost=lost, epoch=s.epoch, liveness=s.liveness)

    @report_box_lost.validator
    def _validate_box_lost(self, report: BoxLostReport) -> None:
        _check_input_size("report_box_lost", report)
        s = self.s
        _check_epoch("epoch", report.epoch)
        if report.epoch != s.epoch:
            raise failure(errors.StaleEpoch, f"report for epoch {report.epoch}; the lease is at epoch {s.epoch}")
        if s.envelope is None or s.liveness not in ("warm", "draining"):
            raise failure(errors.LeaseNotWarm, f"lease is {s.liveness}; there is no box to lose")
        if s.envelope.instance_id != report.instance_id:
            raise failure(
                errors.InvalidRequest,
                f"instance {report.instance_id!r} is not the lease's box ({s.envelope.instance_id!r})",
            )

    # ------------------------------------------------------------------ recording and computer use

    @workflow.update(description="Record the desktop: a recording workflow holds this lease until it stops.")
    async def start_recording(self, req: RecordingRequest) -> RecordingStarted:
        """Record the desktop: start a RecordingWorkflow child, which holds this lease as a ``recording`` holder."""
        self._run_updates += 1
        # The child starts; it holds the lease itself (through activities), like any holder.
        return await start_recording_child(self.spec.workspace_id, self.spec.group_id, req)

    @start_recording.validator
    def _validate_start_recording(self, req: RecordingRequest) -> None:
        _check_input_size("start_recording", req)
        s = self.s
        _check_epoch("expected_epoch", req.expected_epoch)
        if s.stop_requested:
            raise failure(errors.LeaseStopping, "the lease is stopping; record after it completes")
        if not self.spec.desktop_enabled:
            raise failure(
                errors.Unsupported, f"the desktop is disabled for lease {self.spec.lease_id}: nothing to record"
            )
        if req.expected_epoch is not None and s.seeded and req.expected_epoch != s.epoch:
            raise failure(
                errors.StaleEpoch, f"recording for epoch {req.expected_epoch}; the lease is at epoch {s.epoch}"
            )

    @workflow.update(description="A PNG of the warm box's desktop (brought up if it is not).")
    async def screenshot(self, req: ScreenshotRequest) -> Screenshot:
        """A PNG of the warm box's desktop (brought up if it is not)."""
        s = self.s
        assert s.envelope is not None
        arg = ScreenshotInput(
            backend=self.spec.backend, envelope=s.envelope, lease_id=self.spec.lease_id, epoch=s.epoch,
            geometry=req.geometry,
        )  # fmt: skip
        # An in-flight operation on the warm box (see ``_desktop_activity``).
        shot: Screenshot = await self._desktop_activity(
            ActivityName.COMPUTER_SCREENSHOT, arg, Screenshot, attempts=2, summary="screenshot", op="screenshot"
        )
        return shot

    @screenshot.validator
    def _validate_screenshot(self, req: ScreenshotRequest) -> None:
        _check_input_size("screenshot", req)
        self._check_computer_use(req.epoch)

    @workflow.update(description="Pointer and keyboard actions on the warm box's desktop, in order.")
    async def desktop_input(self, req: DesktopInputRequest) -> DesktopInputResult:
        """Pointer and keyboard actions on the warm box's desktop, in order; never retried (input is not idempotent)."""
        s = self.s
        assert s.envelope is not None
        arg = DesktopInputInput(
            backend=self.spec.backend, envelope=s.envelope, lease_id=self.spec.lease_id, epoch=s.epoch,
            actions=req.actions, geometry=req.geometry,
        )  # fmt: skip
        # An in-flight operation on the warm box (see ``_desktop_activity``).
        result: DesktopInputResult = await self._desktop_activity(
            ActivityName.COMPUTER_DESKTOP_INPUT,
            arg,
            DesktopInputResult,
            attempts=1,
            summary=f"desktop input ({len(req.actions)} actions)",
            op="desktop input",
        )
        return result

    @desktop_input.validator
    def _validate_desktop_input(self, req: DesktopInputRequest) -> None:
        _check_input_size("desktop_input", req)
        self._check_computer_use(req.epoch)

    async def _desktop_activity(
        self, activity: ActivityName, arg: Any, result_type: type[Any], *, attempts: int, summary: str, op: str
    ) -> Any:
        """Run one computer-use activity against the warm box as an in-flight operation (no teardown under it)."""
        self._run_updates += 1
        s = self.s
        assert s.envelope is not None
        envelope, epoch = s.envelope, s.epoch
        try:
            with self._in_flight():
                # The desktop acts; other handlers go on, but no teardown starts.
                result = await workflow.execute_activity(
                    activity,
                    arg,
                    result_type=result_type,
                    start_to_close_timeout=timedelta(seconds=120),
                    retry_policy=RetryPolicy(maximum_attempts=attempts),
                    summary=summary,
                )
        except ActivityError as err:
            raise self._box_op_failure(err, epoch, envelope, op) from None
        self._desktop_up()
        return result

    def _check_computer_use(self, epoch: int | None) -> None:
        s = self.s
        _check_epoch("epoch", epoch)
        if not self.spec.desktop_enabled:
            raise failure(errors.Unsupported, f"the desktop is disabled for lease {self.spec.lease_id} by its policy")
        if epoch is not None and epoch != s.epoch:
            raise failure(errors.StaleEpoch, f"computer use for epoch {epoch} but the lease is at epoch {s.epoch}")
        if s.liveness != "warm" or s.envelope is None or self._tearing_down:
            raise failure(
                errors.LeaseNotWarm,
                f"lease {self.spec.lease_id} is {s.liveness}; acquire it first "
                f"(sandboxctl lease acquire {self.spec.workspace_id} {self.spec.group_id})",
            )

    def _desktop_up(self) -> None:
        # Computer use brings the desktop up when it is not: tear it down with the other planes.
        if "desktop" not in self.s.planes:
            self.s.planes = [*self.s.planes, "desktop"]
            self._touch()

    def _box_op_failure(self, err: ActivityError, epoch: int, envelope: Envelope, what: str) -> ApplicationError:
        """The typed error for a failed box activity; a NotFound makes the lease lose the box (as ``exec`` does)."""
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == errors.BoxNotFound.error_type:
            self._box_lost(epoch, envelope.instance_id, f"box lost ({what} saw NotFound)")
            return failure(
                errors.BoxNotFound,
                f"the box of epoch {epoch} is gone; the lease is now cold at epoch {self.s.epoch}, acquire again",
            )
        if isinstance(cause, ApplicationError):
            return forwarded(cause)
        return failure(errors.ProviderError, f"{what} failed: {_cause_message(err)}")

    # ------------------------------------------------------------------ signals and query

    @workflow.signal(description="Operator hold: no automatic teardown until until (an explicit drain still proceeds).")
    def hold(self, req: HoldRequest) -> None:
        """Operator hold: no automatic teardown until ``until`` (an explicit drain still proceeds)."""
        self.s.hold_until = req.until
        self.s.hold_reason = req.reason
        self._touch()
        self._wake = True

    @workflow.signal(description="Lift the operator hold.")
    def unhold(self) -> None:
        """Lift the operator hold."""
        self.s.hold_until = None
        self.s.hold_reason = None
        self._touch()
        self._wake = True

    @workflow.signal(description="Drain the box and complete the workflow.")
    def stop(self) -> None:
        """Drain the box and complete the workflow."""
        self.s.stop_requested = True
        self.s.holders = []
        self._touch()
        self._wake = True

    @workflow.query(description="Everything about the lease, for operators and the CLI.")
    def describe(self) -> LeaseView:
        """Everything about the lease, for operators and the CLI."""
        return self._view()

    def _view(self) -> LeaseView:
        s = self.s
        ttl = timedelta(seconds=self.timers.holder_ttl_seconds)
        return LeaseView(
            lease_id=self.spec.lease_id,
            workspace_id=self.spec.workspace_id,
            group_id=self.spec.group_id,
            backend=self.spec.backend,
            os=self.spec.os,
            liveness=s.liveness,
            epoch=s.epoch,
            instance_id=s.envelope.instance_id if s.envelope else None,
            backend_id=s.envelope.backend_id if s.envelope else None,
            envelope=s.envelope,
            holders=[
                HolderView(
                    kind=h.kind,
                    holder_id=h.holder_id,
                    subject=h.subject,
                    acquired_at=h.acquired_at,
                    last_heartbeat_at=h.last_heartbeat_at,
                    expires_at=h.last_heartbeat_at + ttl,
                )
                for h in s.holders
            ],
            transitions=s.transitions,
            drain_deadline=s.drain_deadline,
            hold_until=s.hold_until,
            hold_reason=s.hold_reason,
            stop_requested=s.stop_requested,
            last_error=s.last_error,
            version=s.version,
            archive_current=s.archive_current,
            archive_previous=s.archive_previous,
            restore_status=s.restore_status,
            rotation_due_at=s.rotation_due_at,
            backend_profile=s.backend_profile,
            agent_id=self.spec.agent_id,
        )


def _projected_key(record: LeaseRecord) -> tuple[Any, ...]:
    """What a reader of the store sees of a lease, heartbeat times and write time aside."""
    return (
        record.liveness,
        record.epoch,
        record.instance_id,
        record.envelope,
        record.reason,
        tuple((h.kind, h.holder_id, h.subject, h.acquired_at) for h in record.holders),
    )


def _check_epoch(field: str, epoch: int | None) -> None:
    # Epochs count up from 0: a negative one was never issued, so it is malformed rather than stale.
    if epoch is not None and epoch < 0:
        raise failure(errors.InvalidRequest, f"{field} must be >= 0 (epochs count up from 0), not {epoch}")


def _check_input_size(what: str, arg: BaseModel) -> None:
    # Refused before anything is written: a too-big input would fail every workflow task (see MAX_UPDATE_INPUT_BYTES).
    problem = oversized_update_input(what, arg)
    if problem is not None:
        raise failure(errors.InvalidRequest, problem)


def _check_holder_id(holder_id: str) -> None:
    if not holder_id or not holder_id.strip():
        raise failure(errors.InvalidRequest, "holder_id must not be empty")
    if len(holder_id) > MAX_HOLDER_ID_LENGTH:
        raise failure(errors.InvalidRequest, f"holder_id is longer than {MAX_HOLDER_ID_LENGTH} characters")


def _cause_type(err: ActivityError) -> str | None:
    cause = err.cause
    return cause.type if isinstance(cause, ApplicationError) else None


def _cause_application_error(err: ActivityError) -> ApplicationError | None:
    """The innermost ``ApplicationError`` of an activity failure (behind a timeout: its last attempt's)."""
    cause: BaseException | None = err.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = getattr(cause, "cause", None)
    return cause


def _cause_message(err: ActivityError) -> str:
    """The innermost useful message of an activity failure (the provider's own words)."""
    cause: BaseException | None = err.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = getattr(cause, "cause", None)
    if cause is None:
        return str(err.cause or err)
    return cause.message or str(cause)
