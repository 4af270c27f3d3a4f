"""Daytona-specific behaviour: settings, the error table, idle stop, names, previews, snapshots, fake/SDK parity."""

from __future__ import annotations

import asyncio
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daytona import AsyncDaytona, AsyncSandbox
from daytona._async.filesystem import AsyncFileSystem
from daytona._async.process import AsyncProcess
from daytona._async.snapshot import AsyncSnapshotService
from daytona.common.errors import (
    SOURCE_DAEMON,
    DaytonaConnectionError,
    DaytonaError,
    DaytonaTimeoutError,
    create_daytona_error,
)
from pydantic import SecretStr

import providers.daytona as daytona_module
from providers.daytona import (
    _ERRORS,
    WORKSPACE_ROOT,
    DaytonaProvider,
    DaytonaSettings,
    build_provider,
    sandbox_name_for_key,
)
from sandbox.box import BoxSpec, Envelope
from sandbox.errors import (
    BoxNotFound,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
)
from sandbox.settings import Settings
from tests.fakes.daytona_fake import (
    FakeAsyncDaytona,
    FakeDaytonaCloud,
    FakeDaytonaSandbox,
    FakeFileSystem,
    FakeProcess,
    FakeSnapshotService,
)
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.unit.providers.sdk_parity import assert_fake_signature_matches


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    cloud: FakeDaytonaCloud
    provider: DaytonaProvider
    clock: Clock

    def provider_with(self, **settings: Any) -> DaytonaProvider:
        config = DaytonaSettings(api_key=SecretStr(self.cloud.api_key), **settings)
        return DaytonaProvider(config, client=self.cloud.client(config.config()))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    machine = FakeMachine(tmp_path / "m", workspace_root=WORKSPACE_ROOT)
    clock = Clock(time.time())
    cloud = FakeDaytonaCloud(machine, faults=FaultPlan(), clock=clock)
    settings = DaytonaSettings(api_key=SecretStr(cloud.api_key))
    provider = DaytonaProvider(settings, client=cloud.client(settings.config()))
    try:
        yield World(cloud, provider, clock)
    finally:
        await cloud.aclose()
        await machine.aclose()


def _spec(tag: str = "t", image: str | None = None) -> BoxSpec:
    group = f"{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/ws/{group}", workspace_id="ws", group_id=group, epoch=5, image=image)


# --- settings -------------------------------------------------------------------------------------


def test_missing_api_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_DAYTONA_API_KEY", raising=False)
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    with pytest.raises(SandboxConfigError, match=r"^\[sandbox:daytona\] SANDBOX_DAYTONA_API_KEY"):
        build_provider(Settings()).validate_credentials()


