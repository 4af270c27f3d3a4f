"""Conformance harness: the Cloudflare provider against the fake Sandbox Worker."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator

import httpx
from pydantic import SecretStr

from providers.cloudflare import CloudflareProvider, CloudflareSettings
from tests.fakes.cloudflare_fake import FakeCloudflareWorker, WorkerFault
from tests.fakes.machine import FakeMachine
from tests.unit.providers.harness import ProviderHarness

API_KEY = "cf-test-key"
WORKSPACE_ROOT = "/workspace"


def transient_error() -> BaseException:
    """What the Worker answers while the container platform is briefly unavailable."""
    return WorkerFault(503, "UNAVAILABLE", "container service temporarily unavailable")


@contextlib.asynccontextmanager
async def harness(tmp_path: pathlib.Path) -> AsyncIterator[ProviderHarness]:
    """A CloudflareProvider wired to a fresh fake Worker whose sandboxes run on a FakeMachine."""
    machine = FakeMachine(tmp_path / "cloudflare-machine", workspace_root=WORKSPACE_ROOT)
    worker = FakeCloudflareWorker(machine, api_key=API_KEY)
    settings = CloudflareSettings(worker_url=worker.url, api_key=SecretStr(API_KEY))
    provider = CloudflareProvider(settings, transport=worker.transport)
    provider.validate_credentials()
    # The "SDK" of this backend is plain HTTP to the Worker: the same client setup, no provider layer.
    raw = httpx.AsyncClient(
        base_url=worker.url, transport=worker.transport, headers={"authorization": f"Bearer {API_KEY}"}
    )

    async def sdk_exec(instance_id: str) -> object:
        response = await raw.post(f"/v1/sandboxes/{instance_id}/exec", json={"argv": ["true"], "cwd": WORKSPACE_ROOT})
        response.raise_for_status()
        return response.json()

    async def sdk_create() -> str:
        sandbox_id = f"bench-{uuid.uuid4().hex[:16]}"
        response = await raw.put(f"/v1/sandboxes/{sandbox_id}", json={"labels": {}, "envVars": {}})
        response.raise_for_status()
        return sandbox_id

    try:
        yield ProviderHarness(
            provider=provider,
            faults=worker.faults,
            transient_error=transient_error,
            workspace_root=WORKSPACE_ROOT,
            unknown_id="sbx-" + "0" * 32,
            sdk_exec=sdk_exec,
            sdk_create=sdk_create,
        )
    finally:
        await raw.aclose()
        await provider.aclose()
        await worker.aclose()
        await machine.aclose()
