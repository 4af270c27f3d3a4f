"""Modal-specific behaviour of the provider against the fake SDK, and the fake's parity with the real SDK."""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpclib
import grpclib.exceptions
import modal
import modal.container_process
import modal.exception as mx
import modal.experimental
import modal.io_streams
import modal.sandbox.sandbox
import pytest
from pydantic import SecretStr

from providers.box_labels import KEY, LEASE_ID
from providers.modal import (
    ModalProvider,
    ModalSettings,
    _translate,
    build_provider,
    modal_snapshot_id,
    real_sdk,
)
from sandbox.box import BoxSpec, Envelope
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
    StreamPortUnavailable,
)
from sandbox.settings import Settings
from tests.fakes.faults import FaultPlan
from tests.fakes.machine import FakeMachine
from tests.fakes.modal_fake import FakeModal

APP = "modal-tests"


@pytest.fixture
async def fake(tmp_path: pathlib.Path) -> AsyncIterator[FakeModal]:
    machine = FakeMachine(tmp_path / "machine")
    service = FakeModal(machine, faults=FaultPlan())
    try:
        yield service
    finally:
        await service.aclose()
        await machine.aclose()


def _provider(fake: FakeModal, **settings: Any) -> ModalProvider:
    return ModalProvider(ModalSettings(app_name=APP, **settings), sdk=fake)


def _spec(image: str | None = None) -> BoxSpec:
    group = f"g-{uuid.uuid4().hex[:8]}"
    return BoxSpec(
        lease_id=f"lease/ws/{group}", workspace_id="ws", group_id=group, epoch=2, image=image, environment={"A": "1"}
    )


# -- settings ---------------------------------------------------------------------------------------


def test_missing_app_name_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_MODAL_APP_NAME", raising=False)
    with pytest.raises(SandboxConfigError, match="SANDBOX_MODAL_APP_NAME"):
        ModalProvider(ModalSettings()).validate_credentials()


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"SANDBOX_MODAL_TOKEN_ID": "ak-1"}, "SANDBOX_MODAL_TOKEN_SECRET"),
        ({"SANDBOX_MODAL_TOKEN_SECRET": "as-1"}, "SANDBOX_MODAL_TOKEN_ID"),
    ],
)
def test_token_pair_must_be_complete(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], missing: str) -> None:
    monkeypatch.setenv("SANDBOX_MODAL_APP_NAME", "app")
    for name in ("SANDBOX_MODAL_TOKEN_ID", "SANDBOX_MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SandboxConfigError, match=missing):
        build_provider(Settings()).validate_credentials()


def test_settings_from_environment_keep_secrets_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "SANDBOX_MODAL_APP_NAME": "app",
        "SANDBOX_MODAL_TOKEN_ID": "ak-visible",
        "SANDBOX_MODAL_TOKEN_SECRET": "as-hidden-secret",
        "SANDBOX_MODAL_IDLE_TIMEOUT_SECONDS": "900",
        "SANDBOX_MODAL_WORKSPACE_PERSISTENCE": "snapshot_directory",
    }.items():
        monkeypatch.setenv(name, value)
    provider = build_provider(Settings(desktop_enabled=False))
    provider.validate_credentials()
    assert provider.settings.idle_timeout_seconds == 900
    assert provider.settings.workspace_persistence == "snapshot_directory"
    assert "as-hidden-secret" not in repr(provider.settings)
    assert provider.exposed_ports == (7681, 7682)  # no desktop plane: 6080 is not declared


def test_bad_image_id_and_orphan_registry_secret_are_refused() -> None:
    with pytest.raises(SandboxConfigError, match="SANDBOX_MODAL_IMAGE_ID"):
        ModalSettings(app_name="a", image_id="debian").validate()
    with pytest.raises(SandboxConfigError, match="SANDBOX_MODAL_IMAGE_REF"):
        ModalSettings(app_name="a", image_registry_secret="ghcr").validate()


def test_hard_lifetime_is_24h_and_becomes_the_box_timeout() -> None:
    provider = ModalProvider(ModalSettings(app_name="a"), sdk=None)
    assert provider.descriptor.lifetime.hard_lifetime_ms == 24 * 3600 * 1000
    assert provider.box_timeout_seconds == 24 * 3600
    assert provider.idle_timeout_seconds == 24 * 3600
    assert ModalProvider(ModalSettings(app_name="a", timeout_seconds=600)).box_timeout_seconds == 600


