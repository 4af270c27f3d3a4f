"""The docker provider in the conformance suite, on a real engine: podman's Docker Engine API.

The provider is built as production builds it, from ``SANDBOX_DOCKER_*`` settings naming the
engine's socket, the box image built by ``deploy/images/build`` and this session's owner label, and
it creates hardened boxes (unprivileged user, no capabilities, no new privileges, limits). There is
no fake to inject faults into (the fake engine's harness, ``harness_docker.py``, covers those).
Skipped only when podman is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import docker  # type: ignore[import-untyped]

from providers.docker import DockerProvider, DockerSettings
from tests import container_engine
from tests.unit.providers.harness import ProviderHarness

FAKE_SERVICE = False
"""A real engine: there is no fake service to inject faults into."""
NEEDS_CONTAINER_ENGINE = True
"""The suite's fixture starts the session's engine first (``container_engine`` in tests/conftest.py)."""

UNKNOWN_ID = "0123456789abcdef" * 4
"""A well-formed 64-hex container id no container has."""


@contextlib.asynccontextmanager
async def _engine(tmp_path: Path) -> AsyncIterator[container_engine.ContainerEngine]:
    # The session's engine when the tests run; a private one for a caller outside pytest (the bench).
    engine = container_engine.session_engine()
    if engine is not None:
        yield engine
        return
    await asyncio.to_thread(container_engine.build_images)
    with container_engine.running_engine(tmp_path / "engine") as private:
        yield private


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    async with _engine(tmp_path) as engine:
        provider = DockerProvider(DockerSettings(host=engine.host, image=engine.image, owner=engine.owner))
        provider.validate_credentials()
        client = await asyncio.to_thread(docker.DockerClient, base_url=engine.host)
        api = client.api
        hardening = provider._hardening()
        uid, gid = provider.settings.box_ids()

        def exec_true(container_id: str) -> object:
            # Exactly what DockerBoxSession.exec wraps: exec create, start (demuxed stream), inspect.
            exec_id = api.exec_create(container_id, ["true"], workdir="/workspace")["Id"]
            output = api.exec_start(exec_id, demux=True)
            return output, api.exec_inspect(exec_id)["ExitCode"]

        def create() -> str:
            # The provider's container options, without its lookup for an existing box.
            # Named as the provider names boxes, so that terminate also removes its workspace volume.
            name = f"sandbox-{secrets.token_hex(12)}"
            host_config = api.create_host_config(
                binds={f"{name}-workspace": {"bind": "/workspace", "mode": "rw"}},
                port_bindings={port: ("127.0.0.1", None) for port in (6080, 7681, 7682)},
                init=True,
                restart_policy={"Name": "unless-stopped"},
                **hardening,
            )
            container_id: str = api.create_container(
                engine.image,
                command=["sleep", "infinity"],
                name=name,
                user=f"{uid}:{gid}",
                labels={
                    "sandbox.owner": engine.owner,
                    "sandbox.key": name,
                    "sandbox.lease_id": "bench",
                    "sandbox.workspace_volume": f"{name}-workspace",
                },
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
                unknown_id=UNKNOWN_ID,
                sdk_exec=sdk_exec,
                sdk_create=sdk_create,
            )
        finally:
            await provider.aclose()
            await asyncio.to_thread(client.close)
