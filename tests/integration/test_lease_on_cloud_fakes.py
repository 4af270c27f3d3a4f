"""The lease lifecycle on cloud providers wired to their fakes: acquire → exec → drain with snapshot → restore.

The worker runs exactly as in production except that its registry is handed the provider built by
the backend's conformance harness (``tests/unit/providers/harness_<backend>.py``), whose SDK talks to a
stateful fake of the service. Also: a transient provider error during warming is retried and
never taken for NotFound, and the orphan sweep terminates a tagged box no lease owns while leaving
a live lease's box alone.

The same lifecycle and sweep also run for ``docker`` on a real engine (``docker_engine``: podman's
Docker Engine API, ``tests/container_engine.py``); the injected-fault test needs a fake and runs on
the fakes only.
"""

from __future__ import annotations

import contextlib
import importlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client

from providers.modal import ModalProvider, ModalSettings
from sandbox.box import BoxSpec
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, REPO, eventually, running_runtime
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.fakes.modal_fake import FakeModal
from tests.unit.providers.harness import ProviderHarness
from workflows.models.maintenance import GcSettings, OrphanSweepInput, SnapshotGcInput
from workflows.orphan_sweep import OrphanSweepWorkflow
from workflows.snapshot_gc import SnapshotGcWorkflow

BACKENDS = ("modal", "docker")
"""Backends wired to a fake of their service."""
ENGINE = "docker_engine"
"""The docker backend on the real engine (its harness: ``harness_docker_engine.py``)."""
_BACKEND_OF = {ENGINE: "docker"}

WRITE = (
    "mkdir -p src/empty && printf 'print(1)\\n' > src/main.py && chmod 750 src/main.py"
    " && ln -s src/main.py link && printf notes > ~/.notes"
)
CHECK = "cat src/main.py && stat -c %a src/main.py && readlink link && test -d src/empty && cat ~/.notes"


class CloudRuntime:
    def __init__(self, backend: str, runtime: Any, harness: ProviderHarness) -> None:
        self.backend = backend
        self.runtime = runtime
        self.harness = harness

    def leases(self, **overrides: float) -> Any:
        return self.runtime.leases(**overrides)

    async def owned_ids(self) -> set[str]:
        return {box.instance_id for box in await self.harness.provider.list_owned()}


@pytest.fixture(scope="module", params=[*BACKENDS, pytest.param(ENGINE, marks=pytest.mark.container_engine)])
async def cloud(
    request: pytest.FixtureRequest, temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CloudRuntime]:
    harness_name: str = request.param
    backend = _BACKEND_OF.get(harness_name, harness_name)
    if harness_name == ENGINE:
        request.getfixturevalue("container_engine")
    module = importlib.import_module(f"tests.unit.providers.harness_{harness_name}")
    root = tmp_path_factory.mktemp(f"cloud-{harness_name}")
    async with contextlib.AsyncExitStack() as stack:
        harness: ProviderHarness = await stack.enter_async_context(module.harness(root / "fake"))
        settings = Settings(
            data_dir=root / "data",
            task_queue=f"test-{backend}-{uuid.uuid4()}",
            default_backend=backend,
            **FAST_TIMERS,
        )
        runtime = await stack.enter_async_context(
            running_runtime(temporal_client, settings, {backend: harness.provider})
        )
        yield CloudRuntime(backend, runtime, harness)


async def _cold(leases: Any, ws: str, g: str) -> Any:
    view = await leases.describe(ws, g)
    return view if view.liveness == "cold" else None


async def test_acquire_exec_drain_with_snapshot_then_restore(cloud: CloudRuntime) -> None:
    leases = cloud.leases(idle_grace_seconds=0.2)
    ws, g = f"cloud-{cloud.backend}-{uuid.uuid4().hex[:6]}", "g1"
    first = await leases.acquire(ws, g, holder_id="t1", backend=cloud.backend)
    assert first.instance_id in await cloud.owned_ids()
    out = await leases.exec(ws, g, ["sh", "-c", WRITE])
    assert out.exit_code == 0, out
    await leases.release(ws, g, "t1")
    cold = await eventually(lambda: _cold(leases, ws, g), timeout=60)
    assert cold.archive_current is not None and cold.archive_current.epoch == first.epoch
    assert first.instance_id not in await cloud.owned_ids(), "the drained box was terminated at the provider"

    second = await leases.acquire(ws, g, holder_id="t2", backend=cloud.backend)
    assert second.instance_id != first.instance_id
    out = await leases.exec(ws, g, ["sh", "-c", CHECK])
    assert out.stdout.split() == ["print(1)", "750", "src/main.py", "notes"], out
    view = await leases.describe(ws, g)
    assert view.restore_status == "restored"
    await leases.drain(ws, g, wait=True)
    assert second.instance_id not in await cloud.owned_ids()


