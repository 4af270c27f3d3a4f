"""The viewer session loop with fake lease calls: renewal, fencing, rotation, release."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

import pytest

from client.lease_client import LeaseClient, ViewerCell
from client.viewer import ViewerSession, cell_document
from sandbox.errors import HolderNotFound, LeaseNotWarm, ProviderUnavailable, StaleEpoch
from sandbox.settings import Settings

pytestmark = pytest.mark.timeout(30)


class FakeLease:
    """Answers attach/heartbeat/release like a lease whose epoch the test moves."""

    def __init__(self, *, ttl: float = 120.0) -> None:
        self.epoch = 1
        self.ttl = ttl
        self.attaches: list[tuple[float, ViewerCell]] = []
        self.beats: list[int] = []
        self.released = 0
        self.attach_errors: list[Exception] = []
        self.attach_delay = 0.0
        self.holder = False

    async def attach(self) -> ViewerCell:
        if self.attach_delay:
            await asyncio.sleep(self.attach_delay)
        if self.attach_errors:
            raise self.attach_errors.pop(0)
        self.holder = True
        cell = ViewerCell(
            lease_id="lease/ws/g",
            plane="terminal",
            viewer_id="v1",
            epoch=self.epoch,
            instance_id=f"box-{self.epoch}",
            url=f"ws://127.0.0.1:{7000 + self.epoch}/",
            token=f"ogs_token-{len(self.attaches)}",
            expires_at=datetime.now(UTC) + timedelta(seconds=self.ttl),
            transport="pty-ws",
        )
        self.attaches.append((time.monotonic(), cell))
        return cell

    async def heartbeat(self, cell: ViewerCell) -> datetime | None:
        self.beats.append(cell.epoch)
        if cell.epoch != self.epoch:
            raise StaleEpoch(f"heartbeat for epoch {cell.epoch} but the lease is at epoch {self.epoch}")
        if not self.holder:
            raise HolderNotFound("no viewer holder v1")
        return None

    async def release(self) -> object:
        self.released += 1
        if not self.holder:
            raise HolderNotFound("already gone")
        self.holder = False
        return None


def session_for(lease: FakeLease, lines: list[str] | None = None, **kwargs: float) -> ViewerSession:
    return ViewerSession(
        lease.attach,
        lease.heartbeat,
        lease.release,
        heartbeat_interval=kwargs.pop("heartbeat_interval", 60.0),
        report=(lines if lines is not None else []).append,
        **kwargs,
    )


async def run_until(session: ViewerSession, condition: object, timeout: float = 10.0) -> None:
    """Run the session until ``condition()`` holds, then stop it and wait for the release."""
    stop = asyncio.Event()
    task = asyncio.create_task(session.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, "condition not reached"
            assert not task.done(), task
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_the_token_is_renewed_before_it_expires_and_the_holder_released_on_stop() -> None:
    lease = FakeLease(ttl=1.2)
    session = session_for(lease)
    await session.start()
    await run_until(session, lambda: len(lease.attaches) >= 3)
    for (_, previous), (at, renewed) in zip(lease.attaches, lease.attaches[1:], strict=False):
        # Renewed a quarter of the lifetime early: the old token was still valid.
        assert renewed.token != previous.token
        assert datetime.now(UTC) - timedelta(seconds=time.monotonic() - at) < previous.expires_at
    assert session.cell.token == lease.attaches[-1][1].token
    assert session.snapshot()["token"] == session.cell.token
    assert lease.released == 1 and not lease.holder


async def test_a_heartbeat_fenced_by_a_new_epoch_reattaches_at_once() -> None:
    lease = FakeLease()
    lines: list[str] = []
    session = session_for(lease, lines, heartbeat_interval=0.1)
    await session.start()
    lease.epoch = 2  # the box was replaced; nobody told the viewer
    await run_until(session, lambda: session.cell.epoch == 2)
    assert lease.beats[-1] == 1 and len(lease.attaches) == 2
    assert any("heartbeat: StaleEpoch" in line and "epoch 1 -> 2" in line for line in lines)
    assert lease.released == 1


async def test_a_dropped_viewer_holder_attaches_again() -> None:
    lease = FakeLease()
    session = session_for(lease, heartbeat_interval=0.1)
    await session.start()
    lease.holder = False  # drained or expired at the same epoch
    await run_until(session, lambda: len(lease.attaches) == 2)
    assert lease.beats == [1] and lease.released == 1  # the new holder, released on stop


async def test_a_rotation_event_reattaches_without_waiting_for_a_heartbeat() -> None:
    lease = FakeLease()
    lines: list[str] = []
    session = session_for(lease, lines, heartbeat_interval=60.0)
    await session.start()
    session.notice_rotation(1)  # not newer than the cell: nothing to do
    lease.epoch = 3
    started = time.monotonic()
    session.notice_rotation(3)
    await run_until(session, lambda: session.cell.epoch == 3)
    assert time.monotonic() - started < 2 and not lease.beats
    assert len(lease.attaches) == 2
    assert any("stream.url.rotated" in line for line in lines)


async def test_an_old_rotation_event_is_ignored() -> None:
    lease = FakeLease()
    session = session_for(lease)
    await session.start()
    session.notice_rotation(0)
    session.notice_rotation(1)
    stop = asyncio.Event()
    task = asyncio.create_task(session.run(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert len(lease.attaches) == 1


async def test_a_failed_reattach_keeps_the_old_cell_and_retries() -> None:
    lease = FakeLease()
    lines: list[str] = []
    session = session_for(lease, lines)
    first = await session.start()
    lease.epoch = 2
    lease.attach_errors = [ProviderUnavailable("temporal is restarting")]
    session.notice_rotation(2)
    await run_until(session, lambda: any("failed" in line for line in lines))
    assert session.cell is first  # what the page shows until a re-attach works
    stop = asyncio.Event()
    task = asyncio.create_task(session.run(stop))
    deadline = time.monotonic() + 5
    while session.cell.epoch != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    stop.set()
    await task


async def test_stopping_during_a_slow_reattach_still_releases_promptly() -> None:
    lease = FakeLease()
    session = session_for(lease)
    await session.start()
    lease.attach_delay = 30.0  # a re-attach waiting for a new box
    lease.epoch = 2
    session.notice_rotation(2)
    stop = asyncio.Event()
    task = asyncio.create_task(session.run(stop))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1 and lease.released == 1


async def test_a_release_refused_because_the_holder_is_gone_is_not_an_error() -> None:
    lease = FakeLease()
    session = session_for(lease)
    await session.start()
    lease.holder = False
    stop = asyncio.Event()
    stop.set()
    await session.run(stop)
    assert lease.released == 1


async def test_the_first_attach_failing_is_the_callers_error() -> None:
    lease = FakeLease()
    lease.attach_errors = [LeaseNotWarm("cold")]
    with pytest.raises(LeaseNotWarm):
        await session_for(lease).start()


class FakeLeaseClient:
    """Records what ``ViewerSession.for_lease`` asks of the lease client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls: list[tuple[object, ...]] = []
        self.lease = FakeLease()

    async def attach_viewer(self, workspace_id: str, group_id: str, **kwargs: object) -> ViewerCell:
        self.calls.append(("attach", workspace_id, group_id, tuple(sorted(kwargs.items()))))
        return await self.lease.attach()

    async def heartbeat(self, workspace_id: str, group_id: str, holder_id: str, epoch: int, *, kind: str) -> object:
        self.calls.append(("heartbeat", workspace_id, group_id, holder_id, epoch, kind))
        return SimpleNamespace(expires_at=None)

    async def release(self, workspace_id: str, group_id: str, holder_id: str, *, kind: str) -> object:
        self.calls.append(("release", workspace_id, group_id, holder_id, kind))
        return None


