"""Conformance harness: the Daytona provider against the fake ``AsyncDaytona`` (sandboxes on a FakeMachine)."""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from daytona.common.errors import DaytonaError, create_daytona_error
from pydantic import SecretStr

from providers.daytona import WORKSPACE_ROOT, DaytonaProvider, DaytonaSettings
from tests.fakes.daytona_fake import FakeDaytonaCloud
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.unit.providers.harness import ProviderHarness


def transient_error() -> DaytonaError:
    """What the SDK raises when the API answers 503 (the service is briefly refusing traffic)."""
    return create_daytona_error("Service Unavailable", status_code=503)


@contextlib.asynccontextmanager
async def harness(tmp_path: pathlib.Path) -> AsyncIterator[ProviderHarness]:
    """A DaytonaProvider whose client is a fresh fake Daytona service."""
    machine = FakeMachine(tmp_path / "daytona-machine", workspace_root=WORKSPACE_ROOT)
    cloud = FakeDaytonaCloud(machine, faults=FaultPlan())
    settings = DaytonaSettings(api_key=SecretStr(cloud.api_key))
    provider = DaytonaProvider(settings, client=cloud.client(settings.config()))
    provider.validate_credentials()
    direct = cloud.client(settings.config())
    fetched: dict[str, Any] = {}

    async def sdk_exec(instance_id: str) -> object:
        # What DaytonaBoxSession.exec wraps: process.exec on a fetched sandbox (fetched once, as a session is).
        sandbox = fetched.get(instance_id)
        if sandbox is None:
            sandbox = fetched[instance_id] = await direct.get(instance_id)
        return await sandbox.process.exec("true")

    try:
        yield ProviderHarness(
            provider=provider,
            faults=cloud.faults,
            transient_error=transient_error,
            workspace_root=WORKSPACE_ROOT,
            unknown_id=str(uuid.UUID(int=0)),
            sdk_exec=sdk_exec,
        )
    finally:
        await provider.aclose()
        await cloud.aclose()
        await machine.aclose()