@pytest.mark.parametrize("cloud", BACKENDS, indirect=True)
async def test_a_transient_error_while_warming_is_retried_never_not_found(cloud: CloudRuntime) -> None:
    harness = cloud.harness
    assert harness.faults is not None and harness.transient_error is not None
    leases = cloud.leases()
    ws, g = f"flaky-{cloud.backend}-{uuid.uuid4().hex[:6]}", "g1"
    before = harness.faults.calls.get("create", 0)
    harness.faults.fail("create", harness.transient_error, times=2)
    try:
        grant = await leases.acquire(ws, g, holder_id="t1", backend=cloud.backend)
    finally:
        harness.faults.clear()
    assert harness.faults.calls.get("create", 0) - before >= 3, "the failed creates were retried"
    assert grant.epoch == 1, "a transient failure is not a lost box: the epoch did not move"
    view = await leases.describe(ws, g)
    assert all("lost" not in t.reason for t in view.transitions)
    assert (await leases.exec(ws, g, ["true"])).exit_code == 0
    await leases.drain(ws, g, wait=True)


async def test_orphan_sweep_takes_an_unleased_tagged_box_and_spares_a_live_one(cloud: CloudRuntime) -> None:
    leases = cloud.leases(idle_grace_seconds=60)
    ws, g = f"sweep-{cloud.backend}-{uuid.uuid4().hex[:6]}", "g1"
    grant = await leases.acquire(ws, g, holder_id="t1", backend=cloud.backend)
    ghost_lease = f"lease/{ws}-ghost/g1"
    ghost = await cloud.harness.provider.create(
        BoxSpec(lease_id=ghost_lease, workspace_id=f"{ws}-ghost", group_id="g1", epoch=0), f"ghost-{uuid.uuid4()}"
    )
    try:
        handle = await cloud.runtime.client.start_workflow(
            OrphanSweepWorkflow.run,
            OrphanSweepInput(grace_seconds=0.0, recheck_delay_seconds=0.1, backends=[cloud.backend]),
            id=f"orphan-sweep-{cloud.backend}-{uuid.uuid4().hex[:8]}",
            task_queue=cloud.runtime.settings.task_queue,
        )
        result = await handle.result()
        assert ghost.instance_id in result.terminated
        assert grant.instance_id not in result.terminated
        owned = await cloud.owned_ids()
        assert ghost.instance_id not in owned and grant.instance_id in owned
        out = await leases.exec(ws, g, ["sh", "-c", "echo alive"])
        assert out.stdout == "alive\n" and out.epoch == grant.epoch
    finally:
        await leases.drain(ws, g, wait=True)


def test_the_suite_covers_the_backends_the_issue_names() -> None:
    for backend in BACKENDS:
        assert (REPO / "tests" / "unit" / "providers" / f"harness_{backend}.py").exists(), backend


@pytest.fixture(scope="module")
async def modal_native(
    temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Any, FakeModal]]:
    """A worker whose Modal provider persists workspaces as Modal directory snapshots."""
    root = tmp_path_factory.mktemp("modal-native")
    machine = FakeMachine(root / "machine")
    fake = FakeModal(machine, faults=FaultPlan())
    provider = ModalProvider(
        ModalSettings(app_name="native-test", workspace_persistence="snapshot_directory"), sdk=fake
    )
    settings = Settings(
        data_dir=root / "data",
        task_queue=f"test-modal-native-{uuid.uuid4()}",
        native_snapshot_ttl_seconds=3600,
        **FAST_TIMERS,
    )
    try:
        async with running_runtime(temporal_client, settings, {"modal": provider}) as runtime:
            yield runtime, fake
    finally:
        await fake.aclose()
        await machine.aclose()


async def test_native_modal_snapshots_persist_restore_and_are_collected(modal_native: tuple[Any, FakeModal]) -> None:
    runtime, fake = modal_native
    leases = runtime.leases(idle_grace_seconds=0.2)
    ws, g = f"native-{uuid.uuid4().hex[:6]}", "g1"
    images: list[str] = []
    for round_ in range(3):
        await leases.acquire(ws, g, holder_id=f"t{round_}", backend="modal")
        if round_:
            out = await leases.exec(ws, g, ["sh", "-c", "cat src/main.py && cat round.txt"])
            assert out.stdout.split() == ["print(1)", str(round_ - 1)], out
            assert (await leases.describe(ws, g)).restore_status == "restored"
        write = f"mkdir -p src && printf 'print(1)\\n' > src/main.py && printf {round_} > round.txt"
        assert (await leases.exec(ws, g, ["sh", "-c", write])).exit_code == 0
        await leases.release(ws, g, f"t{round_}")
        cold = await eventually(lambda: _cold(leases, ws, g), timeout=60)
        current = cold.archive_current
        assert current is not None and current.kind == "native" and current.key.startswith("im-")
        assert current.key in fake.image_ids(), "the snapshot is a real image at the provider"
        images.append(current.key)

    # Three captures: the first is superseded twice, so the GC deletes its image at the provider.
    handle = await runtime.client.start_workflow(
        SnapshotGcWorkflow.run,
        SnapshotGcInput(settings=GcSettings()),
        id=f"gc-native-{uuid.uuid4().hex[:8]}",
        task_queue=runtime.settings.task_queue,
    )
    result = await handle.result()
    assert result.deleted >= 1
    assert images[0] not in fake.image_ids()
    assert images[1] in fake.image_ids() and images[2] in fake.image_ids()
