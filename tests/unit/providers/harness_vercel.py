"""Conformance harness: the Vercel provider (real ``vercel.sandbox`` SDK) against the fake Sandbox API."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

from pydantic import SecretStr
from vercel.sandbox import Sandbox

from providers.vercel import VercelProvider, VercelSettings
from tests.fakes.machine import FakeMachine
from tests.fakes.vercel_fake import FakeVercelApi, VercelApiFault
from tests.unit.providers.harness import ProviderHarness

TOKEN = "vercel-test-token"
PROJECT_ID = "prj_fake0123456789"
TEAM_ID = "team_fake0123456789"
WORKSPACE_ROOT = "/vercel/sandbox"


def transient_error() -> BaseException:
    """What the Sandbox API answers during a brief outage (HTTP 503)."""
    return VercelApiFault(503, "service_unavailable", "The service is temporarily unavailable")


def settings_for(api: FakeVercelApi, **overrides: object) -> VercelSettings:
    """Settings that point the provider at ``api``."""
    values: dict[str, object] = {
        "token": SecretStr(TOKEN),
        "project_id": PROJECT_ID,
        "team_id": TEAM_ID,
        "api_url": api.url,
    }
    values.update(overrides)
    return VercelSettings.model_validate(values)


@contextlib.asynccontextmanager
async def harness(tmp_path: pathlib.Path) -> AsyncIterator[ProviderHarness]:
    """A VercelProvider whose SDK talks to a fresh fake API whose sandboxes run on a FakeMachine."""
    machine = FakeMachine(tmp_path / "vercel-machine", workspace_root=WORKSPACE_ROOT)
    api = FakeVercelApi(machine, token=TOKEN, project_id=PROJECT_ID)
    provider = VercelProvider(settings_for(api), httpx_client_factory=api.httpx_client_factory)
    provider.validate_credentials()
    handles: dict[str, Sandbox] = {}

    async def sdk_exec(instance_id: str) -> object:
        # A session keeps its Sandbox handle; so does this loop after the first lookup.
        sandbox = handles.get(instance_id)
        if sandbox is None:
            sandbox = handles[instance_id] = await provider.client.get_sandbox(name=instance_id)
        return await sandbox.run_process("true", capture_output=True)

    async def sdk_create() -> str:
        sandbox = await provider.client.create_sandbox(
            name=f"bench-{uuid.uuid4().hex[:16]}",
            ports=list(provider.settings.exposed_ports),
            execution_time_limit=timedelta(seconds=provider.settings.timeout_seconds),
            persistent=True,
            tags={"sandbox.managed_by": "bench"},
        )
        return sandbox.name

    try:
        yield ProviderHarness(
            provider=provider,
            faults=api.faults,
            transient_error=transient_error,
            workspace_root=WORKSPACE_ROOT,
            unknown_id="sbx-" + "0" * 32,
            sdk_exec=sdk_exec,
            sdk_create=sdk_create,
        )
    finally:
        await provider.aclose()
        await api.aclose()
        await machine.aclose()
