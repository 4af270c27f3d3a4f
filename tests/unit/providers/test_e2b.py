"""E2B-specific behaviour: settings, the error table, sandbox timeouts, native snapshots, fake/SDK parity."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
    TimeoutException,
)
from e2b.api import api_exception_from_code
from e2b.sandbox_async.commands.command import Commands
from e2b.sandbox_async.filesystem.filesystem import Filesystem
from e2b.sandbox_async.paginator import AsyncSandboxPaginator
from pydantic import SecretStr

import providers.e2b as e2b_module
from providers.e2b import (
    _ERRORS,
    WORKSPACE_ROOT,
    E2BProvider,
    E2BSettings,
    build_provider,
    decode_snapshot_ref,
    encode_snapshot_ref,
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
from tests.fakes.e2b_fake import (
    FakeCommands,
    FakeE2BCloud,
    FakeE2BSandbox,
    FakeE2BSdk,
    FakeFilesystem,
    FakeSandboxPaginator,
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
    cloud: FakeE2BCloud
    provider: E2BProvider
    clock: Clock


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    machine = FakeMachine(tmp_path / "m", workspace_root=WORKSPACE_ROOT)
    clock = Clock(time.time())
    cloud = FakeE2BCloud(machine, faults=FaultPlan(), clock=clock)
    provider = E2BProvider(E2BSettings(api_key=SecretStr(cloud.api_key), timeout_seconds=600), sdk=cloud.sdk)
    try:
        yield World(cloud, provider, clock)
    finally:
        await cloud.aclose()
        await machine.aclose()


def _spec(tag: str = "t", image: str | None = None) -> BoxSpec:
    group = f"{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/ws/{group}", workspace_id="ws", group_id=group, epoch=3, image=image)


def _provider_with(world: World, **settings: Any) -> E2BProvider:
    return E2BProvider(E2BSettings(api_key=SecretStr(world.cloud.api_key), **settings), sdk=world.cloud.sdk)


# --- settings -------------------------------------------------------------------------------------


def test_missing_api_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_E2B_API_KEY", raising=False)
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(SandboxConfigError, match=r"^\[sandbox:e2b\] SANDBOX_E2B_API_KEY"):
        build_provider(Settings()).validate_credentials()
    with pytest.raises(SandboxConfigError, match="SANDBOX_E2B_API_KEY"):
        E2BSettings(api_key=SecretStr("  ")).check()


def test_settings_from_environment_keep_the_key_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_E2B_API_KEY", raising=False)
    monkeypatch.setenv("E2B_API_KEY", "e2b_from_sdk_env")
    monkeypatch.setenv("SANDBOX_E2B_TEMPLATE", "desktop-v2")
    monkeypatch.setenv("SANDBOX_E2B_TIMEOUT_ACTION", "pause")
    monkeypatch.setenv("SANDBOX_E2B_AUTO_RESUME", "true")
    provider = build_provider(Settings())
    provider.validate_credentials()
    assert provider.settings.template == "desktop-v2"
    assert provider.settings.api_key is not None and provider.settings.api_key.get_secret_value() == "e2b_from_sdk_env"
    assert "e2b_from_sdk_env" not in repr(provider.settings)
    monkeypatch.setenv("SANDBOX_E2B_API_KEY", "e2b_ours_wins")
    assert E2BSettings().api_key == SecretStr("e2b_ours_wins")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"timeout_seconds": 0}, "SANDBOX_E2B_TIMEOUT_SECONDS"),
        ({"timeout_seconds": 90_000}, "SANDBOX_E2B_TIMEOUT_SECONDS"),
        ({"auto_resume": True, "timeout_action": "kill"}, "SANDBOX_E2B_AUTO_RESUME"),
        ({"template": " "}, "SANDBOX_E2B_TEMPLATE"),
    ],
)
def test_contradictory_settings_are_refused_offline(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(SandboxConfigError, match=named):
        E2BSettings(api_key=SecretStr("k"), **settings).check()


def test_descriptor_and_backend_id() -> None:
    provider = E2BProvider(E2BSettings(api_key=SecretStr("k")))
    assert provider.backend_id == provider.descriptor.backend_id == "e2b"
    assert provider.descriptor.workspace_root == WORKSPACE_ROOT
    assert cast(object, provider.sdk) is AsyncSandbox  # production talks to the real SDK


# --- the error table ----------------------------------------------------------------------------


def _status(code: int) -> SandboxException:
    err = SandboxException(f"{code}: boom")
    err.status_code = code
    return err


@pytest.mark.parametrize(
    ("error", "box_op", "expected"),
    [
        (SandboxNotFoundException("Sandbox x not found"), True, BoxNotFound),
        (_status(404), True, BoxNotFound),
        (_status(404), False, ProviderError),  # create: an unknown template is no box gone
        (SandboxNotFoundException("Paused sandbox x not found"), False, ProviderError),
        (FileNotFoundException("path missing"), True, PathNotFound),
        (NotFoundException("envd NOT_FOUND"), True, ProviderError),
        (AuthenticationException("401: Unauthorized"), True, ProviderAuthError),
        (_status(403), True, ProviderAuthError),
        (api_exception_from_code(429, "slow down"), True, ProviderQuotaError),
        (ServiceBusyException("503: busy"), True, ProviderUnavailable),
        (_status(502), True, ProviderUnavailable),
        (SandboxUnreachableException("port is not open"), True, ProviderUnavailable),
        (SandboxNotRunningException("was not found"), True, ProviderUnavailable),
        (TimeoutException("deadline"), True, ProviderUnavailable),
        (httpx.ConnectError("refused"), True, ProviderUnavailable),
        (ConnectionResetError("reset"), True, ProviderUnavailable),
        (InvalidArgumentException("bad"), True, ProviderError),
        (RuntimeError("surprise"), True, ProviderError),
    ],
)
def test_error_table(error: BaseException, box_op: bool, expected: type[ProviderError]) -> None:
    translated = _ERRORS.translate(error, box_op=box_op)
    assert type(translated) is expected
    if expected is not BoxNotFound:
        assert not isinstance(translated, BoxNotFound)


async def test_wrong_api_key_is_an_auth_error(world: World) -> None:
    bad = E2BProvider(E2BSettings(api_key=SecretStr("e2b_wrong")), sdk=world.cloud.sdk)
    with pytest.raises(ProviderAuthError, match="Unauthorized"):
        await bad.create(_spec(), "k-auth")


async def test_rate_limit_on_create_is_a_quota_error(world: World) -> None:
    world.cloud.faults.fail("create", lambda: api_exception_from_code(429, "too many sandboxes"))
    with pytest.raises(ProviderQuotaError):
        await world.provider.create(_spec(), "k-quota")
    assert world.cloud.sandboxes == {}


async def test_unknown_template_is_not_box_not_found(world: World) -> None:
    with pytest.raises(ProviderError, match="not found") as caught:
        await world.provider.create(_spec(image="no-such-template"), "k-template")
    assert not isinstance(caught.value, BoxNotFound)


# --- boxes --------------------------------------------------------------------------------------


async def test_create_records_lease_and_key_and_settings(world: World) -> None:
    provider = _provider_with(world, timeout_action="pause", auto_resume=True, allow_internet_access=False)
    spec = _spec().model_copy(update={"environment": {"GREETING": "hi"}})
    box = await provider.create(spec, "key-1")
    info = await world.cloud.sdk.get_info(box.instance_id, api_key=world.cloud.api_key)
    assert info.metadata["sandbox.lease_id"] == spec.lease_id
    assert info.metadata["sandbox.key"] == "key-1"
    assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
    assert info.allow_internet_access is False
    assert len(box.instance_id) == 20 and box.instance_id.isalnum()
    assert (await box.exec(["sh", "-c", "printf %s $GREETING"])).stdout == b"hi"


async def test_concurrent_creates_with_one_key_make_one_sandbox(world: World) -> None:
    spec = _spec()
    boxes = await asyncio.gather(*(world.provider.create(spec, "same-key") for _ in range(4)))
    assert len({b.instance_id for b in boxes}) == 1
    assert len(world.cloud.sandboxes) == 1


async def test_a_killed_box_is_not_adopted_by_a_retried_create(world: World) -> None:
    spec = _spec()
    first = await world.provider.create(spec, "k-retry")
    await world.provider.terminate(first.serialize_state())
    second = await world.provider.create(spec, "k-retry")
    assert second.instance_id != first.instance_id
    assert (await second.exec(["true"])).exit_code == 0


async def test_exec_stdin_workdir_and_env(world: World) -> None:
    box = await world.provider.create(_spec(), "k-exec")
    done = await box.exec(["sh", "-c", 'wc -c; printf %s "$X"'], stdin=b"\x00\x01binary\xff", env={"X": "y z"})
    assert done.stdout == b"9\ny z"
    with pytest.raises(PathNotFound):
        await box.exec(["true"], workdir="no/such/dir")
    quoted = await box.exec(["printf", "%s|", "a b", "$HOME", "'q'"])
    assert quoted.stdout == b"a b|$HOME|'q'|"
    assert await box.list_dir("/tmp") == [], "the stdin scratch file is removed"


async def test_exposed_port_is_the_preview_host(world: World) -> None:
    box = await world.provider.create(_spec(), "k-port")
    endpoint = await box.resolve_exposed_port(6080)
    assert (endpoint.host, endpoint.port, endpoint.tls) == (f"6080-{box.instance_id}.e2b.app", 443, True)


async def test_sandbox_timeout_kill_makes_the_box_not_found(world: World) -> None:
    box = await world.provider.create(_spec(), "k-expire")
    world.clock.now += 601
    with pytest.raises(BoxNotFound):
        await box.exec(["true"])
    with pytest.raises(BoxNotFound):
        await world.provider.resume(box.serialize_state())


async def test_sandbox_timeout_pause_is_unavailable_then_resumes(world: World) -> None:
    provider = _provider_with(world, timeout_seconds=600, timeout_action="pause")
    box = await provider.create(_spec(), "k-pause")
    await box.write_file("kept.txt", b"kept")
    world.clock.now += 601
    with pytest.raises(ProviderUnavailable, match="paused") as caught:
        await box.read_file("kept.txt")
    assert not isinstance(caught.value, BoxNotFound)
    again = await provider.create(_spec(), "k-pause")  # a retried create adopts the paused box
    assert again.instance_id == box.instance_id
    assert await again.read_file("kept.txt") == b"kept"


async def test_list_owned_pages_through_every_box(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2b_module, "_LIST_PAGE", 2)
    specs = [_spec(f"p{i}") for i in range(5)]
    boxes = [await world.provider.create(spec, f"k-page-{i}") for i, spec in enumerate(specs)]
    await world.cloud.sdk.create(metadata={"someone": "else"}, api_key=world.cloud.api_key)  # not ours
    owned = {o.instance_id: o for o in await world.provider.list_owned()}
    assert set(owned) == {b.instance_id for b in boxes}
    assert [owned[b.instance_id].lease_id for b in boxes] == [s.lease_id for s in specs]
    assert owned[boxes[0].instance_id].labels["epoch"] == "3"


async def test_latency_is_injected_on_every_call(world: World) -> None:
    world.cloud.faults.latency = 0.2
    started = time.monotonic()
    await world.provider.create(_spec(), "k-latency")
    assert time.monotonic() - started >= 0.4  # one listing, one create


async def test_transient_error_on_list_during_create_is_unavailable(world: World) -> None:
    world.cloud.faults.fail("list_boxes", lambda: ServiceBusyException("503: busy"))
    with pytest.raises(ProviderUnavailable):
        await world.provider.create(_spec(), "k-list")
    assert world.cloud.sandboxes == {}, "nothing is created when the lookup by key failed"


# --- native snapshots ---------------------------------------------------------------------------


async def test_native_snapshot_restores_into_a_new_box_and_deletes_idempotently(world: World) -> None:
    box = await world.provider.create(_spec(), "k-snap")
    await box.write_file("notes/a.txt", b"snapshotted")
    snapshot_id = await world.provider.native_snapshot(box.serialize_state())
    await box.write_file("notes/a.txt", b"changed later")
    restored = await world.provider.create(_spec(image=snapshot_id), "k-snap-restore")
    assert await restored.read_file("notes/a.txt") == b"snapshotted"
    await world.provider.delete_snapshot(snapshot_id)
    await world.provider.delete_snapshot(snapshot_id)
    assert snapshot_id not in world.cloud.snapshots
    with pytest.raises(BoxNotFound):
        await world.provider.native_snapshot(Envelope(backend_id="e2b", instance_id="i0000000000000000000"))


def test_snapshot_reference_round_trip() -> None:
    ref = encode_snapshot_ref("abc123:default")
    assert ref == b'E2B_SANDBOX_SNAPSHOT_V1\n{"snapshot_id":"abc123:default","workspace_persistence":"snapshot"}'
    assert decode_snapshot_ref(ref) == "abc123:default"
    assert decode_snapshot_ref(b'E2B_SANDBOX_SNAPSHOT_V1\n{"snapshot_id":""}') is None
    assert decode_snapshot_ref(b"E2B_SANDBOX_SNAPSHOT_V1\n\xff") is None
    assert decode_snapshot_ref(b'MODAL_SANDBOX_FS_SNAPSHOT_V1\n{"snapshot_id":"x"}') is None


# --- the fake cannot drift from the SDK ---------------------------------------------------------

_PARITY: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
    (FakeE2BSdk.create, AsyncSandbox.create),
    (FakeE2BSdk.connect, AsyncSandbox._cls_connect_sandbox),  # what AsyncSandbox.connect(id) calls
    (FakeE2BSdk.list, AsyncSandbox.list),
    (FakeE2BSdk.kill, AsyncSandbox._cls_kill),
    (FakeE2BSdk.get_info, AsyncSandbox._cls_get_info),
    (FakeE2BSdk.pause, AsyncSandbox._cls_pause),
    (FakeE2BSdk.create_snapshot, AsyncSandbox._cls_create_snapshot),
    (FakeE2BSdk.delete_snapshot, AsyncSandbox.delete_snapshot),
    (FakeSandboxPaginator.next_items, AsyncSandboxPaginator.next_items),
    (FakeE2BSandbox.get_host, AsyncSandbox.get_host),
    (FakeE2BSandbox.is_running, AsyncSandbox.is_running),
    (FakeE2BSandbox.kill, AsyncSandbox.__dict__["kill"].method),  # the instance variant
    (FakeCommands.run, Commands.run),
    (FakeFilesystem.read, Filesystem.read),
    (FakeFilesystem.write, Filesystem.write),
    (FakeFilesystem.list, Filesystem.list),
    (FakeFilesystem.exists, Filesystem.exists),
]


@pytest.mark.parametrize(("fake", "real"), _PARITY, ids=[fake.__qualname__ for fake, _ in _PARITY])
def test_fake_signatures_match_the_sdk(fake: Callable[..., Any], real: Callable[..., Any]) -> None:
    assert_fake_signature_matches(fake, real)
