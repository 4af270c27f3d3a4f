"""Vercel-specific behaviour: settings, the SDK error table, names as ids, tags, routes, binary exec, lifetime."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr
from vercel.sandbox import (
    SandboxApiError,
    SandboxCredentialsError,
    SandboxFilesystemWriteError,
    SandboxPathNotFoundError,
    SandboxResponseError,
    SandboxStreamError,
)
from vercel.sandbox._internal.log_stream import _TruncatedStreamError

from providers.registry import create_sandbox_client_for_backend
from providers.vercel import _ERRORS, VercelProvider, VercelSettings, build_provider, sandbox_name_for_key
from sandbox.box import BoxSpec, Envelope
from sandbox.descriptors import select_backend
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
from tests.fakes.machine import FakeMachine
from tests.fakes.vercel_fake import FakeVercelApi, VercelApiFault
from tests.unit.providers.harness_vercel import PROJECT_ID, TOKEN, WORKSPACE_ROOT, settings_for


@dataclass
class Env:
    machine: FakeMachine
    api: FakeVercelApi
    provider: VercelProvider


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    machine = FakeMachine(tmp_path / "m", workspace_root=WORKSPACE_ROOT)
    api = FakeVercelApi(machine, token=TOKEN, project_id=PROJECT_ID)
    provider = VercelProvider(settings_for(api), httpx_client_factory=api.httpx_client_factory)
    try:
        yield Env(machine, api, provider)
    finally:
        await provider.aclose()
        await api.aclose()
        await machine.aclose()


def _spec(epoch: int = 1, **kwargs: object) -> BoxSpec:
    group = f"g-{uuid.uuid4().hex[:8]}"
    return BoxSpec.model_validate(
        {"lease_id": f"lease/v/{group}", "workspace_id": "v", "group_id": group, "epoch": epoch, **kwargs}
    )


# -- settings ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("TOKEN", "PROJECT_ID", "TEAM_ID", "RUNTIME", "API_URL", "TIMEOUT_SECONDS", "EXPOSED_PORTS"):
        monkeypatch.delenv(f"SANDBOX_VERCEL_{name}", raising=False)
    return monkeypatch


def test_missing_token_names_the_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SANDBOX_VERCEL_PROJECT_ID", "prj_1")
    with pytest.raises(SandboxConfigError, match=r"^\[sandbox:vercel\] SANDBOX_VERCEL_TOKEN is not set"):
        create_sandbox_client_for_backend("vercel", Settings())


def test_missing_project_names_the_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SANDBOX_VERCEL_TOKEN", "tok")
    with pytest.raises(SandboxConfigError, match=r"^\[sandbox:vercel\] SANDBOX_VERCEL_PROJECT_ID is not set"):
        build_provider(Settings()).validate_credentials()


def test_bad_exposed_port_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SANDBOX_VERCEL_TOKEN", "tok")
    clean_env.setenv("SANDBOX_VERCEL_PROJECT_ID", "prj_1")
    clean_env.setenv("SANDBOX_VERCEL_EXPOSED_PORTS", "[6080, 70000]")
    with pytest.raises(SandboxConfigError, match="SANDBOX_VERCEL_EXPOSED_PORTS"):
        build_provider(Settings()).validate_credentials()


async def test_settings_come_from_the_environment_and_hide_the_token(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SANDBOX_VERCEL_TOKEN", "very-secret-token")
    clean_env.setenv("SANDBOX_VERCEL_PROJECT_ID", "prj_abc")
    clean_env.setenv("SANDBOX_VERCEL_TEAM_ID", "team_abc")
    clean_env.setenv("SANDBOX_VERCEL_RUNTIME", "python3.13")
    provider = create_sandbox_client_for_backend("vercel", Settings())
    assert isinstance(provider, VercelProvider)
    try:
        assert provider.backend_id == provider.descriptor.backend_id == "vercel"
        settings = provider.settings
        assert (settings.project_id, settings.team_id, settings.runtime) == ("prj_abc", "team_abc", "python3.13")
        assert settings.api_url == "https://vercel.com/api"
        assert "very-secret-token" not in repr(settings)
    finally:
        await provider.aclose()


def test_default_time_limit_is_the_descriptors_hard_lifetime() -> None:
    lifetime = select_backend("vercel").lifetime
    assert lifetime.hard_lifetime_ms is not None and lifetime.requires_snapshot_rollover
    settings = VercelSettings(token=SecretStr("t"), project_id="p")
    assert settings.timeout_seconds * 1000 == lifetime.hard_lifetime_ms


# -- the SDK error table (NotFound discrimination, upstream §10.2) -------------------------------


def _api_error(status: int, code: str | None = None, message: str = "boom") -> SandboxApiError:
    body = {"error": {"code": code, "message": message}} if code else {"message": message}
    return SandboxApiError(httpx2.Response(status, json=body), f"HTTP {status}: {message}", data=body)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_api_error(404, "not_found", "Sandbox not found"), BoxNotFound),
        (_api_error(404), BoxNotFound),
        (_api_error(400, "SANDBOX_NOT_FOUND"), BoxNotFound),
        (_api_error(404, "UNAVAILABLE"), ProviderUnavailable),  # a transient code wins over 404
        (_api_error(503, "service_unavailable"), ProviderUnavailable),
        (_api_error(500, "internal_server_error"), ProviderUnavailable),
        (_api_error(410, "sandbox_stopped"), ProviderUnavailable),  # stopped, not gone
        (_api_error(408), ProviderUnavailable),
        (_api_error(401, "unauthorized"), ProviderAuthError),
        (_api_error(403, "forbidden", "Not authorized"), ProviderAuthError),
        (_api_error(429, "rate_limited"), ProviderQuotaError),
        (_api_error(409, "sandbox_already_exists"), ProviderError),
        (_api_error(400, "bad_request"), ProviderError),
        (SandboxCredentialsError("no OIDC token"), ProviderAuthError),
        (SandboxStreamError("stream broke", code="sandbox_stopped"), ProviderUnavailable),
        (SandboxResponseError("malformed"), ProviderError),
        (_TruncatedStreamError("cut off"), ProviderUnavailable),
        (httpx2.ConnectError("refused"), ProviderUnavailable),
        (httpx2.ReadTimeout("slow"), ProviderUnavailable),
    ],
)
def test_translate(error: BaseException, expected: type[BaseException]) -> None:
    translated = _ERRORS.translate(error)
    assert type(translated) is expected
    if expected is not BoxNotFound:
        assert not isinstance(translated, BoxNotFound)


def test_translate_path_and_write_errors() -> None:
    missing = SandboxPathNotFoundError(
        "/vercel/sandbox/x", operation="read_bytes", cwd=None, cause=_api_error(404, "file_not_found")
    )
    translated = _ERRORS.translate(missing)
    assert isinstance(translated, PathNotFound) and not isinstance(translated, BoxNotFound)
    assert translated.path == "/vercel/sandbox/x"
    write = SandboxFilesystemWriteError(paths=("a",), cwd="/", cause=_api_error(503, "service_unavailable"))
    assert type(_ERRORS.translate(write)) is ProviderUnavailable


# -- against the fake API -----------------------------------------------------------------------


async def test_create_names_tags_ports_and_time_limit(env: Env) -> None:
    spec = _spec(epoch=4, environment={"GREETING": "hi"})
    box = await env.provider.create(spec, "key-1")
    assert box.instance_id == sandbox_name_for_key("key-1")
    sandbox = env.api.sandboxes[box.instance_id]
    assert sandbox.tags == {
        "sandbox.lease_id": spec.lease_id,
        "sandbox.key": "key-1",
        "epoch": "4",
        "sandbox.managed_by": "sandbox-runtime",
    }
    assert sandbox.ports == [6080, 7681, 7682]
    assert sandbox.timeout_ms == 5 * 3600 * 1000 and sandbox.persistent
    assert (await box.exec(["sh", "-c", 'printf %s "$GREETING"'])).stdout == b"hi"


async def test_routes_are_the_preview_urls_of_declared_ports(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    endpoints = {port: await box.resolve_exposed_port(port) for port in (6080, 7681, 7682)}
    routes = {r["port"]: r["subdomain"] for r in env.api.sandboxes[box.instance_id].routes}
    for port, endpoint in endpoints.items():
        assert endpoint.host == f"{routes[port]}.vercel.run" and endpoint.tls and endpoint.port == 443
    with pytest.raises(Unsupported, match="SANDBOX_VERCEL_EXPOSED_PORTS"):
        await box.resolve_exposed_port(9999)
    with pytest.raises(InvalidRequest):
        await box.resolve_exposed_port(0)


async def test_concurrent_creates_of_one_key_make_one_sandbox(env: Env) -> None:
    spec = _spec()
    boxes = await asyncio.gather(*(env.provider.create(spec, "same") for _ in range(4)))
    assert {b.instance_id for b in boxes} == {sandbox_name_for_key("same")}
    assert list(env.api.sandboxes) == [sandbox_name_for_key("same")]


async def test_wrong_token_is_an_auth_error(env: Env) -> None:
    wrong = VercelProvider(
        settings_for(env.api, token=SecretStr("wrong")), httpx_client_factory=env.api.httpx_client_factory
    )
    try:
        with pytest.raises(ProviderAuthError, match="forbidden"):
            await wrong.create(_spec(), "k")
    finally:
        await wrong.aclose()
    assert env.api.sandboxes == {}


async def test_exec_is_binary_safe_both_ways(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    payload = bytes(range(256))
    done = await box.exec(["sh", "-c", "cat; printf '\\377err' >&2; exit 5"], stdin=payload)
    assert (done.exit_code, done.stdout, done.stderr) == (5, payload, b"\xfferr")
    missing = await box.exec(["no-such-command"])
    assert missing.exit_code == 127


async def test_exec_timeout_kills_the_process(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sh", "-c", "sleep 3; touch late.txt"], timeout=0.5)
    assert caught.value.timeout == 0.5 and time.monotonic() - started < 10
    assert any(route.endswith("/kill") for _, route in env.api.requests)
    await asyncio.sleep(3.5)
    assert not await box.path_exists("late.txt"), "the timed-out command kept running"


async def test_missing_file_is_path_not_found_not_box_not_found(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    with pytest.raises(PathNotFound) as caught:
        await box.read_file("nope.txt")
    assert not isinstance(caught.value, BoxNotFound)
    with pytest.raises(PathNotFound):
        await box.list_dir("nope")


async def test_a_destroyed_sandboxs_old_handle_is_not_found(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    await env.provider.terminate(box.serialize_state())
    env.api.requests.clear()
    with pytest.raises(BoxNotFound):
        await box.read_file("x")
    # The session answered 410 sandbox_stopped; the SDK tried to resume by name and got the 404.
    assert ("GET", f"v2/sandboxes/{box.instance_id}") in env.api.requests


async def test_recreated_name_is_not_the_old_box(env: Env) -> None:
    spec = _spec()
    old = await env.provider.create(spec, "k")
    envelope = Envelope.model_validate_json(old.serialize_state().model_dump_json())
    await env.provider.terminate(envelope)
    await asyncio.sleep(0.01)  # createdAt has millisecond resolution
    new = await env.provider.create(spec, "k")
    assert new.instance_id == old.instance_id
    with pytest.raises(BoxNotFound, match="replaced"):
        await env.provider.resume(envelope)
    assert (await (await env.provider.resume(new.serialize_state())).exec(["true"])).exit_code == 0


@pytest.mark.parametrize(
    ("operation", "fault", "expected"),
    [
        ("create", VercelApiFault(429, "rate_limited", "Too many sandboxes"), ProviderQuotaError),
        ("create", VercelApiFault(500, "internal_server_error", "oops"), ProviderUnavailable),
        ("get", httpx2.ConnectError("unreachable"), ProviderUnavailable),
    ],
)
async def test_injected_failures_on_create(
    env: Env, operation: str, fault: BaseException, expected: type[BaseException]
) -> None:
    env.api.faults.fail(operation, fault)
    with pytest.raises(expected) as caught:
        await env.provider.create(_spec(), "k")
    assert not isinstance(caught.value, BoxNotFound)
    await env.provider.create(_spec(), "k")
    assert len(env.api.sandboxes) == 1


async def test_latency_is_added_to_every_call(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    env.api.faults.latency = 0.3
    started = time.monotonic()
    assert (await box.exec(["true"])).exit_code == 0
    assert time.monotonic() - started >= 0.3


async def test_list_owned_sees_only_managed_sandboxes(env: Env) -> None:
    spec = _spec()
    box = await env.provider.create(spec, "k")
    foreign = await env.provider.client.create_sandbox(name="someone-elses", tags={"app": "web"})
    assert foreign.name in env.api.sandboxes
    owned = await env.provider.list_owned()
    assert [(o.instance_id, o.lease_id) for o in owned] == [(box.instance_id, spec.lease_id)]
    await env.provider.terminate(box.serialize_state())
    assert await env.provider.list_owned() == []


async def test_home_directory_travels_in_the_archive(env: Env) -> None:
    provider = env.provider
    source = await provider.create(_spec(), "src")
    await source.exec(["sh", "-c", 'printf dot > "$HOME/.profile-test"'])
    archive = b"".join([c async for c in provider.capture_workspace(source.serialize_state())])
    target = await provider.create(_spec(), "dst")

    async def chunks() -> AsyncIterator[bytes]:
        yield archive

    await provider.restore_workspace(target.serialize_state(), chunks())
    assert (await target.exec(["sh", "-c", 'cat "$HOME/.profile-test"'])).stdout == b"dot"


async def test_other_backends_envelopes_and_native_snapshots_are_refused(env: Env) -> None:
    with pytest.raises(InvalidRequest):
        await env.provider.resume(Envelope(backend_id="e2b", instance_id="i1"))
    with pytest.raises(Unsupported):
        await env.provider.delete_snapshot("snap_1")