async def test_for_lease_attaches_heartbeats_and_releases_one_viewer_of_the_lease() -> None:
    leases = FakeLeaseClient(Settings(holder_ttl_seconds=3.0))
    session = ViewerSession.for_lease(
        cast(LeaseClient, leases), "ws", "g", plane="terminal", viewer_id="v1", subject="alice", mode="control"
    )
    await session.start()
    await run_until(session, lambda: any(call[0] == "heartbeat" for call in leases.calls))
    attach, beat, release = leases.calls[0], next(c for c in leases.calls if c[0] == "heartbeat"), leases.calls[-1]
    assert attach == (
        "attach",
        "ws",
        "g",
        (
            ("geometry", "1280x800"),
            ("mode", "control"),
            ("plane", "terminal"),
            ("subject", "alice"),
            ("viewer_id", "v1"),
        ),
    )
    # The holder TTL of 3 s caps the viewer's 45 s heartbeat interval at a third of it.
    assert beat == ("heartbeat", "ws", "g", "v1", 1, "viewer")
    assert release == ("release", "ws", "g", "v1", "viewer")


async def test_a_session_without_a_viewer_id_makes_one_and_keeps_it() -> None:
    leases = FakeLeaseClient(Settings())
    session = ViewerSession.for_lease(cast(LeaseClient, leases), "ws", "g", plane="desktop")
    await session.start()
    await session.start()
    ids = {dict(call[3])["viewer_id"] for call in leases.calls}  # type: ignore[arg-type]
    assert len(ids) == 1 and str(uuid.UUID(str(ids.pop()))) != ""


def test_a_cell_document_carries_the_token_only_when_asked() -> None:
    cell = ViewerCell(
        lease_id="lease/ws/g",
        plane="desktop",
        viewer_id="v1",
        epoch=2,
        instance_id="box-2",
        url="ws://127.0.0.1:7002/",
        token="ogs_secret",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        transport="novnc-ws",
    )
    assert cell_document(cell, with_token=True)["token"] == "ogs_secret"
    public = cell_document(cell, with_token=False)
    assert "token" not in public and public["url"] == "ws://127.0.0.1:7002/" and public["epoch"] == 2
    assert "ogs_secret" not in repr(cell)


def test_the_cell_of_a_session_that_never_attached_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = session_for(FakeLease()).cell
