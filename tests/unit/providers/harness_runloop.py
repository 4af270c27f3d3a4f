"""Runloop in the conformance suite: the real ``runloop_api_client`` SDK against the transport-level fake."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import SecretStr

from providers.runloop import RunloopProvider, RunloopSettings, make_client
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.fakes.runloop_fake import RunloopFake
from tests.unit.providers.harness import ProviderHarness


@contextlib.asynccontextmanager
async def fake_runloop(tmp_path: Path, **settings: object) -> AsyncIterator[tuple[RunloopProvider, RunloopFake]]:
    """A Runloop provider built as production builds it, its HTTP client wired to a fresh fake."""
    machine = FakeMachine(tmp_path / "runloop-machine")
    fake = RunloopFake(machine, faults=FaultPlan())
    config = RunloopSettings(api_key=SecretStr(fake.api_key), base_url=fake.base_url, **settings)  # type: ignore[arg-type]
    http = fake.http_client()
    provider = RunloopProvider(config, client=make_client(config, http_client=http))
    provider.validate_credentials()
    try:
        yield provider, fake
    finally:
        await provider.aclose()
        await http.aclose()
        await fake.aclose()
        await machine.aclose()


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    async with fake_runloop(tmp_path) as (provider, fake):

        async def sdk_exec(instance_id: str) -> object:
            # What RunloopBoxSession.exec wraps: execute_async, then wait_for_command until completed.
            client = provider.client
            execution = await client.devboxes.execute_async(instance_id, command="true")
            while execution.status != "completed":
                execution = await client.devboxes.wait_for_command(
                    execution.execution_id, devbox_id=instance_id, statuses=["completed"], timeout_seconds=30
                )
            return execution

        yield ProviderHarness(
            provider=provider,
            faults=fake.faults,
            transient_error=RunloopFake.service_unavailable,
            unknown_id="dbx_" + "0" * 21,
            sdk_exec=sdk_exec,
        )
