"""The lease on the docker backend with a real engine (podman's Docker Engine API): a box lost for real.

The worker runs as in production with the docker provider built from ``SANDBOX_DOCKER_*`` settings
naming the session's engine (``tests/container_engine.py``). Acquire, exec, drain with a capture,
restore and the orphan sweep on this engine run in ``test_lease_on_cloud_fakes.py`` (its
``docker_engine`` parameter); here: the container is removed behind the lease's back, as an
operator's ``docker rm -f`` would, and the lease sees the box lost, goes cold and makes a new box;
the workspace volume such a container leaves behind is removed by the orphan sweep, while the
volume of a live box survives it. Skipped only when podman is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import docker  # type: ignore[import-untyped]
import pytest
from temporalio.client import Client

from providers.docker import DockerProvider
from sandbox import errors
from tests.conftest import docker_engine_worker, ids, running_runtime
from tests.container_engine import ContainerEngine
from workflows.models.maintenance import OrphanSweepInput
from workflows.orphan_sweep import OrphanSweepWorkflow

pytestmark = pytest.mark.container_engine


@pytest.fixture(scope="module")
async def engine_runtime(
    container_engine: ContainerEngine, temporal_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Any, DockerProvider]]:
    settings, provider = docker_engine_worker(container_engine, tmp_path_factory.mktemp("docker-engine-data"))
    async with running_runtime(temporal_client, settings, {"docker": provider}) as runtime:
        yield runtime, provider


def _remove_container(engine: ContainerEngine, container_id: str) -> str:
    """``docker rm -f`` of the box, as an operator would; returns its workspace volume (which stays)."""
    client = docker.DockerClient(base_url=engine.host)
    try:
        volume = str(client.api.inspect_container(container_id)["Config"]["Labels"]["sandbox.workspace_volume"])
        client.api.remove_container(container_id, force=True)
        return volume
    finally:
        client.close()


def _remove_volume(engine: ContainerEngine, volume: str) -> None:
    client = docker.DockerClient(base_url=engine.host)
    try:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_volume(volume)
    finally:
        client.close()


def _volumes(engine: ContainerEngine) -> set[str]:
    """The names of every volume on the engine (labelled or not)."""
    client = docker.DockerClient(base_url=engine.host)
    try:
        found = client.api.volumes()
        return {str(v["Name"]) for v in found.get("Volumes") or ()}
    finally:
        client.close()


async def test_a_removed_container_is_a_lost_box_and_the_next_acquire_gets_a_new_one(
    engine_runtime: tuple[Any, DockerProvider], container_engine: ContainerEngine, request: pytest.FixtureRequest
) -> None:
    runtime, provider = engine_runtime
    leases = runtime.leases()
    ws, g = ids("docker-lost")
    grant = await leases.acquire(ws, g, holder_id="t1", backend="docker")
    assert (await leases.exec(ws, g, ["sh", "-c", "echo here > f.txt"])).exit_code == 0
    not_lost = await leases.report_box_lost(ws, g, grant.epoch, grant.instance_id)
    assert not not_lost.lost and not_lost.liveness == "warm", "a live container is not reported lost"

    volume = await asyncio.to_thread(_remove_container, container_engine, grant.instance_id)
    # The orphan sweep removes a lost box's leftover volume (the next test); no sweep runs here: the test does.
    request.addfinalizer(lambda: _remove_volume(container_engine, volume))
    with pytest.raises(errors.BoxNotFound):
        await leases.exec(ws, g, ["true"])
    view = await leases.describe(ws, g)
    assert (view.liveness, view.epoch, view.holders) == ("cold", grant.epoch + 1, [])
    with pytest.raises(errors.StaleEpoch):
        await leases.heartbeat(ws, g, "t1", grant.epoch)

    again = await leases.acquire(ws, g, holder_id="t1", backend="docker")
    assert again.role == "spawner" and again.epoch == grant.epoch + 2
    assert again.instance_id != grant.instance_id
    owned = {box.instance_id for box in await provider.list_owned()}
    assert again.instance_id in owned and grant.instance_id not in owned
    out = await leases.exec(ws, g, ["sh", "-c", "test ! -e f.txt && id -u"])
    assert (out.exit_code, out.stdout) == (0, "1000\n"), "a fresh box, run by the unprivileged box user"
    await leases.drain(ws, g, wait=True)
    assert again.instance_id not in {box.instance_id for box in await provider.list_owned()}


async def test_the_orphan_sweep_removes_the_volume_a_removed_container_left_and_spares_a_live_boxs(
    engine_runtime: tuple[Any, DockerProvider], container_engine: ContainerEngine, request: pytest.FixtureRequest
) -> None:
    runtime, provider = engine_runtime
    leases = runtime.leases(idle_grace_seconds=60)
    (ws_live, g_live), (ws_lost, g_lost) = ids("docker-vol-live"), ids("docker-vol-lost")
    live = await leases.acquire(ws_live, g_live, holder_id="t1", backend="docker")
    try:
        assert (await leases.exec(ws_live, g_live, ["sh", "-c", "echo kept > kept.txt"])).exit_code == 0
        lost = await leases.acquire(ws_lost, g_lost, holder_id="t1", backend="docker")
        live_volume = live.envelope.state["workspaceVolume"]
        volume = await asyncio.to_thread(_remove_container, container_engine, lost.instance_id)
        request.addfinalizer(lambda: _remove_volume(container_engine, volume))
        with pytest.raises(errors.BoxNotFound):
            await leases.exec(ws_lost, g_lost, ["true"])  # the lease sees the box lost and goes cold
        assert {volume, live_volume} <= await asyncio.to_thread(_volumes, container_engine), "the volume leaked"

        handle = await runtime.client.start_workflow(
            OrphanSweepWorkflow.run,
            OrphanSweepInput(grace_seconds=0.0, recheck_delay_seconds=0.1, backends=["docker"]),
            id=f"orphan-sweep-docker-volumes-{uuid.uuid4().hex[:8]}",
            task_queue=runtime.settings.task_queue,
        )
        result = await handle.result()
        assert volume in result.terminated
        assert live.instance_id not in result.terminated and live_volume not in result.terminated
        left = await asyncio.to_thread(_volumes, container_engine)
        assert volume not in left, "the sweep removed the workspace volume the removed container left"
        assert live_volume in left, "a live box's volume survives the sweep"
        out = await leases.exec(ws_live, g_live, ["cat", "kept.txt"])
        assert (out.exit_code, out.stdout) == (0, "kept\n"), "the live box keeps its workspace"
    finally:
        await leases.drain(ws_live, g_live, wait=True)
    assert live_volume not in await asyncio.to_thread(_volumes, container_engine), "terminate removes it"