# -- create -----------------------------------------------------------------------------------------


async def test_create_sends_image_env_workdir_timeouts_ports_and_lease_tags(fake: FakeModal) -> None:
    provider = _provider(fake, image_ref="ghcr.io/acme/desktop@sha256:" + "a" * 64, idle_timeout_seconds=1200)
    spec = _spec()
    box = await provider.create(spec, "key-1")
    assert box.instance_id.startswith("sb-") and len(box.instance_id) == 25
    record = fake.record(box.instance_id)
    assert record.args == ("sleep", "infinity")
    assert record.image_id is not None and record.image_id.startswith("im-")
    assert record.env == {"A": "1"}
    assert record.workdir == "/workspace"
    assert (record.timeout, record.idle_timeout) == (86400, 1200)
    assert record.encrypted_ports == (6080, 7681, 7682)
    assert record.tags[LEASE_ID] == spec.lease_id and record.tags[KEY] == "key-1"
    assert record.tags["sandbox.epoch"] == "2"
    assert (await box.exec(["sh", "-c", 'printf "$A"'])).stdout == b"1"


async def test_a_create_whose_response_was_lost_is_adopted_on_retry(fake: FakeModal) -> None:
    provider = _provider(fake)
    spec = _spec()
    fake.faults.fail("create_after", mx.ConnectionError("connection reset"))
    with pytest.raises(ProviderUnavailable):
        await provider.create(spec, "key-lost")
    box = await provider.create(spec, "key-lost")
    assert [r.sandbox_id for r in fake.records()] == [box.instance_id]


async def test_racing_creates_with_one_key_make_one_box(fake: FakeModal) -> None:
    provider = _provider(fake)
    spec = _spec()
    fake.faults.latency = 0.02  # both lists run before either create lands
    boxes = await asyncio.gather(*(provider.create(spec, "key-race") for _ in range(3)))
    assert len({b.instance_id for b in boxes}) == 1
    assert len([r for r in fake.records() if r.returncode is None]) == 1


async def test_readiness_retries_until_the_box_runs_commands(fake: FakeModal) -> None:
    provider = _provider(fake)
    fake.faults.fail("exec", mx.ServiceError("UNAVAILABLE"), times=3)
    box = await provider.create(_spec(), "key-ready")
    assert (await box.exec(["true"])).exit_code == 0
    assert fake.faults.calls["exec"] >= 4


async def test_readiness_that_never_comes_is_a_typed_probe_timeout(fake: FakeModal) -> None:
    provider = _provider(fake, exec_readiness_timeout_seconds=0.5)
    fake.faults.fail("exec", mx.ServiceError("UNAVAILABLE"), times=1000)
    with pytest.raises(ProviderUnavailable, match="exec_probe_timeout"):
        await provider.create(_spec(), "key-never")


async def test_credentials_are_checked_by_the_service(fake: FakeModal) -> None:
    fake.credentials = ("ak-good", "as-good")
    wrong = _provider(fake, token_id=SecretStr("ak-good"), token_secret=SecretStr("as-bad"))
    with pytest.raises(ProviderAuthError):
        await wrong.create(_spec(), "key-auth")
    right = _provider(fake, token_id=SecretStr("ak-good"), token_secret=SecretStr("as-good"))
    assert (await (await right.create(_spec(), "key-auth")).exec(["true"])).exit_code == 0


async def test_quota_is_typed(fake: FakeModal) -> None:
    fake.faults.fail("create", mx.ResourceExhaustedError("Sandbox limit reached for workspace"))
    with pytest.raises(ProviderQuotaError):
        await _provider(fake).create(_spec(), "key-quota")


# -- tunnels, exec ----------------------------------------------------------------------------------


async def test_tunnels_give_tls_endpoints_for_declared_ports_only(fake: FakeModal) -> None:
    provider = ModalProvider(ModalSettings(app_name=APP), sdk=fake, exposed_ports=(6080, 7681))
    box = await provider.create(_spec(), "key-tunnel")
    endpoint = await box.resolve_exposed_port(6080)
    assert endpoint.tls and endpoint.port == 443 and endpoint.host.endswith(".modal.host")
    assert (await box.resolve_exposed_port(7681)).host != endpoint.host
    with pytest.raises(StreamPortUnavailable, match="6080, 7681"):
        await box.resolve_exposed_port(7682)


