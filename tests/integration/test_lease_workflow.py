"""The lease workflow end to end: real Temporal dev server, real worker, local provider, SQLite store.

Set ``SANDBOX_RECORD_HISTORIES=1`` to (re)write the replay fixtures under ``tests/replay/histories``
from these runs (``bash scripts/record-histories``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from sandbox import errors
from store.leases import LeaseRepository
from tests.conftest import eventually, ids, remove_box_directory
from tests.temporal_history import payloads_in
from workflows.models.lease import LeaseView, lease_workflow_id

HISTORIES = Path(__file__).resolve().parents[1] / "replay" / "histories"


async def record_history(runtime: Any, ws: str, group: str, name: str) -> None:
    """Save the workflow history as a replay fixture when recording is switched on.

    A fixture that exists is kept: it proves that leases recorded by an older version still
    replay. A path taken since a ``workflow.patched`` change is recorded under a new name (delete a
    fixture to record it anew on purpose).
    """
    if os.environ.get("SANDBOX_RECORD_HISTORIES") != "1":
        return
    path = HISTORIES / f"lease_{name}.json"
    if path.exists():
        return
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, group))
    history = await handle.fetch_history()
    HISTORIES.mkdir(parents=True, exist_ok=True)
    path.write_text(history.to_json())


def box_dirs(runtime: Any) -> list[Path]:
    root = runtime.settings.boxes_dir()
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def box_dir_of(runtime: Any, instance_id: str) -> Path:
    return runtime.settings.boxes_dir() / instance_id


async def test_cold_acquire_attach_exec_idle_drain(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=0.5)
    ws, g = ids()
    grant = await leases.acquire(ws, g, kind="turn", holder_id="t1", backend="local")
    assert grant.role == "spawner"
    assert grant.liveness == "warm"
    assert grant.epoch == 1
    assert grant.backend_id == "unix_local"
    assert box_dir_of(runtime, grant.instance_id).is_dir()

    second = await leases.acquire(ws, g, kind="viewer", holder_id="v1")
    assert second.role == "attached"
    assert (second.epoch, second.instance_id) == (grant.epoch, grant.instance_id)

    out = await leases.exec(ws, g, ["sh", "-c", "echo hello > f.txt && cat f.txt && echo oops >&2; exit 3"])
    assert (out.exit_code, out.stdout, out.stderr, out.epoch) == (3, "hello\n", "oops\n", 1)

    view = await leases.describe(ws, g)
    assert {(h.kind, h.holder_id) for h in view.holders} == {("turn", "t1"), ("viewer", "v1")}
    assert view.instance_id == grant.instance_id

    await leases.release(ws, g, "t1", kind="turn")
    assert (await leases.describe(ws, g)).liveness == "warm"
    await leases.release(ws, g, "v1", kind="viewer")
    cold = await eventually(lambda: _liveness_is(leases, ws, g, "cold"))
    assert cold.epoch == 2  # warm commit +1, drain → cold +1
    assert not box_dir_of(runtime, grant.instance_id).exists()
    reasons = [(t.from_liveness, t.to_liveness) for t in cold.transitions]
    assert reasons == [("cold", "warming"), ("warming", "warm"), ("warm", "draining"), ("draining", "cold")]

    repo = LeaseRepository(runtime.db)
    record = await eventually(lambda: _projected(repo, ws, g, "cold"))
    assert record.epoch == 2 and record.instance_id is None and record.holders == []
    events = await repo.events(record.lease_id)
    assert [e.to_liveness for e in reversed(events)] == ["warming", "warm", "draining", "cold"]
    await record_history(runtime, ws, g, "cold_acquire_idle_drain")


async def _liveness_is(leases: Any, ws: str, g: str, liveness: str) -> Any:
    view = await leases.describe(ws, g)
    return view if view.liveness == liveness else None


async def _projected(repo: LeaseRepository, ws: str, g: str, liveness: str) -> Any:
    record = await repo.get(ws, g)
    return record if record is not None and record.liveness == liveness else None


async def test_rearm_during_idle_grace_keeps_the_same_box(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=30)
    ws, g = ids()
    first = await leases.acquire(ws, g, holder_id="t1")
    await leases.release(ws, g, "t1")
    await eventually(lambda: _liveness_is(leases, ws, g, "draining"))
    again = await leases.acquire(ws, g, holder_id="t2")
    assert again.role == "rearmed"
    assert (again.epoch, again.instance_id) == (first.epoch, first.instance_id)
    assert (await leases.describe(ws, g)).liveness == "warm"
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "rearm")


async def test_concurrent_cold_acquires_make_one_box(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    before = set(box_dirs(runtime))
    grants = await asyncio.gather(*(leases.acquire(ws, g, holder_id=f"t{i}") for i in range(5)))
    assert sorted(g_.role for g_ in grants).count("spawner") == 1
    assert len({g_.instance_id for g_ in grants}) == 1
    assert len(set(box_dirs(runtime)) - before) == 1
    await leases.drain(ws, g, wait=True)


async def test_bad_input_is_typed_and_changes_nothing(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    with pytest.raises(errors.UnknownBackend):
        await leases.acquire(ws, g, backend="nope")
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire("", g)
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire("x" * 200, g)
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire("bad/ws", g)
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire(ws, g, backend="none")
    with pytest.raises(errors.LeaseNotFound):
        await leases.describe(ws, g)

    grant = await leases.acquire(ws, g, holder_id="t1")
    before = await leases.describe(ws, g)
    with pytest.raises(errors.StaleEpoch):
        await leases.heartbeat(ws, g, "t1", grant.epoch - 1)
    with pytest.raises(errors.HolderNotFound):
        await leases.heartbeat(ws, g, "ghost", grant.epoch)
    with pytest.raises(errors.HolderNotFound):
        await leases.release(ws, g, "ghost")
    with pytest.raises(errors.StaleEpoch):
        await leases.acquire(ws, g, holder_id="t2", expected_epoch=grant.epoch + 5)
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire(ws, g, holder_id="t2", backend="docker")
    with pytest.raises(errors.InvalidRequest):
        await leases.exec(ws, g, [])
    with pytest.raises(errors.InvalidRequest):
        await leases.acquire(ws, g, holder_id="h" * 300)
    after = await leases.describe(ws, g)
    assert after.version == before.version
    assert after.holders == before.holders and after.epoch == before.epoch

    ok = await leases.heartbeat(ws, g, "t1", grant.epoch)
    assert ok.alive and ok.epoch == grant.epoch
    await leases.drain(ws, g, wait=True)
    with pytest.raises(errors.LeaseNotWarm):
        await leases.exec(ws, g, ["true"])


async def test_holder_ttl_expiry_drains_the_lease(runtime: Any) -> None:
    leases = runtime.leases(holder_ttl_seconds=1.0, idle_grace_seconds=0.2)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="silent")
    view = await eventually(lambda: _liveness_is(leases, ws, g, "cold"), timeout=20)
    assert view.epoch == grant.epoch + 1
    assert not box_dir_of(runtime, grant.instance_id).exists()
    with pytest.raises(errors.StaleEpoch):
        await leases.heartbeat(ws, g, "silent", grant.epoch)
    await record_history(runtime, ws, g, "holder_ttl_expiry")


async def test_box_lost_goes_cold_and_next_acquire_gets_a_new_box(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    not_lost = await leases.report_box_lost(ws, g, grant.epoch, grant.instance_id)
    assert not not_lost.lost and not_lost.liveness == "warm"

    remove_box_directory(box_dir_of(runtime, grant.instance_id))
    with pytest.raises(errors.BoxNotFound):
        await leases.exec(ws, g, ["true"])
    view = await leases.describe(ws, g)
    assert (view.liveness, view.epoch, view.holders) == ("cold", grant.epoch + 1, [])
    with pytest.raises(errors.StaleEpoch):
        await leases.heartbeat(ws, g, "t1", grant.epoch)

    again = await leases.acquire(ws, g, holder_id="t1")
    assert again.role == "spawner" and again.epoch == grant.epoch + 2
    assert again.instance_id != grant.instance_id
    assert box_dir_of(runtime, again.instance_id).is_dir()
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "box_lost")


async def test_failed_provision_leaves_cold_epoch_plus_one_and_no_box(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    before = set(box_dirs(runtime))
    # A PATH without `true` makes the readiness probe fail for real.
    with pytest.raises(errors.ProvisionFailed) as info:
        await leases.acquire(ws, g, holder_id="t1", environment={"PATH": "/nonexistent"})
    assert "cold at epoch 1" in info.value.message
    view = await leases.describe(ws, g)
    assert (view.liveness, view.epoch, view.holders) == ("cold", 1, [])
    assert view.last_error
    assert set(box_dirs(runtime)) == before
    await record_history(runtime, ws, g, "provision_failed")


async def test_an_unconfigured_backend_fails_the_acquire_and_the_lease_stays_cold(
    runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker builds the Modal provider from SANDBOX_MODAL_* at the first use: none is set.
    for name in [k for k in os.environ if k.startswith("SANDBOX_MODAL_")]:
        monkeypatch.delenv(name)
    leases = runtime.leases()
    ws, g = ids()
    for attempt in (1, 2):  # the second acquire proves the lease outlived the first failure
        with pytest.raises(errors.SandboxConfigError) as info:
            await leases.acquire(ws, g, holder_id="t1", backend="modal")
        assert type(info.value) is errors.SandboxConfigError and not info.value.retryable
        assert "SANDBOX_MODAL_APP_NAME" in info.value.message
        assert f"cold at epoch {attempt}" in info.value.message
        view = await leases.describe(ws, g)
        assert (view.liveness, view.epoch, view.holders) == ("cold", attempt, [])
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g))
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    repo = LeaseRepository(runtime.db)

    async def projected_cold_without_holders() -> Any:
        record = await repo.get(ws, g)
        return record is not None and (record.liveness, record.epoch, record.holders) == ("cold", 2, [])

    await eventually(projected_cold_without_holders)
    await record_history(runtime, ws, g, "unconfigured_backend_stays_cold")
    await leases.stop(ws, g)


async def test_search_attributes_follow_transitions(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    await leases.acquire(ws, g, holder_id="t1")
    query = f'WorkspaceId="{ws}" AND LeaseLiveness="warm" AND SandboxBackend="local" AND LeaseEpoch=1'

    async def found() -> bool:
        return len([w async for w in runtime.client.list_workflows(query)]) == 1

    await eventually(found)
    await leases.drain(ws, g, wait=True)
    cold_query = f'WorkspaceId="{ws}" AND LeaseLiveness="cold" AND LeaseEpoch=2'

    async def found_cold() -> bool:
        return len([w async for w in runtime.client.list_workflows(cold_query)]) == 1

    await eventually(found_cold)


async def test_continue_as_new_keeps_holders_and_epoch(runtime: Any) -> None:
    leases = runtime.leases(continue_as_new_after_updates=10)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.acquire(ws, g, kind="viewer", holder_id="v1")
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g))
    first_run = (await handle.describe()).run_id
    for i in range(8):  # updates drive continue-as-new (heartbeats are no updates: they go to the store)
        await leases.heartbeat(ws, g, "t1", grant.epoch)
        await leases.acquire(ws, g, kind="direct", holder_id=f"d{i}")
        await leases.release(ws, g, f"d{i}", kind="direct")

    async def new_run() -> bool:
        return (await handle.describe()).run_id != first_run

    await eventually(new_run)
    view = await leases.describe(ws, g)
    assert (view.liveness, view.epoch, view.instance_id) == ("warm", grant.epoch, grant.instance_id)
    assert {(h.kind, h.holder_id) for h in view.holders} == {("turn", "t1"), ("viewer", "v1")}
    ok = await leases.heartbeat(ws, g, "t1", grant.epoch)
    assert ok.alive
    if os.environ.get("SANDBOX_RECORD_HISTORIES") == "1":
        first = runtime.client.get_workflow_handle(lease_workflow_id(ws, g), run_id=first_run)
        HISTORIES.mkdir(parents=True, exist_ok=True)
        (HISTORIES / "lease_continue_as_new.json").write_text((await first.fetch_history()).to_json())
    await leases.drain(ws, g, wait=True)


async def test_stop_drains_and_completes(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=600)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.stop(ws, g)
    handle = runtime.client.get_workflow_handle(lease_workflow_id(ws, g), result_type=LeaseView)
    view = await handle.result()
    assert view.liveness == "cold" and view.epoch == grant.epoch + 1
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    assert not box_dir_of(runtime, grant.instance_id).exists()
    await record_history(runtime, ws, g, "stop_signal")  # the run the stop signal completed
    # A new run of the same lease continues the epoch instead of starting over.
    again = await leases.acquire(ws, g, holder_id="t2")
    assert again.epoch == view.epoch + 1
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "stop_and_restart")


async def test_hold_blocks_idle_teardown_until_lifted(runtime: Any) -> None:
    from datetime import UTC, datetime, timedelta

    leases = runtime.leases(idle_grace_seconds=0.1)
    ws, g = ids()
    await leases.acquire(ws, g, holder_id="t1")
    await leases.hold_teardown(ws, g, datetime.now(UTC) + timedelta(minutes=5), "investigating")
    await leases.release(ws, g, "t1")
    await eventually(lambda: _liveness_is(leases, ws, g, "draining"))
    await asyncio.sleep(0.5)  # well past the idle grace: the hold must keep the box
    assert (await leases.describe(ws, g)).liveness == "draining"
    await leases.unhold(ws, g)
    await eventually(lambda: _liveness_is(leases, ws, g, "cold"))
    await record_history(runtime, ws, g, "hold_unhold")


async def test_hold_context_manager_heartbeats_and_releases(runtime: Any) -> None:
    leases = runtime.leases(holder_ttl_seconds=1.5, idle_grace_seconds=30)
    ws, g = ids()
    async with leases.hold(ws, g, kind="direct", holder_id="d1", heartbeat_interval=0.3) as grant:
        await asyncio.sleep(2.5)  # longer than the TTL: only heartbeats keep the holder
        view = await leases.describe(ws, g)
        assert [(h.kind, h.holder_id) for h in view.holders] == [("direct", "d1")]
        assert view.liveness == "warm" and view.epoch == grant.epoch
    view = await leases.describe(ws, g)
    assert view.holders == [] and view.liveness == "draining"
    await leases.drain(ws, g, wait=True)


async def test_cancelling_a_call_in_flight_raises_cancelled_not_outcome_unknown(runtime: Any) -> None:
    # The SDK reports a cancelled update as an RPC timeout; a heartbeat loop catching SandboxError then
    # swallowed its own cancellation and ``hold`` never exited (seen once in CI as a 180 s hang).
    leases = runtime.leases(idle_grace_seconds=30)
    ws, g = ids()
    await leases.acquire(ws, g, holder_id="t1")
    task = asyncio.create_task(leases.exec(ws, g, ["sleep", "3"]))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await leases.exec(ws, g, ["sleep", "3"])
    assert time.monotonic() - started < 2.5
    out = await leases.exec(ws, g, ["echo", "still usable"])
    assert out.stdout == "still usable\n"
    await leases.drain(ws, g, wait=True)


async def test_projection_on_postgresql(pg_runtime: Any) -> None:
    leases = pg_runtime.leases(idle_grace_seconds=0.2)
    ws, g = ids()
    grant = await leases.acquire(ws, g, holder_id="t1")
    repo = LeaseRepository(pg_runtime.db)
    warm = await eventually(lambda: _projected(repo, ws, g, "warm"))
    assert pg_runtime.db.dialect == "postgresql"
    assert (warm.epoch, warm.instance_id) == (grant.epoch, grant.instance_id)
    assert [(h.kind, h.holder_id) for h in warm.holders] == [("turn", "t1")]
    await leases.release(ws, g, "t1")
    cold = await eventually(lambda: _projected(repo, ws, g, "cold"))
    assert cold.epoch == grant.epoch + 1 and cold.holders == []
    listed = await repo.list(liveness="cold", workspace_id=ws)
    assert [r.group_id for r in listed] == [g]


async def test_acquire_racing_a_drain_gets_a_fresh_box(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=30)
    ws, g = ids()
    old = await leases.acquire(ws, g, holder_id="t1")
    await leases.drain(ws, g)  # no wait: the acquire below races the teardown
    new = await leases.acquire(ws, g, holder_id="t2")
    assert new.instance_id != old.instance_id
    assert new.epoch == old.epoch + 2  # drain → cold (+1), new warm commit (+1)
    assert not box_dir_of(runtime, old.instance_id).exists()
    view = await leases.describe(ws, g)
    assert [(h.kind, h.holder_id) for h in view.holders] == [("turn", "t2")]
    await leases.drain(ws, g, wait=True)


async def test_box_sees_its_workspace_but_not_the_data_dir(runtime: Any) -> None:
    leases = runtime.leases()
    ws, g = ids()
    await leases.acquire(ws, g, holder_id="t1")
    data_dir = runtime.settings.data_dir.resolve()
    out = await leases.exec(ws, g, ["sh", "-c", f"ls {data_dir}/sandbox.db; echo rc=$?"])
    assert "rc=0" not in out.stdout, out
    out = await leases.exec(ws, g, ["sh", "-c", "pwd; echo x > /workspace/f && cat /workspace/f; touch /usr/nope"])
    assert out.stdout.splitlines()[:2] == ["/workspace", "x"]
    assert out.exit_code != 0  # the rest of the host is read-only
    await leases.drain(ws, g, wait=True)


async def test_exec_history_is_encrypted(runtime: Any) -> None:
    """An exec's command, environment and output are in the lease's history only as ciphertext.

    Fetched raw (no codec), every payload of the history is ours (``binary/encrypted`` with a key
    id) and the marker appears nowhere; decoded through the session's converter, it is there
    (positive control: the same history does carry it). Recorded as the encrypted replay fixture
    (``lease_exec_encrypted``) by ``bash scripts/record-histories``, which sets the fixture's keys.
    """
    from temporalio.client import Client

    from sandbox.payload_codec import ENCODING, KEY_ID_METADATA

    marker = f"marker-{uuid.uuid4().hex}"
    leases = runtime.leases()
    ws, g = ids()
    await leases.acquire(ws, g, kind="turn", holder_id="t1", backend="local")
    out = await leases.exec(ws, g, ["sh", "-c", f'echo "{marker}-cmd $SECRET"'], env={"SECRET": f"{marker}-env"})
    assert out.stdout == f"{marker}-cmd {marker}-env\n"
    await leases.release(ws, g, "t1", kind="turn")
    await eventually(lambda: _liveness_is(leases, ws, g, "cold"))

    raw_client = await Client.connect(runtime.client.service_client.config.target_host, namespace="default")
    raw = await raw_client.get_workflow_handle(lease_workflow_id(ws, g)).fetch_history()
    assert marker not in raw.to_json()
    payloads = [p for e in raw.events for p in payloads_in(e)]
    assert payloads, "the history carries payloads"
    plain_ones = [p for p in payloads if p.metadata.get("encoding") != ENCODING or KEY_ID_METADATA not in p.metadata]
    assert not plain_ones, [(dict(p.metadata), p.data[:80]) for p in plain_ones]

    codec = runtime.client.data_converter.payload_codec
    assert codec is not None
    plain = await codec.decode(payloads)
    assert any(marker.encode() in p.data for p in plain)
    # The Web UI's activity summary (decoded, as the codec server shows it) names the program only.
    summaries = [
        e.user_metadata.summary
        for e in raw.events
        if e.activity_task_scheduled_event_attributes.activity_type.name == "exec_in_box"
    ]
    assert len(summaries) == 1
    (shown,) = await codec.decode(summaries)
    assert shown.data == b'"exec sh"', shown.data
    await record_history(runtime, ws, g, "exec_encrypted")
