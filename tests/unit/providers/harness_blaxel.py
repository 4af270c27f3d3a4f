"""Blaxel in the conformance suite: the provider against the SDK-object-level fake (see blaxel_fake)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from providers.blaxel import BlaxelProvider, BlaxelSettings
from tests.fakes.blaxel_fake import BlaxelFake
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.unit.providers.harness import ProviderHarness


@contextlib.asynccontextmanager
async def fake_blaxel(tmp_path: Path, **settings: object) -> AsyncIterator[tuple[BlaxelProvider, BlaxelFake]]:
    """A Blaxel provider built as production builds it, its SDK entry point swapped for a fresh fake."""
    machine = FakeMachine(tmp_path / "blaxel-machine")
    fake = BlaxelFake(machine, faults=FaultPlan())
    config = BlaxelSettings(api_key=SecretStr("bl_fake_key"), workspace=fake.workspace, **settings)  # type: ignore[arg-type]
    provider = BlaxelProvider(config, api=fake.api)
    provider.validate_credentials()
    try:
        yield provider, fake
    finally:
        await fake.aclose()
        await machine.aclose()


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[ProviderHarness]:
    async with fake_blaxel(tmp_path) as (provider, fake):
        fetched: dict[str, object] = {}

        async def sdk_exec(instance_id: str) -> object:
            # What BlaxelBoxSession.exec wraps: process.exec (not waiting), then process.wait.
            sandbox: Any = fetched.get(instance_id)
            if sandbox is None:
                sandbox = fetched[instance_id] = await fake.api.get(instance_id)
            name = f"bench-{uuid.uuid4().hex[:12]}"
            await sandbox.process.exec({"command": "true", "name": name, "working_dir": "/"})
            return await sandbox.process.wait(name, max_wait=-1, interval=200)

        yield ProviderHarness(
            provider=provider,
            faults=fake.faults,
            transient_error=BlaxelFake.transient_error,
            unknown_id="sbx-" + "0" * 32,
            sdk_exec=sdk_exec,
        )
