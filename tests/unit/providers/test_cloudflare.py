"""Cloudflare-specific behaviour: settings, the NotFound discrimination table, the Worker contract, ports, labels."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from providers.cloudflare import (
    _ERRORS,
    CloudflareProvider,
    CloudflareSettings,
    WorkerError,
    build_provider,
    sandbox_id_for_key,
)
from providers.registry import create_sandbox_client_for_backend
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
from tests.fakes.cloudflare_fake import FakeCloudflareWorker, WorkerFault
from tests.fakes.machine import FakeMachine

KEY = "cf-key"


@dataclass
class Env:
    machine: FakeMachine
    worker: FakeCloudflareWorker
    provider: CloudflareProvider


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    machine = FakeMachine(tmp_path / "m", workspace_root="/workspace")
    worker = FakeCloudflareWorker(machine, api_key=KEY)
    provider = CloudflareProvider(
        CloudflareSettings(worker_url=worker.url, api_key=SecretStr(KEY)), transport=worker.transport
    )
    try:
        yield Env(machine, worker, provider)
    finally:
        await provider.aclose()
        await worker.aclose()
        await machine.aclose()


def _spec(epoch: int = 1) -> BoxSpec:
    group = f"g-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/cf/{group}", workspace_id="cf", group_id=group, epoch=epoch)


# -- settings ---------------------------------------------------------------------------------


def test_missing_worker_url_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_CLOUDFLARE_WORKER_URL", raising=False)
    with pytest.raises(SandboxConfigError, match=r"^\[sandbox:cloudflare\] SANDBOX_CLOUDFLARE_WORKER_URL is not set"):
        create_sandbox_client_for_backend("cloudflare", Settings())


def test_worker_url_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CLOUDFLARE_WORKER_URL", "ftp://worker.example")
    with pytest.raises(SandboxConfigError, match="SANDBOX_CLOUDFLARE_WORKER_URL must be an http"):
        build_provider(Settings()).validate_credentials()


async def test_settings_come_from_the_environment_and_hide_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CLOUDFLARE_WORKER_URL", "https://sandbox.acme.workers.dev")
    monkeypatch.setenv("SANDBOX_CLOUDFLARE_API_KEY", "very-secret-key")
    monkeypatch.setenv("SANDBOX_CLOUDFLARE_REQUEST_TIMEOUT_SECONDS", "12.5")
    provider = create_sandbox_client_for_backend("cloudflare", Settings())
    assert isinstance(provider, CloudflareProvider)
    try:
        assert provider.backend_id == provider.descriptor.backend_id == "cloudflare"
        assert provider.settings.worker_url == "https://sandbox.acme.workers.dev"
        assert provider.settings.request_timeout_seconds == 12.5
        assert "very-secret-key" not in repr(provider.settings)
    finally:
        await provider.aclose()


# -- the NotFound discrimination table (upstream §10.2) ---------------------------------------------

GONE = "Cloudflare sandbox sbx-abc is no longer running."


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (WorkerError(404, "SANDBOX_NOT_FOUND", GONE), BoxNotFound),
        (WorkerError(404, None, "Not Found"), BoxNotFound),
        (WorkerError(400, "RESOURCE_NOT_FOUND", "gone"), BoxNotFound),
        (WorkerError(500, "INTERNAL_ERROR", GONE), BoxNotFound),  # the exact message alone proves it
        (WorkerError(503, "UNAVAILABLE", GONE), ProviderUnavailable),  # a transient code wins
        (WorkerError(404, "ECONNRESET", "reset"), ProviderUnavailable),
        (WorkerError(500, "INTERNAL_ERROR", GONE.rstrip(".")), ProviderUnavailable),  # not the exact text
        (WorkerError(400, "BAD_REQUEST", "Cloudflare sandbox sbx-abc is no longer running. Retry?"), ProviderError),
        (WorkerError(401, "UNAUTHORIZED", "bad key"), ProviderAuthError),
        (WorkerError(403, "FORBIDDEN", "no"), ProviderAuthError),
        (WorkerError(429, "RATE_LIMITED", "slow down"), ProviderQuotaError),
        (WorkerError(502, None, "Bad Gateway"), ProviderUnavailable),
        (WorkerError(408, None, "Request Timeout"), ProviderUnavailable),
        (WorkerError(409, "CONFLICT", "busy"), ProviderError),
        (httpx.ConnectError("connection refused"), ProviderUnavailable),
        (httpx.ReadTimeout("timed out"), ProviderUnavailable),
    ],
)
def test_translate(error: BaseException, expected: type[BaseException]) -> None:
    translated = _ERRORS.translate(error)
    assert type(translated) is expected
    if expected is not BoxNotFound:
        assert not isinstance(translated, BoxNotFound)


# -- against the fake Worker ------------------------------------------------------------------------


async def test_create_labels_the_sandbox_and_sends_the_bearer_key(env: Env) -> None:
    spec = _spec(epoch=7)
    box = await env.provider.create(spec, "key-1")
    assert box.instance_id == sandbox_id_for_key("key-1")
    sandbox = env.worker.sandboxes[box.instance_id]
    assert sandbox.labels == {
        "sandbox.lease_id": spec.lease_id,
        "sandbox.key": "key-1",
        "epoch": "7",
        "sandbox.managed_by": "sandbox-runtime",
    }
    assert set(env.worker.authorizations) == {f"Bearer {KEY}"}


async def test_no_api_key_sends_no_authorization(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path / "m", workspace_root="/workspace")
    worker = FakeCloudflareWorker(machine)
    provider = CloudflareProvider(CloudflareSettings(worker_url=worker.url), transport=worker.transport)
    try:
        await provider.create(_spec(), "k")
        assert worker.authorizations == [None]
    finally:
        await provider.aclose()
        await worker.aclose()
        await machine.aclose()


async def test_wrong_api_key_is_an_auth_error(env: Env) -> None:
    wrong = CloudflareProvider(
        CloudflareSettings(worker_url=env.worker.url, api_key=SecretStr("nope")), transport=env.worker.transport
    )
    try:
        with pytest.raises(ProviderAuthError, match="UNAUTHORIZED"):
            await wrong.create(_spec(), "k")
    finally:
        await wrong.aclose()
    assert env.worker.sandboxes == {}


async def test_concurrent_creates_of_one_key_make_one_sandbox(env: Env) -> None:
    spec = _spec()
    boxes = await asyncio.gather(*(env.provider.create(spec, "same-key") for _ in range(5)))
    assert {b.instance_id for b in boxes} == {sandbox_id_for_key("same-key")}
    assert list(env.worker.sandboxes) == [sandbox_id_for_key("same-key")]


async def test_gone_sandbox_answers_the_exact_upstream_message(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    await env.provider.terminate(box.serialize_state())
    expected = rf"HTTP 404 SANDBOX_NOT_FOUND: Cloudflare sandbox {box.instance_id} is no longer running\.$"
    with pytest.raises(BoxNotFound, match=expected):
        await box.exec(["true"])
    with pytest.raises(BoxNotFound):
        await box.read_file("x")


async def test_recreated_id_is_not_the_old_box(env: Env) -> None:
    spec = _spec()
    old = await env.provider.create(spec, "k")
    envelope = old.serialize_state()
    await env.provider.terminate(envelope)
    new = await env.provider.create(spec, "k")
    assert new.instance_id == old.instance_id
    with pytest.raises(BoxNotFound, match="replaced"):
        await env.provider.resume(envelope)
    assert (await (await env.provider.resume(new.serialize_state())).exec(["true"])).exit_code == 0


async def test_missing_file_is_path_not_found_not_box_not_found(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    await box.write_file("f.txt", b"x")
    with pytest.raises(PathNotFound) as caught:
        await box.read_file("nope.txt")
    assert not isinstance(caught.value, BoxNotFound)
    with pytest.raises(PathNotFound):
        await box.list_dir("nope")
    with pytest.raises(PathNotFound):
        await box.list_dir("f.txt")
    with pytest.raises(InvalidRequest):
        await box.read_file(".")


async def test_exec_stdin_env_workdir_and_timeout(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    done = await box.exec(["sh", "-c", 'cat; printf "%s" "$X"'], stdin=b"\x00in\xff", env={"X": "y"})
    assert done == type(done)(exit_code=0, stdout=b"\x00in\xffy", stderr=b"")
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sleep", "20"], timeout=0.5)
    assert caught.value.timeout == 0.5
    with pytest.raises(InvalidRequest):
        await box.exec([])


async def test_ports_are_stable_preview_urls(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    first = await box.resolve_exposed_port(6080)
    assert first == await box.resolve_exposed_port(6080)
    assert first.tls and first.port == 443
    assert first.host.startswith(f"6080-{box.instance_id}-") and first.host.endswith(env.worker.hostname)
    assert (await box.resolve_exposed_port(7681)).host != first.host
    with pytest.raises(ProviderError) as caught:
        await box.resolve_exposed_port(3000)  # the Worker refuses its control port
    assert not isinstance(caught.value, BoxNotFound)
    with pytest.raises(InvalidRequest):
        await box.resolve_exposed_port(0)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (WorkerFault(429, "RATE_LIMITED", "too many sandboxes"), ProviderQuotaError),
        (WorkerFault(500, "INTERNAL_ERROR", "container failed to start"), ProviderUnavailable),
        (httpx.ConnectError("worker unreachable"), ProviderUnavailable),
    ],
)
async def test_injected_failures_on_create(env: Env, fault: BaseException, expected: type[BaseException]) -> None:
    env.worker.faults.fail("create", fault)
    with pytest.raises(expected):
        await env.provider.create(_spec(), "k")
    # The next attempt goes through and makes exactly one sandbox.
    await env.provider.create(_spec(), "k")
    assert len(env.worker.sandboxes) == 1


async def test_latency_is_added_to_every_call(env: Env) -> None:
    box = await env.provider.create(_spec(), "k")
    env.worker.faults.latency = 0.3
    started = time.monotonic()
    assert (await box.exec(["true"])).exit_code == 0
    assert time.monotonic() - started >= 0.3


async def test_list_owned_sees_only_live_managed_sandboxes(env: Env) -> None:
    spec = _spec()
    box = await env.provider.create(spec, "k")
    # A sandbox someone else made through the same Worker is not ours.
    async with httpx.AsyncClient(base_url=env.worker.url, transport=env.worker.transport) as raw:
        response = await raw.put(
            "/v1/sandboxes/foreign", json={"labels": {"app": "other"}}, headers={"authorization": f"Bearer {KEY}"}
        )
        assert response.status_code == 201
    owned = await env.provider.list_owned()
    assert [(o.instance_id, o.lease_id) for o in owned] == [(box.instance_id, spec.lease_id)]
    await env.provider.terminate(box.serialize_state())
    assert await env.provider.list_owned() == []


async def test_other_backends_envelopes_and_native_snapshots_are_refused(env: Env) -> None:
    with pytest.raises(InvalidRequest):
        await env.provider.resume(Envelope(backend_id="modal", instance_id="sb-1"))
    with pytest.raises(Unsupported):
        await env.provider.delete_snapshot("snap-1")
