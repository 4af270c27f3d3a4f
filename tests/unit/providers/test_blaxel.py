"""Blaxel-specific behaviour: settings, the fake's parity with the SDK, NotFound discrimination, identity, previews.

The fake stands in for the SDK's objects (``SandboxInstance`` and its helpers), so the parity test
below is what keeps it honest: every method it implements must exist on the real SDK class with
compatible parameters.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from blaxel.core.client.errors import UnexpectedStatus
from blaxel.core.client.models import Preview, Sandbox
from blaxel.core.sandbox import is_valid_sandbox_name
from blaxel.core.sandbox.default.filesystem import SandboxFileSystem
from blaxel.core.sandbox.default.preview import SandboxPreview, SandboxPreviews, SandboxPreviewTokens
from blaxel.core.sandbox.default.process import SandboxProcess
from blaxel.core.sandbox.default.sandbox import (
    SandboxAPIError,
    SandboxCreationTimeoutError,
    SandboxInstance,
    _delete_sandbox_by_name,
)
from blaxel.core.sandbox.types import ResponseError
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from providers.blaxel import (
    _ERRORS,
    BlaxelBoxSession,
    BlaxelProvider,
    BlaxelSdk,
    BlaxelSettings,
    build_provider,
    sandbox_name_for_key,
)
from sandbox.box import BoxSpec, Envelope
from sandbox.errors import (
    BoxNotFound,
    ExecTimeout,
    InvalidRequest,
    PathNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderQuotaError,
    ProviderUnavailable,
    SandboxConfigError,
    Unsupported,
)
from sandbox.settings import Settings
from tests.fakes.blaxel_fake import (
    BlaxelFake,
    FakeSandboxApi,
    FakeSandboxFileSystem,
    FakeSandboxInstance,
    FakeSandboxPreview,
    FakeSandboxPreviews,
    FakeSandboxPreviewTokens,
    FakeSandboxProcess,
)
from tests.unit.providers.harness_blaxel import fake_blaxel


def _spec(tag: str = "bl") -> BoxSpec:
    group = f"g-{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/ws/{group}", workspace_id="ws", group_id=group, epoch=5, environment={"A": "1"})


@pytest.fixture
async def blaxel(tmp_path: Path) -> AsyncIterator[tuple[BlaxelProvider, BlaxelFake]]:
    async with fake_blaxel(tmp_path) as pair:
        yield pair


@pytest.fixture
async def box(blaxel: tuple[BlaxelProvider, BlaxelFake]) -> BlaxelBoxSession:
    provider, _ = blaxel
    spec = _spec("box")
    return await provider.create(spec, f"{spec.lease_id}#5")


# -- the fake cannot drift from the SDK ----------------------------------------------------------

_PAIRS: list[tuple[type, type]] = [
    (FakeSandboxInstance, SandboxInstance),
    (FakeSandboxProcess, SandboxProcess),
    (FakeSandboxFileSystem, SandboxFileSystem),
    (FakeSandboxPreviews, SandboxPreviews),
    (FakeSandboxPreview, SandboxPreview),
    (FakeSandboxPreviewTokens, SandboxPreviewTokens),
]


def _public(cls: type) -> dict[str, Any]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")}


def _assert_compatible(fake: Callable[..., Any], real: Callable[..., Any], where: str) -> None:
    fake_params = [p for p in inspect.signature(fake).parameters.values() if p.name not in ("self", "cls")]
    real_params = {p.name: p for p in inspect.signature(real).parameters.values() if p.name not in ("self", "cls")}
    for param in fake_params:
        assert param.name in real_params, f"{where}: the SDK has no parameter {param.name!r}"
        assert param.kind == real_params[param.name].kind, f"{where}: {param.name!r} is passed differently"
    for name, param in real_params.items():
        if param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            assert name in {p.name for p in fake_params}, f"{where}: the fake lacks required {name!r}"


@pytest.mark.parametrize(("fake_cls", "real_cls"), _PAIRS, ids=lambda c: c.__name__)
def test_every_fake_method_exists_on_the_sdk_class_with_the_same_parameters(fake_cls: type, real_cls: type) -> None:
    for name, member in _public(fake_cls).items():
        real = inspect.getattr_static(real_cls, name, None)
        assert real is not None, f"{real_cls.__name__} has no {name!r}"
        if isinstance(member, property):
            assert isinstance(real, property), f"{real_cls.__name__}.{name} is not a property"
        elif callable(member):
            assert inspect.iscoroutinefunction(member) == inspect.iscoroutinefunction(real), name
            _assert_compatible(member, real, f"{real_cls.__name__}.{name}")


def test_fake_instance_attributes_exist_on_real_instances() -> None:
    sandbox = Sandbox.from_dict({"metadata": {"name": "sbx-a"}, "spec": {}})
    assert sandbox is not None
    real = SandboxInstance(sandbox)
    for attribute in ("sandbox", "process", "fs", "previews"):
        assert hasattr(real, attribute)
    preview = Preview.from_dict({"metadata": {"name": "preview-1"}, "spec": {"port": 1}})
    assert preview is not None
    assert hasattr(SandboxPreview(preview), "tokens") and hasattr(SandboxPreview(preview), "preview")


def test_fake_class_methods_match_the_sdk_class_methods() -> None:
    real: dict[str, Callable[..., Any]] = {
        "create": SandboxInstance.create,
        "create_if_not_exists": SandboxInstance.create_if_not_exists,
        "get": SandboxInstance.get,
        "list": SandboxInstance.list,
        "delete": _delete_sandbox_by_name,  # what SandboxInstance.delete("name") calls
    }
    for name, member in _public(FakeSandboxApi).items():
        assert name in real, f"SandboxInstance has no class method {name!r}"
        _assert_compatible(member, real[name], f"SandboxInstance.{name}")


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["SANDBOX_BLAXEL_API_KEY", "SANDBOX_BLAXEL_WORKSPACE"])
def test_missing_settings_are_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setenv("SANDBOX_BLAXEL_API_KEY", "bl-key")
    monkeypatch.setenv("SANDBOX_BLAXEL_WORKSPACE", "acme")
    monkeypatch.delenv(missing)
    provider = build_provider(Settings())
    with pytest.raises(SandboxConfigError, match=rf"\[sandbox:blaxel\] {missing}"):
        provider.validate_credentials()


def test_settings_come_from_the_environment_and_hide_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = {
        "API_KEY": "bl-secret-value",
        "WORKSPACE": "acme",
        "REGION": "eu-lon-1",
        "MEMORY_MB": "8192",
        "TTL": "24h",
        "EXPOSED_PORT_PUBLIC": "true",
        "EXPOSED_PORT_URL_TTL_SECONDS": "120",
    }
    for name, value in environment.items():
        monkeypatch.setenv(f"SANDBOX_BLAXEL_{name}", value)
    provider = build_provider(Settings())
    provider.validate_credentials()
    s = provider.settings
    assert (s.region, s.memory_mb, s.ttl, s.exposed_port_public, s.exposed_port_url_ttl_seconds) == (
        "eu-lon-1", 8192, "24h", True, 120
    )  # fmt: skip
    assert "bl-secret-value" not in repr(s)
    assert provider.backend_id == provider.descriptor.backend_id == "blaxel"
    assert provider.descriptor.port_exposure.supports_on_demand_ports


@pytest.mark.parametrize("ttl", ["24", "1y", "0h", "h", "10 m"])
def test_a_ttl_that_is_not_a_blaxel_duration_is_refused(ttl: str) -> None:
    with pytest.raises(SandboxConfigError, match="SANDBOX_BLAXEL_TTL"):
        BlaxelSettings(api_key=SecretStr("k"), workspace="w", ttl=ttl).validate()


def test_the_real_sdk_gets_our_credentials_without_dialing(monkeypatch: pytest.MonkeyPatch) -> None:
    from blaxel.core.client.client import client
    from blaxel.core.common.settings import settings as sdk_settings

    monkeypatch.setattr(sdk_settings, "auth", sdk_settings.auth)
    monkeypatch.setattr(client, "_auth", client._auth)
    sdk = BlaxelSdk(BlaxelSettings(api_key=SecretStr("bl-key-1"), workspace="acme"))
    assert sdk._instance_class() is SandboxInstance
    headers = sdk_settings.auth.get_headers()
    assert headers["X-Blaxel-Authorization"] == "Bearer bl-key-1" and headers["X-Blaxel-Workspace"] == "acme"
    assert sdk_settings.workspace == "acme"


def test_the_real_sdk_refuses_missing_credentials() -> None:
    with pytest.raises(SandboxConfigError, match="SANDBOX_BLAXEL_API_KEY"):
        BlaxelSdk(BlaxelSettings(workspace="acme"))._instance_class()


@given(st.text(min_size=1, max_size=300))
def test_sandbox_names_from_any_key_are_valid_and_stable(key: str) -> None:
    name = sandbox_name_for_key(key)
    assert is_valid_sandbox_name(name)
    assert name == sandbox_name_for_key(key)
    assert name != sandbox_name_for_key(key + "x")


# -- error table ---------------------------------------------------------------------------------


def _response_error(status: int, code: str) -> ResponseError:
    request = httpx.Request("GET", "https://run.blaxel.ai/acme/sandboxes/sbx-1/filesystem/x")
    return ResponseError(httpx.Response(status, json={"error": "e", "code": code}, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SandboxAPIError("gone", status_code=404, code="NOT_FOUND"), BoxNotFound),
        (_response_error(404, "WORKLOAD_NOT_FOUND"), BoxNotFound),
        (SandboxAPIError("deleted", status_code=410, code="SANDBOX_DELETED"), BoxNotFound),
        (SandboxAPIError("busy", status_code=503, code="SERVICE_UNAVAILABLE"), ProviderUnavailable),
        (SandboxAPIError("auth store down", status_code=503, code="AUTHENTICATION_UNAVAILABLE"), ProviderUnavailable),
        (_response_error(404, "UNAVAILABLE"), ProviderUnavailable),  # a transient code wins over 404
        (_response_error(502, "UPSTREAM_ERROR"), ProviderUnavailable),
        (UnexpectedStatus(504, b"gateway timeout"), ProviderUnavailable),
        (SandboxCreationTimeoutError("sbx-1", 30), ProviderUnavailable),
        (httpx.ConnectError("refused"), ProviderUnavailable),
        (httpx.ReadTimeout("slow"), ProviderUnavailable),
        (SandboxAPIError("revoked", status_code=401, code="TOKEN_REVOKED"), ProviderAuthError),
        (SandboxAPIError("denied", status_code=403, code="UNAUTHORIZED"), ProviderAuthError),
        (SandboxAPIError("quota", status_code=429, code="QUOTA_EXCEEDED"), ProviderQuotaError),
        (UnexpectedStatus(409, b"conflict"), ProviderError),
        (SandboxAPIError("bad name", status_code=400, code="INVALID_INPUT"), ProviderError),
    ],
)
def test_sdk_errors_translate_per_the_table(error: BaseException, expected: type[ProviderError]) -> None:
    translated = _ERRORS.translate(error)
    assert type(translated) is expected


# -- identity, NotFound discrimination -----------------------------------------------------------


async def test_sandbox_carries_labels_and_configuration(tmp_path: Path) -> None:
    async with fake_blaxel(tmp_path, image="acme/desktop:1", region="us-was-1", memory_mb=8192, ttl="12h") as (
        provider,
        fake,
    ):
        spec = _spec("labels")
        box = await provider.create(spec, "key-labels#5")
        record = fake.records[box.instance_id]
        assert box.instance_id == sandbox_name_for_key("key-labels#5")
        assert record.labels["sandbox.lease_id"] == spec.lease_id
        assert record.labels["sandbox.key"] == "key-labels#5" and record.labels["sandbox.epoch"] == "5"
        assert (record.image, record.region, record.memory, record.ttl) == ("acme/desktop:1", "us-was-1", 8192, "12h")
        assert (await box.exec(["sh", "-c", 'printf %s "$A"'])).stdout == b"1"
        identity = box.serialize_state().state["sandboxIdentity"]
        assert identity["name"] == box.instance_id and identity["workspace"] == fake.workspace
        assert identity["createdAt"] == record.created_at


async def test_a_name_reused_by_a_newer_sandbox_is_not_the_old_box(blaxel: tuple[BlaxelProvider, BlaxelFake]) -> None:
    provider, fake = blaxel
    spec = _spec("reuse")
    old = await provider.create(spec, "reuse#1")
    old_envelope = old.serialize_state()
    await provider.terminate(old_envelope)
    new = await provider.create(spec, "reuse#1")  # create_if_not_exists replaces the terminated sandbox
    assert new.instance_id == old.instance_id
    assert new.serialize_state().state != old_envelope.state
    with pytest.raises(BoxNotFound, match="replaced"):
        await provider.resume(old_envelope)
    await provider.terminate(old_envelope)  # must not delete the newer sandbox
    assert fake.records[new.instance_id].status == "DEPLOYED"
    assert (await (await provider.resume(new.serialize_state())).exec(["true"])).exit_code == 0


async def test_a_sandbox_deleted_by_its_ttl_is_not_found_everywhere(
    blaxel: tuple[BlaxelProvider, BlaxelFake], box: BlaxelBoxSession
) -> None:
    provider, fake = blaxel
    await fake.expire(box.instance_id)
    with pytest.raises(BoxNotFound):
        await provider.resume(box.serialize_state())
    with pytest.raises(BoxNotFound):
        await box.exec(["true"])
    with pytest.raises(BoxNotFound):
        await box.read_file("a.txt")  # the data plane's 404 is the sandbox's, not the file's
    with pytest.raises(BoxNotFound):
        await box.write_file("a.txt", b"x")


async def test_a_missing_file_on_a_live_sandbox_is_path_not_found(box: BlaxelBoxSession) -> None:
    with pytest.raises(PathNotFound) as caught:
        await box.read_file("/tmp/never-written")
    assert not isinstance(caught.value, BoxNotFound)


@pytest.mark.parametrize(
    ("operation", "fault", "expected"),
    [
        ("create", BlaxelFake.quota_error, ProviderQuotaError),
        ("create", BlaxelFake.transient_error, ProviderUnavailable),
        ("get", BlaxelFake.auth_error, ProviderAuthError),
        ("read", lambda: httpx.ConnectError("connection reset"), ProviderUnavailable),
        ("write", BlaxelFake.transient_error, ProviderUnavailable),
        ("exec", lambda: httpx.ReadTimeout("edge timeout"), ProviderUnavailable),
        ("preview", lambda: UnexpectedStatus(503, b"busy"), ProviderUnavailable),
    ],
)
async def test_service_failures_are_typed_and_never_not_found(
    blaxel: tuple[BlaxelProvider, BlaxelFake],
    box: BlaxelBoxSession,
    operation: str,
    fault: Callable[[], BaseException],
    expected: type[ProviderError],
) -> None:
    provider, fake = blaxel
    calls: dict[str, Callable[[], Any]] = {
        "create": lambda: provider.create(_spec("f"), f"fault-{uuid.uuid4().hex}"),
        "get": lambda: provider.resume(box.serialize_state()),
        "read": lambda: box.read_file("x"),
        "write": lambda: box.write_file("x", b"1"),
        "exec": lambda: box.exec(["true"]),
        "preview": lambda: box.resolve_exposed_port(6080),
    }
    fake.faults.fail(operation, fault)
    with pytest.raises(expected) as caught:
        await calls[operation]()
    assert not isinstance(caught.value, BoxNotFound)


async def test_list_owned_ignores_sandboxes_without_our_label(
    blaxel: tuple[BlaxelProvider, BlaxelFake], box: BlaxelBoxSession
) -> None:
    provider, fake = blaxel
    await fake.api.create({"name": "someone-elses"})
    owned = {o.instance_id: o for o in await provider.list_owned()}
    assert box.instance_id in owned and "someone-elses" not in owned
    assert owned[box.instance_id].labels["epoch"] == "5"
    created_at = owned[box.instance_id].created_at
    assert created_at is not None and abs(time.time() - created_at) < 60


async def test_list_owned_pages_through_every_sandbox(blaxel: tuple[BlaxelProvider, BlaxelFake]) -> None:
    provider, fake = blaxel
    for i in range(3):
        await fake.api.create({"name": f"ours-{i}", "labels": {"sandbox.key": f"k{i}", "sandbox.lease_id": f"l{i}"}})
    import providers.blaxel as module

    original = module._LIST_PAGE
    module._LIST_PAGE = 2  # type: ignore[misc]
    try:
        assert {o.lease_id for o in await provider.list_owned()} == {"l0", "l1", "l2"}
    finally:
        module._LIST_PAGE = original  # type: ignore[misc]


async def test_envelopes_of_other_backends_are_refused(blaxel: tuple[BlaxelProvider, BlaxelFake]) -> None:
    provider, _ = blaxel
    with pytest.raises(InvalidRequest):
        await provider.resume(Envelope(backend_id="runloop", instance_id="dbx_1", state={}))


async def test_there_are_no_native_snapshots(blaxel: tuple[BlaxelProvider, BlaxelFake]) -> None:
    provider, _ = blaxel
    assert provider.descriptor.snapshot.kind == "tar-only"
    with pytest.raises(Unsupported):
        await provider.delete_snapshot("anything")


# -- previews ------------------------------------------------------------------------------------


async def test_private_previews_carry_a_token_and_are_reused_per_port(
    blaxel: tuple[BlaxelProvider, BlaxelFake], box: BlaxelBoxSession
) -> None:
    _, fake = blaxel
    first = await box.resolve_exposed_port(6080)
    again = await box.resolve_exposed_port(6080)
    other = await box.resolve_exposed_port(7681)
    previews = fake.records[box.instance_id].previews
    assert set(previews) == {"preview-6080", "preview-7681"}
    url = previews["preview-6080"].spec.url
    assert isinstance(url, str) and url == f"https://{first.host}"
    assert (first.port, first.tls) == (443, True) and first.host == again.host != other.host
    assert first.query.startswith("bl_preview_token=") and len(first.query) > len("bl_preview_token=") + 16


async def test_public_previews_need_no_token(tmp_path: Path) -> None:
    async with fake_blaxel(tmp_path, exposed_port_public=True) as (provider, fake):
        box = await provider.create(_spec("public"), "public#1")
        endpoint = await box.resolve_exposed_port(6080)
        assert endpoint.query == ""
        assert fake.records[box.instance_id].previews["preview-6080"].spec.public is True
        with pytest.raises(InvalidRequest):
            await box.resolve_exposed_port(0)


# -- exec ----------------------------------------------------------------------------------------


async def test_large_output_and_binary_stdin_are_byte_exact(box: BlaxelBoxSession) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: past the inline limit, read back as a file
    done = await box.exec(["cat"], stdin=payload)
    assert done.exit_code == 0 and done.stdout == payload


async def test_exec_timeout_kills_the_command(blaxel: tuple[BlaxelProvider, BlaxelFake], box: BlaxelBoxSession) -> None:
    _, fake = blaxel
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sleep", "20"], timeout=1)
    assert caught.value.timeout == 1
    processes = fake.records[box.instance_id].processes.values()
    assert [p.status for p in processes if "sleep 20" in p.command] == ["killed"]


async def test_a_quick_command_costs_two_sdk_calls(
    blaxel: tuple[BlaxelProvider, BlaxelFake], box: BlaxelBoxSession
) -> None:
    _, fake = blaxel
    fake.faults.latency = 0.05
    before = dict(fake.faults.calls)
    started = time.monotonic()
    assert (await box.exec(["true"])).exit_code == 0
    calls = sum(fake.faults.calls.values()) - sum(before.values())
    assert calls == 2  # process.exec + process.wait
    assert time.monotonic() - started >= 0.05 * calls


async def test_exec_refuses_bad_input(box: BlaxelBoxSession) -> None:
    with pytest.raises(InvalidRequest):
        await box.exec([])
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], env={"1BAD": "x"})
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], timeout=-1)