async def test_exec_timeout_below_a_second_is_prompt_and_stdin_is_streamed(fake: FakeModal) -> None:
    box = await _provider(fake).create(_spec(), "key-exec")
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        await box.exec(["sleep", "5"], timeout=0.3)
    assert time.monotonic() - started < 1.0
    done = await box.exec(["sh", "-c", "cat; exit 4"], stdin=b"\x00in\xff")
    assert (done.exit_code, done.stdout) == (4, b"\x00in\xff")


async def test_the_fake_reports_a_killed_exec_as_minus_one_like_the_sdk(fake: FakeModal) -> None:
    box = await _provider(fake).create(_spec(), "key-minus")
    sandbox = await fake.Sandbox.from_id.aio(box.instance_id)
    process = await sandbox.exec.aio("sleep", "5", timeout=1, text=False)
    assert await process.wait.aio() == -1


async def test_latency_is_injected_into_every_call(fake: FakeModal) -> None:
    box = await _provider(fake).create(_spec(), "key-latency")
    fake.faults.latency = 0.2
    started = time.monotonic()
    await box.exec(["true"])
    assert time.monotonic() - started >= 0.2


# -- the NotFound rule ------------------------------------------------------------------------------


async def test_a_transient_filesystem_failure_looks_like_not_found_but_is_unavailable(fake: FakeModal) -> None:
    box = await _provider(fake).create(_spec(), "key-fs")
    await box.write_file("f.txt", b"x")
    fake.faults.fail("read", mx.ConnectionError("Deadline exceeded"))
    with pytest.raises(ProviderUnavailable) as caught:
        await box.read_file("f.txt")
    assert not isinstance(caught.value, BoxNotFound)
    assert await box.read_file("f.txt") == b"x"


async def test_every_way_of_reaching_a_finished_box_is_not_found(fake: FakeModal) -> None:
    provider = _provider(fake)
    box = await provider.create(_spec(), "key-gone")
    envelope = box.serialize_state()
    stale = await fake.Sandbox.from_id.aio(box.instance_id)  # a handle that never ran a command
    await provider.terminate(envelope)
    with pytest.raises(mx.ConflictError):
        await stale.exec.aio("true")  # what the SDK raises: the provider must not read it as "other"
    for call in (
        lambda: box.exec(["true"]),
        lambda: box.read_file("x"),
        lambda: box.write_file("x", b""),
        lambda: box.list_dir("."),
        lambda: box.path_exists("x"),
        lambda: box.resolve_exposed_port(6080),
        lambda: provider.resume(envelope),
    ):
        with pytest.raises(BoxNotFound):
            await call()
    assert fake.record(box.instance_id).returncode == 137  # still known, as Modal keeps finished sandboxes
    fake.advance(fake.finished_retention + 1)
    with pytest.raises(BoxNotFound, match="has been terminated"):
        await provider.resume(envelope)
    await provider.terminate(envelope)  # idempotent once Modal forgot it too


async def test_a_box_past_its_lifetime_or_idle_timeout_is_not_found(fake: FakeModal) -> None:
    provider = _provider(fake, idle_timeout_seconds=600)
    idle = await provider.create(_spec(), "key-idle")
    fake.advance(601)
    with pytest.raises(BoxNotFound):
        await provider.resume(idle.serialize_state())
    assert fake.record(idle.instance_id).returncode == 124
    old = await _provider(fake).create(_spec(), "key-old")
    fake.advance(86401)
    with pytest.raises(BoxNotFound):
        await old.exec(["true"])


