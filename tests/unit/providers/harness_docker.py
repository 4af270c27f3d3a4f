"""The docker provider in the conformance suite, against the fake Docker engine (real SDK, real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import docker  # type: ignore[import-untyped]

from providers.docker import DEFAULT_IMAGE, DockerProvider, DockerSettings
from tests.fakes.docker_fake import EngineFault, FakeDockerEngine
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.unit.providers.harness import ProviderHarness

UNKNOWN_ID = "0123456789abcdef" * 4
"""A well-formed 64-hex container id no fake container has."""


def transient_error() -> EngineFault:
    """What an engine says when containerd is briefly away: a 500 the provider must call transient."""
    return EngineFault(
        500,
        'connection error: desc = "transport: Error while dialing: dial unix '
        '/run/containerd/containerd.sock: connect: connection refused": unavailable',
    )


@contextlib.asynccontextmanager
async def fake_engine(tmp_path: Path, *, faults: FaultPlan | None = None) -> AsyncIterator[FakeDockerEngine]:
    """A started fake engine with the desktop image present, torn down afterwards."""
    machine = FakeMachine(tmp_path / "machine")
    engine = FakeDockerEngine(machine, faults=faults or FaultPlan(), images=[DEFAULT_IMAGE], networks=["sandbox-net"])
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()
        await machine.aclose()


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    async with fake_engine(tmp_path) as engine:
        # Built as production builds it: the engine URL is the only thing that differs.
        provider = DockerProvider(DockerSettings(host=engine.base_url))
        provider.validate_credentials()
        client = await asyncio.to_thread(docker.DockerClient, base_url=engine.base_url)
        api = client.api

        def exec_true(container_id: str) -> object:
            # Exactly what DockerBoxSession.exec wraps: exec create, start (demuxed stream), inspect.
            exec_id = api.exec_create(container_id, ["true"], workdir="/workspace")["Id"]
            output = api.exec_start(exec_id, demux=True)
            return output, api.exec_inspect(exec_id)["ExitCode"]

        def create() -> str:
            # The provider's container options, without its lookup for an existing box.
            name = f"sandbox-bench-{secrets.token_hex(6)}"
            host_config = api.create_host_config(
                binds={f"{name}-workspace": {"bind": "/workspace", "mode": "rw"}},
                port_bindings={port: ("127.0.0.1", None) for port in (6080, 7681, 7682)},
                init=True,
                restart_policy={"Name": "unless-stopped"},
            )
            container_id: str = api.create_container(
                DEFAULT_IMAGE,
                command=["sleep", "infinity"],
                name=name,
                labels={"sandbox.owner": provider.settings.owner, "sandbox.key": name, "sandbox.lease_id": "bench"},
                working_dir="/workspace",
                ports=[6080, 7681, 7682],
                volumes=["/workspace"],
                host_config=host_config,
            )["Id"]
            api.start(container_id)
            return container_id

        async def sdk_exec(container_id: str) -> object:
            return await asyncio.to_thread(exec_true, container_id)

        async def sdk_create() -> str:
            return await asyncio.to_thread(create)

        try:
            yield ProviderHarness(
                provider=provider,
                faults=engine.faults,
                transient_error=transient_error,
                unknown_id=UNKNOWN_ID,
                sdk_exec=sdk_exec,
                sdk_create=sdk_create,
            )
        finally:
            await provider.aclose()
            await asyncio.to_thread(client.close)