def test_settings_from_environment_keep_the_key_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_DAYTONA_API_KEY", raising=False)
    monkeypatch.setenv("DAYTONA_API_KEY", "dtn_from_sdk_env")
    monkeypatch.setenv("SANDBOX_DAYTONA_API_URL", "https://daytona.example/api")
    monkeypatch.setenv("SANDBOX_DAYTONA_TARGET", "eu")
    monkeypatch.setenv("SANDBOX_DAYTONA_AUTO_STOP_INTERVAL", "0")
    provider = build_provider(Settings())
    provider.validate_credentials()
    settings = provider.settings
    assert (settings.api_url, settings.target, settings.auto_stop_interval) == ("https://daytona.example/api", "eu", 0)
    assert "dtn_from_sdk_env" not in repr(settings)
    config = settings.config()
    assert (config.api_key, config.api_url, config.target) == ("dtn_from_sdk_env", "https://daytona.example/api", "eu")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"image": "ubuntu:24.04", "snapshot_name": "desk"}, "SANDBOX_DAYTONA_SNAPSHOT_NAME"),
        ({"auto_stop_interval": -1}, "SANDBOX_DAYTONA_AUTO_STOP_INTERVAL"),
        ({"timeout_seconds": 0}, "SANDBOX_DAYTONA_TIMEOUT_SECONDS"),
        ({"exposed_port_url_ttl_seconds": 0}, "SANDBOX_DAYTONA_EXPOSED_PORT_URL_TTL_SECONDS"),
        ({"api_url": "daytona.example"}, "SANDBOX_DAYTONA_API_URL"),
    ],
)
def test_contradictory_settings_are_refused_offline(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(SandboxConfigError, match=named):
        DaytonaSettings(api_key=SecretStr("k"), **settings).check()


def test_descriptor_and_backend_id() -> None:
    provider = DaytonaProvider(DaytonaSettings(api_key=SecretStr("k")))
    assert provider.backend_id == provider.descriptor.backend_id == "daytona"
    assert provider.descriptor.workspace_root == WORKSPACE_ROOT


# --- the error table ----------------------------------------------------------------------------


def _err(status: int | None, code: str | None = None, source: str | None = None) -> DaytonaError:
    return create_daytona_error(f"status {status}", status_code=status, code=code, source=source)


@pytest.mark.parametrize(
    ("error", "box_op", "expected"),
    [
        (_err(404), True, BoxNotFound),
        (_err(404), False, ProviderError),  # create: an unknown snapshot is no box gone
        (_err(401), True, ProviderAuthError),
        (_err(403), True, ProviderAuthError),
        (_err(429), True, ProviderQuotaError),
        (_err(500), True, ProviderUnavailable),
        (_err(502), True, ProviderUnavailable),
        (_err(503), True, ProviderUnavailable),
        (_err(504), True, ProviderUnavailable),
        (DaytonaConnectionError("connection reset"), True, ProviderUnavailable),
        (DaytonaTimeoutError("request timed out"), True, ProviderUnavailable),
        (_err(400), True, ProviderError),
        (_err(409), True, ProviderError),
        (_err(None), True, ProviderError),
        (ConnectionRefusedError("refused"), True, ProviderUnavailable),
        (RuntimeError("surprise"), True, ProviderError),
    ],
)
def test_error_table(error: BaseException, box_op: bool, expected: type[ProviderError]) -> None:
    translated = _ERRORS.translate(error, box_op=box_op)
    assert type(translated) is expected


async def test_wrong_api_key_is_an_auth_error(world: World) -> None:
    bad = DaytonaSettings(api_key=SecretStr("dtn_wrong"))
    provider = DaytonaProvider(bad, client=world.cloud.client(bad.config()))
    with pytest.raises(ProviderAuthError):
        await provider.create(_spec(), "k-auth")


async def test_quota_on_create_is_a_quota_error(world: World) -> None:
    world.cloud.faults.fail("create", lambda: _err(429, "QUOTA_EXCEEDED", "DAYTONA_API"))
    with pytest.raises(ProviderQuotaError):
        await world.provider.create(_spec(), "k-quota")


async def test_unknown_snapshot_is_not_box_not_found(world: World) -> None:
    with pytest.raises(ProviderError, match="not found") as caught:
        await world.provider.create(_spec(image="snapshot:no-such"), "k-snapshot")
    assert not isinstance(caught.value, BoxNotFound)


async def test_missing_files_are_path_not_found_never_box_not_found(world: World) -> None:
    box = await world.provider.create(_spec(), "k-files")
    with pytest.raises(PathNotFound):
        await box.read_file("nope.txt")
    with pytest.raises(PathNotFound):
        await box.list_dir("no/dir")
    assert not await box.path_exists("nope.txt")
    with pytest.raises(PathNotFound):
        await box.exec(["true"], workdir="no/dir")


# --- boxes --------------------------------------------------------------------------------------


async def test_create_records_name_labels_and_settings(world: World) -> None:
    provider = world.provider_with(auto_stop_interval=0)
    spec = _spec().model_copy(update={"environment": {"GREETING": "hi"}})
    box = await provider.create(spec, "key-1")
    record = world.cloud.sandboxes[box.instance_id]
    assert uuid.UUID(box.instance_id)
    assert record.name == sandbox_name_for_key("key-1")
    assert record.labels["sandbox.lease_id"] == spec.lease_id and record.labels["sandbox.key"] == "key-1"
    assert record.auto_stop_interval == 0, "0 is forwarded (no idle stop), not dropped"
    assert (await box.exec(["sh", "-c", "printf %s $GREETING"])).stdout == b"hi"
    world.clock.now += 86_400
    assert (await box.exec(["true"])).exit_code == 0


async def test_concurrent_creates_with_one_key_make_one_sandbox(world: World) -> None:
    spec = _spec()
    boxes = await asyncio.gather(*(world.provider.create(spec, "same-key") for _ in range(4)))
    assert len({b.instance_id for b in boxes}) == 1
    assert len(world.cloud.sandboxes) == 1


async def test_a_deleted_box_is_not_found_and_a_retried_create_makes_a_new_one(world: World) -> None:
    spec = _spec()
    first = await world.provider.create(spec, "k-retry")
    await world.provider.terminate(first.serialize_state())
    assert world.cloud.sandboxes[first.instance_id].state.value == "destroyed", "still readable as destroyed"
    with pytest.raises(BoxNotFound):
        await first.exec(["true"])
    second = await world.provider.create(spec, "k-retry")
    assert second.instance_id != first.instance_id


async def test_idle_stop_is_unavailable_then_resume_starts_it_with_its_files(world: World) -> None:
    box = await world.provider.create(_spec(), "k-idle")  # the service default: stop after 15 idle minutes
    await box.write_file("kept.txt", b"kept")
    world.clock.now += 16 * 60
    with pytest.raises(ProviderUnavailable, match="stopped") as caught:
        await box.read_file("kept.txt")
    assert not isinstance(caught.value, BoxNotFound)
    resumed = await world.provider.resume(box.serialize_state())
    assert resumed.instance_id == box.instance_id
    assert await resumed.read_file("kept.txt") == b"kept"


async def test_exec_stdin_quoting_and_separate_streams(world: World) -> None:
    box = await world.provider.create(_spec(), "k-exec")
    done = await box.exec(["sh", "-c", 'wc -c; printf %s "$X"; echo oops >&2'], stdin=b"\x00\xff", env={"X": "a b"})
    assert (done.exit_code, done.stdout, done.stderr) == (0, b"2\na b", b"oops\n")
    quoted = await box.exec(["printf", "%s|", "a b", "$HOME", "'q'"])
    assert quoted.stdout == b"a b|$HOME|'q'|"


async def test_exposed_port_is_a_signed_preview_url(world: World) -> None:
    box = await world.provider.create(_spec(), "k-port")
    endpoint = await box.resolve_exposed_port(6080)
    assert endpoint.host.startswith("6080-") and endpoint.host.endswith(".proxy.daytona.works")
    assert (endpoint.port, endpoint.tls) == (443, True)


async def test_list_owned_pages_through_every_box(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daytona_module, "_LIST_PAGE", 2)
    specs = [_spec(f"p{i}") for i in range(5)]
    boxes = [await world.provider.create(spec, f"k-page-{i}") for i, spec in enumerate(specs)]
    await world.cloud.client().create()  # not ours
    owned = {o.instance_id: o for o in await world.provider.list_owned()}
    assert set(owned) == {b.instance_id for b in boxes}
    assert [owned[b.instance_id].lease_id for b in boxes] == [s.lease_id for s in specs]
    assert owned[boxes[0].instance_id].labels["epoch"] == "5"


async def test_transient_error_on_list_during_create_is_unavailable(world: World) -> None:
    world.cloud.faults.fail("list_boxes", lambda: _err(503))
    with pytest.raises(ProviderUnavailable):
        await world.provider.create(_spec(), "k-list")
    assert world.cloud.sandboxes == {}


async def test_latency_is_injected_on_every_call(world: World) -> None:
    world.cloud.faults.latency = 0.2
    started = time.monotonic()
    await world.provider.create(_spec(), "k-latency")
    assert time.monotonic() - started >= 0.4  # one listing page, one create


# --- native snapshots ---------------------------------------------------------------------------


async def test_native_snapshot_restores_into_a_new_box_and_deletes_idempotently(world: World) -> None:
    box = await world.provider.create(_spec(), "k-snap")
    await box.write_file("notes/a.txt", b"snapshotted")
    name = await world.provider.native_snapshot(box.serialize_state())
    await box.write_file("notes/a.txt", b"changed later")
    restored = await world.provider.create(_spec(image=f"snapshot:{name}"), "k-snap-restore")
    assert await restored.read_file("notes/a.txt") == b"snapshotted"
    await world.provider.delete_snapshot(name)
    await world.provider.delete_snapshot(name)
    assert name not in world.cloud.snapshots
    with pytest.raises(BoxNotFound):
        await world.provider.native_snapshot(Envelope(backend_id="daytona", instance_id=str(uuid.UUID(int=0))))


# --- the fake cannot drift from the SDK ---------------------------------------------------------

_PARITY: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
    (FakeAsyncDaytona.create, AsyncDaytona.create),
    (FakeAsyncDaytona.get, AsyncDaytona.get),
    (FakeAsyncDaytona.list, AsyncDaytona.list),
    (FakeAsyncDaytona.close, AsyncDaytona.close),
    (FakeSnapshotService.delete, AsyncSnapshotService.delete),
    (FakeDaytonaSandbox.refresh_data, AsyncSandbox.refresh_data),
    (FakeDaytonaSandbox.start, AsyncSandbox.start),
    (FakeDaytonaSandbox.stop, AsyncSandbox.stop),
    (FakeDaytonaSandbox.delete, AsyncSandbox.delete),
    (FakeDaytonaSandbox.create_signed_preview_url, AsyncSandbox.create_signed_preview_url),
    (FakeDaytonaSandbox.create_snapshot, AsyncSandbox.create_snapshot),
    (FakeProcess.exec, AsyncProcess.exec),
    (FakeFileSystem.upload_file, AsyncFileSystem.upload_file),
    (FakeFileSystem.download_file, typing.get_overloads(AsyncFileSystem.download_file)[0]),
    (FakeFileSystem.list_files, AsyncFileSystem.list_files),
    (FakeFileSystem.get_file_info, AsyncFileSystem.get_file_info),
]


@pytest.mark.parametrize(("fake", "real"), _PARITY, ids=[fake.__qualname__ for fake, _ in _PARITY])
def test_fake_signatures_match_the_sdk(fake: Callable[..., Any], real: Callable[..., Any]) -> None:
    assert_fake_signature_matches(fake, real)


def test_fake_file_errors_are_the_daemons() -> None:
    missing = FakeFileSystem._missing("x")
    assert (missing.status_code, missing.code, missing.source) == (404, "FILE_NOT_FOUND", SOURCE_DAEMON)
    assert type(missing).__name__ == "DaytonaFileNotFoundError"
