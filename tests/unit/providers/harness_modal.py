"""Conformance harness: the Modal provider against the fake ``modal`` SDK (sandboxes on a FakeMachine)."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

import modal.exception

from providers.modal import ModalProvider, ModalSettings
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.fakes.modal_fake import FakeModal, FakeSandbox
from tests.unit.providers.harness import ProviderHarness

APP_NAME = "sandbox-runtime-test"
WORKSPACE_ROOT = "/workspace"


def transient_error() -> BaseException:
    """What the SDK raises when the gRPC call fails with UNAVAILABLE (Modal's ``ServiceError``)."""
    return modal.exception.ServiceError("UNAVAILABLE: upstream connect error or disconnect/reset before headers")


@contextlib.asynccontextmanager
async def harness(tmp_path: pathlib.Path) -> AsyncIterator[ProviderHarness]:
    """A ModalProvider whose SDK entry point is a fresh fake ``modal`` package."""
    machine = FakeMachine(tmp_path / "modal-machine", workspace_root=WORKSPACE_ROOT)
    fake = FakeModal(machine, faults=FaultPlan())
    provider = ModalProvider(ModalSettings(app_name=APP_NAME), sdk=fake)
    provider.validate_credentials()
    handles: dict[str, FakeSandbox] = {}

    async def sdk_exec(instance_id: str) -> object:
        sandbox = handles.get(instance_id)
        if sandbox is None:
            sandbox = handles[instance_id] = await fake.Sandbox.from_id.aio(instance_id)
        process = await sandbox.exec.aio("true", workdir=WORKSPACE_ROOT, text=False)
        return await process.wait.aio()

    async def sdk_create() -> str:
        app = await fake.App.lookup.aio(APP_NAME, create_if_missing=True)
        sandbox = await fake.Sandbox.create.aio(
            "sleep",
            "infinity",
            app=app,
            timeout=provider.box_timeout_seconds,
            idle_timeout=provider.idle_timeout_seconds,
            workdir=WORKSPACE_ROOT,
            encrypted_ports=list(provider.exposed_ports),
        )
        return sandbox.object_id

    try:
        yield ProviderHarness(
            provider=provider,
            faults=fake.faults,
            transient_error=transient_error,
            workspace_root=WORKSPACE_ROOT,
            unknown_id="sb-0000000000000000000000",
            sdk_exec=sdk_exec,
            sdk_create=sdk_create,
        )
    finally:
        await provider.aclose()
        await fake.aclose()
        await machine.aclose()