def test_translate_table() -> None:
    sid = "sb-abc"
    cases: list[tuple[BaseException, str | None, type[ProviderError]]] = [
        (mx.NotFoundError("Sandbox not found"), sid, BoxNotFound),
        (mx.NotFoundError("Image im-1 not found"), None, ProviderError),
        (mx.SandboxTerminatedError(), sid, BoxNotFound),
        (Exception(f"Modal sandbox {sid} is no longer running."), sid, BoxNotFound),
        (Exception(f"Modal sandbox {sid} not found (has been terminated)"), sid, BoxNotFound),
        (Exception("Modal sandbox sb-other is no longer running."), sid, ProviderError),
        (Exception(f"Modal sandbox {sid} is no longer running. (retrying)"), sid, ProviderError),
        (mx.ServiceError("UNAVAILABLE"), sid, ProviderUnavailable),
        (mx.ConnectionError("Deadline exceeded"), sid, ProviderUnavailable),
        (mx.InternalError("internal"), sid, ProviderUnavailable),
        (mx.InternalFailure("retriable"), sid, ProviderUnavailable),
        (mx.TimeoutError("snapshot timed out"), sid, ProviderUnavailable),
        (grpclib.exceptions.StreamTerminatedError("Connection lost"), sid, ProviderUnavailable),
        (ConnectionResetError(104, "reset"), sid, ProviderUnavailable),
        (grpclib.GRPCError(grpclib.Status.UNAVAILABLE, "down"), sid, ProviderUnavailable),
        (grpclib.GRPCError(grpclib.Status.NOT_FOUND, "gone"), sid, BoxNotFound),
        (grpclib.GRPCError(grpclib.Status.UNAUTHENTICATED, "who"), sid, ProviderAuthError),
        (mx.AuthError("Token missing"), sid, ProviderAuthError),
        (mx.PermissionDeniedError("no"), sid, ProviderAuthError),
        (mx.ResourceExhaustedError("limit"), sid, ProviderQuotaError),
        (mx.InvalidError("bad"), sid, ProviderError),
        (mx.ConflictError("Sandbox already finished"), sid, ProviderError),
    ]
    for err, subject, expected in cases:
        got = _translate(err, sandbox_id=subject)
        assert type(got) is expected, (err, got)


# -- snapshots --------------------------------------------------------------------------------------


async def test_filesystem_snapshot_starts_a_new_box_with_the_files(fake: FakeModal) -> None:
    provider = _provider(fake)
    source = await provider.create(_spec(), "key-snap")
    await source.write_file("w.txt", b"workspace")
    await source.write_file("/root/.profile-x", b"home")
    image_id = await provider.snapshot_native(source.serialize_state(), ttl_seconds=3600)
    assert image_id.startswith("im-") and image_id in fake.image_ids()
    restored = await provider.create(_spec(image=image_id), "key-from-snap")
    assert fake.record(restored.instance_id).image_id == image_id
    assert await restored.read_file("w.txt") == b"workspace"
    assert await restored.read_file("/root/.profile-x") == b"home"
    ref = 'MODAL_SANDBOX_FS_SNAPSHOT_V1\n{"snapshot_id":"' + image_id + '"}'
    await provider.delete_snapshot(ref)
    await provider.delete_snapshot(image_id)  # already gone: no error
    assert image_id not in fake.image_ids()
    with pytest.raises(ProviderError) as caught:
        await provider.create(_spec(image=image_id), "key-deleted")
    assert not isinstance(caught.value, BoxNotFound)


async def test_directory_snapshot_mounts_over_the_workspace_and_expires(fake: FakeModal) -> None:
    provider = _provider(fake, workspace_persistence="snapshot_directory")
    source = await provider.create(_spec(), "key-dir")
    await source.write_file("a/b.txt", b"dir snapshot")
    image_id = await provider.snapshot_native(source.serialize_state(), ttl_seconds=60)
    target = await provider.create(_spec(), "key-dir-target")
    await target.write_file("stale.txt", b"old")
    await provider.mount_native(target.serialize_state(), image_id)
    assert await target.read_file("a/b.txt") == b"dir snapshot"
    assert not await target.path_exists("stale.txt")
    fake.advance(61)
    assert image_id not in fake.image_ids()
    with pytest.raises(ProviderError):
        await provider.mount_native(target.serialize_state(), image_id)


def test_snapshot_ids_are_checked() -> None:
    assert modal_snapshot_id('MODAL_SANDBOX_DIR_SNAPSHOT_V1\n{"snapshot_id":"im-1"}') == "im-1"
    for bad in ("sb-1", "", 'MODAL_SANDBOX_FS_SNAPSHOT_V1\n{"snapshot_id":""}', "MODAL_SANDBOX_FS_SNAPSHOT_V1\n{"):
        with pytest.raises(InvalidRequest):
            modal_snapshot_id(bad)


# -- orphan sweep ----------------------------------------------------------------------------------


