"""Runloop-specific behaviour: settings, NotFound discrimination, metadata, tunnels, exec wrapper, snapshots.

The provider runs the real ``runloop_api_client`` SDK; its HTTP client talks to the transport-level
fake (:mod:`tests.fakes.runloop_fake`), so requests, pagination and error classes are the SDK's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import runloop_api_client as rl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from runloop_api_client.lib.polling import PollingTimeout

from providers.runloop import (
    _ERRORS,
    SNAPSHOT_REF_PREFIX,
    RunloopBoxSession,
    RunloopProvider,
    RunloopSettings,
    _tunnel_domain,
    build_provider,
    decode_snapshot_ref,
    encode_snapshot_ref,
    make_client,
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
from tests.fakes.runloop_fake import RunloopFake
from tests.unit.providers.harness_runloop import fake_runloop


def _spec(tag: str = "rl") -> BoxSpec:
    group = f"g-{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/ws/{group}", workspace_id="ws", group_id=group, epoch=3)


@pytest.fixture
async def runloop(tmp_path: Path) -> AsyncIterator[tuple[RunloopProvider, RunloopFake]]:
    async with fake_runloop(tmp_path) as pair:
        yield pair


@pytest.fixture
async def box(runloop: tuple[RunloopProvider, RunloopFake]) -> RunloopBoxSession:
    provider, _ = runloop
    spec = _spec("box")
    return await provider.create(spec, f"{spec.lease_id}#3")


# -- settings ------------------------------------------------------------------------------------


def test_missing_api_key_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_RUNLOOP_API_KEY", raising=False)
    provider = build_provider(Settings())
    with pytest.raises(SandboxConfigError, match=r"\[sandbox:runloop\] SANDBOX_RUNLOOP_API_KEY"):
        provider.validate_credentials()


def test_settings_come_from_the_environment_and_hide_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_RUNLOOP_API_KEY", "rl-secret-value")
    monkeypatch.setenv("SANDBOX_RUNLOOP_TUNNEL", "false")
    monkeypatch.setenv("SANDBOX_RUNLOOP_KEEP_ALIVE_SECONDS", "900")
    monkeypatch.setenv("SANDBOX_RUNLOOP_BLUEPRINT_NAME", "desktop")
    provider = build_provider(Settings())
    provider.validate_credentials()
    assert provider.settings.tunnel is False
    assert provider.settings.keep_alive_seconds == 900
    assert provider.settings.blueprint_name == "desktop"
    assert "rl-secret-value" not in repr(provider.settings)
    assert provider.backend_id == provider.descriptor.backend_id == "runloop"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"blueprint_name": "a", "blueprint_id": "bpt_b"}, "SANDBOX_RUNLOOP_BLUEPRINT_ID"),
        ({"base_url": "ftp://runloop"}, "SANDBOX_RUNLOOP_BASE_URL"),
        ({"api_key": SecretStr("  ")}, "SANDBOX_RUNLOOP_API_KEY"),
    ],
)
def test_contradictory_settings_are_refused_offline(overrides: dict[str, object], named: str) -> None:
    config = RunloopSettings.model_validate({"api_key": SecretStr("k"), **overrides})
    with pytest.raises(SandboxConfigError, match=named):
        config.validate()
    with pytest.raises(SandboxConfigError):
        make_client(config)


# -- error table ---------------------------------------------------------------------------------


def _status_error(cls: type[rl.APIStatusError], status: int) -> rl.APIStatusError:
    request = httpx.Request("GET", "https://api.runloop.ai/v1/devboxes/dbx_x")
    return cls("boom", response=httpx.Response(status, request=request), body={"message": "boom"})


_REQUEST = httpx.Request("GET", "https://api.runloop.ai/v1/devboxes")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_status_error(rl.NotFoundError, 404), BoxNotFound),
        (_status_error(rl.AuthenticationError, 401), ProviderAuthError),
        (_status_error(rl.PermissionDeniedError, 403), ProviderAuthError),
        (_status_error(rl.RateLimitError, 429), ProviderQuotaError),
        (_status_error(rl.InternalServerError, 500), ProviderUnavailable),
        (_status_error(rl.InternalServerError, 503), ProviderUnavailable),
        (_status_error(rl.APIStatusError, 408), ProviderUnavailable),
        (rl.APIConnectionError(request=_REQUEST), ProviderUnavailable),
        (rl.APITimeoutError(request=_REQUEST), ProviderUnavailable),
        (PollingTimeout("boot took too long", None), ProviderUnavailable),
        (_status_error(rl.BadRequestError, 400), ProviderError),
        (_status_error(rl.ConflictError, 409), ProviderError),
        (rl.RunloopError("Devbox entered non-running terminal state: failure"), ProviderError),
    ],
)
def test_sdk_errors_translate_per_the_table(error: BaseException, expected: type[ProviderError]) -> None:
    translated = _ERRORS.translate(error)
    assert type(translated) is expected
    if expected is not BoxNotFound:
        assert not isinstance(translated, BoxNotFound)


# -- NotFound discrimination against the fake ----------------------------------------------------


async def test_a_devbox_shut_down_by_runloop_is_not_found(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    provider, fake = runloop
    await fake.expire(box.instance_id, reason="idle")
    # Runloop still answers GET for the devbox (status shutdown): that is proof it is gone.
    assert fake.devboxes[box.instance_id].view()["status"] == "shutdown"
    with pytest.raises(BoxNotFound):
        await provider.resume(box.serialize_state())
    with pytest.raises(BoxNotFound):
        await box.exec(["true"])
    with pytest.raises(BoxNotFound):
        await box.read_file("anything.txt")


async def test_a_missing_file_is_path_not_found_not_box_not_found(box: RunloopBoxSession) -> None:
    with pytest.raises(PathNotFound) as caught:
        await box.read_file("/tmp/never-written.bin")
    assert not isinstance(caught.value, BoxNotFound)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (RunloopFake.rate_limited, ProviderQuotaError),
        (RunloopFake.unauthorized, ProviderAuthError),
        (RunloopFake.service_unavailable, ProviderUnavailable),
        (lambda: httpx.ConnectError("connection refused"), ProviderUnavailable),
    ],
)
async def test_service_failures_on_resume_are_typed_and_never_not_found(
    runloop: tuple[RunloopProvider, RunloopFake],
    box: RunloopBoxSession,
    fault: type[BaseException],
    expected: type[ProviderError],
) -> None:
    provider, fake = runloop
    fake.faults.fail("get", fault)
    with pytest.raises(expected) as caught:
        await provider.resume(box.serialize_state())
    assert not isinstance(caught.value, BoxNotFound)
    assert (await provider.resume(box.serialize_state())).instance_id == box.instance_id


async def test_a_rejected_api_key_is_an_auth_error(tmp_path: Path) -> None:
    async with fake_runloop(tmp_path) as (provider, fake):
        fake.api_key = "rotated-key"
        with pytest.raises(ProviderAuthError, match="SANDBOX_RUNLOOP_API_KEY"):
            await provider.create(_spec(), "k#1")


# -- create, metadata, ownership -----------------------------------------------------------------


async def test_devbox_carries_lease_metadata_and_launch_parameters(tmp_path: Path) -> None:
    async with fake_runloop(tmp_path, keep_alive_seconds=600, blueprint_name="desktop") as (provider, fake):
        spec = _spec("meta")
        box = await provider.create(spec, "key-meta#3")
        devbox = fake.devboxes[box.instance_id]
        assert box.instance_id.startswith("dbx_")
        assert devbox.metadata["sandbox.lease_id"] == spec.lease_id
        assert devbox.metadata["sandbox.key"] == "key-meta#3"
        assert devbox.metadata["sandbox.epoch"] == "3"
        assert devbox.launch_parameters["keep_alive_time_seconds"] == 600
        assert devbox.launch_parameters["user_parameters"] == {"username": "root", "uid": 0}
        assert devbox.blueprint_name == "desktop"
        assert box.serialize_state().state["devboxId"] == box.instance_id


async def test_create_adopts_a_devbox_still_booting_from_a_lost_response(tmp_path: Path) -> None:
    async with fake_runloop(tmp_path) as (provider, fake):
        fake.boot_seconds = 0.5
        # The first attempt's POST reached Runloop but its answer was lost: the devbox boots.
        orphan = await provider.client.devboxes.create(metadata={"sandbox.key": "lost#1", "sandbox.lease_id": "l"})
        assert orphan.status == "provisioning"
        adopted = await provider.create(_spec(), "lost#1")
        assert adopted.instance_id == orphan.id
        assert (await adopted.exec(["true"])).exit_code == 0
        assert len(fake.devboxes) == 1


async def test_create_does_not_adopt_a_shut_down_devbox(runloop: tuple[RunloopProvider, RunloopFake]) -> None:
    provider, _ = runloop
    spec = _spec("again")
    first = await provider.create(spec, "again#1")
    await provider.terminate(first.serialize_state())
    second = await provider.create(spec, "again#1")
    assert second.instance_id != first.instance_id


async def test_a_suspended_devbox_is_resumed(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    provider, fake = runloop
    await provider.client.devboxes.suspend(box.instance_id)
    assert fake.devboxes[box.instance_id].status == "suspended"
    resumed = await provider.resume(box.serialize_state())
    assert fake.devboxes[box.instance_id].status == "running"
    assert (await resumed.exec(["true"])).exit_code == 0


async def test_list_owned_ignores_devboxes_without_our_metadata(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    provider, _ = runloop
    foreign = await provider.client.devboxes.create(name="someone-elses")
    owned = {o.instance_id: o for o in await provider.list_owned()}
    assert box.instance_id in owned and foreign.id not in owned
    assert owned[box.instance_id].labels["epoch"] == "3"


async def test_terminate_of_an_unknown_devbox_is_no_error(runloop: tuple[RunloopProvider, RunloopFake]) -> None:
    provider, _ = runloop
    await provider.terminate(Envelope(backend_id="runloop", instance_id="dbx_" + "9" * 21, state={}))


async def test_an_envelope_of_another_backend_is_refused(runloop: tuple[RunloopProvider, RunloopFake]) -> None:
    provider, _ = runloop
    with pytest.raises(InvalidRequest):
        await provider.resume(Envelope(backend_id="modal", instance_id="sb-1", state={}))


# -- tunnels -------------------------------------------------------------------------------------


async def test_ports_resolve_through_the_devbox_tunnel(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    _, fake = runloop
    tunnel = fake.devboxes[box.instance_id].tunnel
    assert tunnel is not None and tunnel["auth_mode"] == "open"
    endpoint = await box.resolve_exposed_port(6080)
    # Tunnels live under the API's domain: api.runloop.fake here, api.runloop.ai in production.
    assert endpoint.host == f"6080-{tunnel['tunnel_key']}.tunnel.runloop.fake"
    assert (endpoint.port, endpoint.tls) == (443, True)
    with pytest.raises(InvalidRequest):
        await box.resolve_exposed_port(70000)


@pytest.mark.parametrize(
    ("base_url", "domain"),
    [(None, "tunnel.runloop.ai"), ("https://api.runloop.ai", "tunnel.runloop.ai"),
     ("https://api.runloop.pro/", "tunnel.runloop.pro"), ("http://127.0.0.1:9999", "tunnel.runloop.ai")],
)  # fmt: skip
def test_tunnel_domain_follows_the_api_endpoint(base_url: str | None, domain: str) -> None:
    assert _tunnel_domain(base_url) == domain


async def test_without_tunnels_ports_are_unsupported(tmp_path: Path) -> None:
    async with fake_runloop(tmp_path, tunnel=False) as (provider, fake):
        box = await provider.create(_spec(), "notunnel#1")
        assert fake.devboxes[box.instance_id].tunnel is None
        with pytest.raises(Unsupported, match="SANDBOX_RUNLOOP_TUNNEL"):
            await box.resolve_exposed_port(6080)


async def test_a_devbox_without_a_tunnel_gets_one_on_demand(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    provider, fake = runloop
    fake.devboxes[box.instance_id].tunnel = None  # e.g. created before tunnels were switched on
    resumed = await provider.resume(box.serialize_state())
    endpoint = await resumed.resolve_exposed_port(7681)
    tunnel = fake.devboxes[box.instance_id].tunnel
    assert tunnel is not None and endpoint.host.startswith(f"7681-{tunnel['tunnel_key']}.")


# -- exec wrapper --------------------------------------------------------------------------------


async def test_large_output_and_binary_stdin_are_byte_exact(box: RunloopBoxSession) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: past the inline limit, fetched as a file
    done = await box.exec(["cat"], stdin=payload)
    assert done.exit_code == 0 and done.stdout == payload
    many = await box.exec(["sh", "-c", "seq 1 5000"])
    assert many.stdout.splitlines()[-1] == b"5000" and len(many.stdout.splitlines()) == 5000, "never truncated"


async def test_exec_timeout_kills_the_command(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    _, fake = runloop
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sh", "-c", "sleep 20; touch /tmp/survived"], timeout=1)
    assert caught.value.timeout == 1
    assert all(e.status == "completed" for e in fake.executions.values())
    procs = await box.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"])
    assert b"sleep 20" not in procs.stdout, "the timed-out command's process tree was killed"


async def test_exec_refuses_bad_input(box: RunloopBoxSession) -> None:
    with pytest.raises(InvalidRequest):
        await box.exec([])
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], env={"BAD-NAME": "x"})
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], timeout=0)


async def test_a_quick_command_costs_one_api_call(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    _, fake = runloop
    fake.faults.latency = 0.05
    before = len(fake.requests)
    started = time.monotonic()
    assert (await box.exec(["true"])).exit_code == 0
    calls = len(fake.requests) - before
    assert calls <= 2, fake.requests[before:]
    assert time.monotonic() - started >= 0.05 * calls


_arg = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(_arg, min_size=1, max_size=4), value=_arg)
async def test_argv_and_env_reach_the_command_unchanged(box: RunloopBoxSession, args: list[str], value: str) -> None:
    done = await box.exec(["sh", "-c", 'printf "%s\\0" "$V" "$@"', "sh", *args], env={"V": value})
    assert done.exit_code == 0, done.stderr
    assert done.stdout.split(b"\0")[:-1] == [s.encode() for s in (value, *args)]


# -- native snapshots ----------------------------------------------------------------------------


async def test_disk_snapshot_reference_round_trip_and_delete(
    runloop: tuple[RunloopProvider, RunloopFake], box: RunloopBoxSession
) -> None:
    provider, fake = runloop
    await box.write_file("kept.txt", b"in the snapshot")
    ref = await provider.snapshot_disk(box.serialize_state(), name="checkpoint")
    assert ref.startswith(SNAPSHOT_REF_PREFIX)
    snapshot_id = decode_snapshot_ref(ref)
    assert snapshot_id.startswith("snp_") and fake.snapshots[snapshot_id].source_devbox_id == box.instance_id
    # A devbox booted from the snapshot has the workspace as it was.
    clone = await provider.client.devboxes.create(snapshot_id=snapshot_id)
    await provider.client.devboxes.await_running(clone.id)
    assert await fake.machine.read(clone.id, "/workspace/kept.txt") == b"in the snapshot"
    await provider.delete_snapshot(ref)
    assert snapshot_id not in fake.snapshots
    await provider.delete_snapshot(snapshot_id)  # already gone: no error


@pytest.mark.parametrize("ref", ["", SNAPSHOT_REF_PREFIX + "{}", SNAPSHOT_REF_PREFIX + "not json", "a\nb"])
def test_malformed_snapshot_references_are_refused(ref: str) -> None:
    with pytest.raises(InvalidRequest):
        decode_snapshot_ref(ref)


def test_snapshot_reference_uses_the_upstream_format() -> None:
    assert encode_snapshot_ref("snp_1") == 'RUNLOOP_SANDBOX_SNAPSHOT_V1\n{"snapshot_id":"snp_1"}'
    with pytest.raises(InvalidRequest):
        encode_snapshot_ref("")
