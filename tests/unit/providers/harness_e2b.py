"""Conformance harness: the E2B provider against the fake ``AsyncSandbox`` API (sandboxes on a FakeMachine)."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

from e2b import ServiceBusyException
from pydantic import SecretStr

from providers.e2b import WORKSPACE_ROOT, E2BProvider, E2BSettings
from tests.fakes.e2b_fake import FakeE2BCloud
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.unit.providers.harness import ProviderHarness


def transient_error() -> BaseException:
    """What the SDK raises when the API answers 503 (no capacity right now)."""
    return ServiceBusyException("503: Service temporarily unavailable, please retry.")


@contextlib.asynccontextmanager
async def harness(tmp_path: pathlib.Path) -> AsyncIterator[ProviderHarness]:
    """An E2BProvider whose SDK entry point is a fresh fake E2B cloud."""
    machine = FakeMachine(tmp_path / "e2b-machine", workspace_root=WORKSPACE_ROOT)
    cloud = FakeE2BCloud(machine, faults=FaultPlan())
    provider = E2BProvider(E2BSettings(api_key=SecretStr(cloud.api_key)), sdk=cloud.sdk)
    provider.validate_credentials()
    connected: dict[str, Any] = {}

    async def sdk_exec(instance_id: str) -> object:
        # What E2BBoxSession.exec wraps: commands.run on a connected sandbox (connected once, as a session is).
        sandbox = connected.get(instance_id)
        if sandbox is None:
            sandbox = connected[instance_id] = await cloud.sdk.connect(instance_id, **provider.api_params())
        return await sandbox.commands.run("true")

    try:
        yield ProviderHarness(
            provider=provider,
            faults=cloud.faults,
            transient_error=transient_error,
            workspace_root=WORKSPACE_ROOT,
            unknown_id="i0000000000000000000",
            sdk_exec=sdk_exec,
        )
    finally:
        await provider.aclose()
        await cloud.aclose()
        await machine.aclose()