async def test_list_owned_shows_tagged_boxes_only(fake: FakeModal) -> None:
    provider = _provider(fake)
    spec = _spec()
    box = await provider.create(spec, "key-owned")
    app = await fake.App.lookup.aio(APP)
    stranger = await fake.Sandbox.create.aio("sleep", "infinity", app=app)  # not ours: no lease tag
    owned = {o.instance_id: o for o in await provider.list_owned()}
    assert set(owned) == {box.instance_id}
    assert owned[box.instance_id].lease_id == spec.lease_id
    assert owned[box.instance_id].labels["epoch"] == "2"
    assert stranger.object_id not in owned
    fake.faults.fail("list_boxes", mx.ServiceError("UNAVAILABLE"))
    with pytest.raises(ProviderUnavailable):
        await provider.list_owned()


async def test_resume_rejects_foreign_envelopes(fake: FakeModal) -> None:
    with pytest.raises(InvalidRequest):
        await _provider(fake).resume(Envelope(backend_id="docker", instance_id="abc"))
    with pytest.raises(BoxNotFound):
        await _provider(fake).resume(Envelope(backend_id="modal", instance_id="not-a-sandbox-id"))


# -- the fake cannot drift from the SDK ------------------------------------------------------------


def _params(fn: Any) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]


def _assert_compatible(fake_fn: Any, real_fn: Any, where: str) -> None:
    real = {p.name: p for p in _params(real_fn)}
    real_kinds = {p.kind for p in real.values()}
    for param in _params(fake_fn):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            assert inspect.Parameter.VAR_POSITIONAL in real_kinds, f"{where}: *{param.name} not in the SDK"
            continue
        assert param.name in real, f"{where}: parameter {param.name!r} does not exist in the SDK"
        assert param.kind == real[param.name].kind, (
            f"{where}: {param.name!r} is {param.kind}, SDK {real[param.name].kind}"
        )
    fake_names = {p.name for p in _params(fake_fn)}
    for param in real.values():
        required = param.default is inspect.Parameter.empty and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        assert not required or param.name in fake_names, f"{where}: the SDK requires {param.name!r}"


def _check_object(fake_obj: object, real_cls: Any, where: str) -> int:
    checked = 0
    for name in dir(fake_obj):
        if name.startswith("_"):
            continue
        assert hasattr(real_cls, name), f"{where}.{name} does not exist in the SDK"
        fake_attr = getattr(fake_obj, name)
        real_attr = getattr(real_cls, name)
        if hasattr(fake_attr, "aio"):
            assert hasattr(real_attr, "aio"), f"{where}.{name} has no .aio in the SDK"
            _assert_compatible(fake_attr.aio, real_attr.aio, f"{where}.{name}")
            checked += 1
        elif callable(fake_attr) and not isinstance(fake_attr, type):
            _assert_compatible(fake_attr, real_attr, f"{where}.{name}")
            checked += 1
    return checked


async def test_every_fake_call_exists_in_the_sdk_with_compatible_parameters(fake: FakeModal) -> None:
    provider = _provider(fake)
    box = await provider.create(_spec(), "key-parity")
    sandbox = await fake.Sandbox.from_id.aio(box.instance_id)
    process = await sandbox.exec.aio("true", text=False)
    await process.wait.aio()
    image = fake.Image.from_id("im-x")
    checked = 0
    checked += _check_object(fake.App, modal.App, "App")
    checked += _check_object(fake.Sandbox, modal.Sandbox, "Sandbox")
    checked += _check_object(fake.Image, modal.Image, "Image")
    checked += _check_object(fake.Secret, modal.Secret, "Secret")
    checked += _check_object(fake.Client, modal.Client, "Client")
    checked += _check_object(sandbox, modal.Sandbox, "Sandbox()")
    checked += _check_object(sandbox.filesystem, modal.sandbox.sandbox.SandboxFilesystem, "SandboxFilesystem")
    checked += _check_object(process, modal.container_process.ContainerProcess, "ContainerProcess")
    checked += _check_object(process.stdout, modal.io_streams.StreamReader, "StreamReader")
    checked += _check_object(process.stdin, modal.io_streams.StreamWriter, "StreamWriter")
    checked += _check_object(image, modal.Image, "Image()")
    _assert_compatible(fake.image_delete.aio, modal.experimental.image_delete.aio, "experimental.image_delete")
    assert checked >= 25
    # And the real SDK offers everything the provider's protocol asks for.
    sdk = real_sdk()
    for attr in ("App", "Sandbox", "Image", "Secret", "Client", "image_delete"):
        assert getattr(sdk, attr) is not None
    for name in ("create", "from_id", "from_name", "list"):
        assert hasattr(getattr(sdk.Sandbox, name), "aio")
