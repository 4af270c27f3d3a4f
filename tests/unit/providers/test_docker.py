"""Docker-specific behaviour of the docker provider, against the fake engine driven by the real SDK."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker  # type: ignore[import-untyped]
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.docker import (
    _ERRORS,
    CONTAINER_ID_RE,
    DEFAULT_IMAGE,
    DockerBoxSession,
    DockerProvider,
    DockerSettings,
    build_provider,
    container_name_for_key,
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
    StreamPortUnavailable,
)
from sandbox.inbox_scripts import SCRIPT_NAMES
from sandbox.settings import Settings
from tests.conftest import REPO
from tests.fakes.docker_fake import EngineFault, FakeDockerEngine, FakeVolume
from tests.unit.providers.harness_docker import fake_engine


def _spec(tag: str = "t") -> BoxSpec:
    group = f"g-{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/docker/{group}", workspace_id="docker", group_id=group, epoch=3)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeDockerEngine]:
    async with fake_engine(tmp_path) as e:
        yield e


@pytest.fixture
async def provider(engine: FakeDockerEngine) -> AsyncIterator[DockerProvider]:
    p = DockerProvider(DockerSettings(host=engine.base_url))
    try:
        yield p
    finally:
        await p.aclose()


async def _box(provider: DockerProvider, tag: str = "t") -> tuple[BoxSpec, str, DockerBoxSession]:
    spec = _spec(tag)
    key = f"{spec.lease_id}#1"
    return spec, key, await provider.create(spec, key)


async def _sdk(engine: FakeDockerEngine) -> docker.APIClient:
    return (await asyncio.to_thread(docker.DockerClient, base_url=engine.base_url)).api


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SANDBOX_DOCKER_WORKSPACE_BASE_DIR": "relative/dir"}, "SANDBOX_DOCKER_WORKSPACE_BASE_DIR"),
        ({"SANDBOX_DOCKER_EXPOSED_PORTS": "8080,0"}, "SANDBOX_DOCKER_EXPOSED_PORTS"),
        ({"SANDBOX_DOCKER_EXPOSED_PORTS": "65536"}, "SANDBOX_DOCKER_EXPOSED_PORTS"),
        ({"SANDBOX_DOCKER_EXPOSED_PORTS": "80,http"}, "SANDBOX_DOCKER_EXPOSED_PORTS"),
        ({"SANDBOX_DOCKER_HOST": "localhost:2375"}, "SANDBOX_DOCKER_HOST"),
        ({"SANDBOX_DOCKER_IMAGE": " "}, "SANDBOX_DOCKER_IMAGE"),
        ({"SANDBOX_DOCKER_NETWORK": "bad net"}, "SANDBOX_DOCKER_NETWORK"),
        ({"SANDBOX_DOCKER_NETWORK": "host"}, "SANDBOX_DOCKER_NETWORK"),
        ({"SANDBOX_DOCKER_USER": "0:0"}, "SANDBOX_DOCKER_USER"),
        ({"SANDBOX_DOCKER_USER": "box"}, "SANDBOX_DOCKER_USER"),
    ],
)
def test_settings_validation_names_the_setting(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    provider = build_provider(Settings())
    with pytest.raises(SandboxConfigError) as caught:
        provider.validate_credentials()
    assert caught.value.message.startswith("[sandbox:docker] ")
    assert named in caught.value.message


def test_defaults_validate_offline_and_publish_the_plane_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    # An unreachable engine: validation must not try to reach it.
    monkeypatch.setenv("SANDBOX_DOCKER_HOST", "tcp://192.0.2.1:2375")
    monkeypatch.setenv("SANDBOX_DOCKER_EXPOSED_PORTS", " 8000, 7681 ,8000")
    monkeypatch.setenv("SANDBOX_DOCKER_WORKSPACE_BASE_DIR", "/srv/workspaces")
    provider = build_provider(Settings())
    provider.validate_credentials()
    assert provider.settings.ports() == (8000, 7681, 6080, 7682)
    assert provider.settings.image == DEFAULT_IMAGE
    assert provider.backend_id == "docker" == provider.descriptor.backend_id


# -- container ids ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.text(max_size=140).filter(lambda s: not CONTAINER_ID_RE.fullmatch(s)))
async def test_malformed_container_ids_are_refused_before_any_request(
    provider: DockerProvider, engine: FakeDockerEngine, bad: str
) -> None:
    before = len(engine.requests)
    envelope = Envelope(backend_id="docker", instance_id=bad)
    with pytest.raises(InvalidRequest):
        await provider.resume(envelope)
    with pytest.raises(InvalidRequest):
        await provider.terminate(envelope)
    assert len(engine.requests) == before


async def test_resume_accepts_a_name_or_short_id_and_reports_the_full_id(provider: DockerProvider) -> None:
    _, _, box = await _box(provider)
    for ref in (box.name, box.instance_id[:12]):
        resumed = await provider.resume(Envelope(backend_id="docker", instance_id=ref))
        assert resumed.instance_id == box.instance_id
    assert len(box.instance_id) == 64


# -- NotFound discrimination ----------------------------------------------------------------------


async def test_only_no_such_container_is_box_not_found(provider: DockerProvider, engine: FakeDockerEngine) -> None:
    _, _, box = await _box(provider)
    envelope = box.serialize_state()
    with pytest.raises(PathNotFound):
        await box.read_file("/no/such/file")
    engine.faults.fail("get", EngineFault(404, f"No such object: {box.instance_id}"))
    with pytest.raises(BoxNotFound):
        await provider.resume(envelope)
    for status, message, expected in [
        (404, "network sandbox-net not found", ProviderError),
        (404, "No such exec instance: abc", ProviderError),
        (409, f"Container {box.instance_id} is restarting, wait until the container is running", ProviderUnavailable),
        (401, "authentication required", ProviderAuthError),
        (429, "toomanyrequests: rate limit", ProviderQuotaError),
        (500, "containerd is unavailable", ProviderUnavailable),
        (503, "", ProviderUnavailable),
    ]:
        engine.faults.fail("get", EngineFault(status, message))
        with pytest.raises(expected) as caught:
            await provider.resume(envelope)
        assert not isinstance(caught.value, BoxNotFound), (status, message)
    assert (await (await provider.resume(envelope)).exec(["true"])).exit_code == 0


@pytest.mark.parametrize(
    ("explanation", "expected"),
    [
        ('no container with name or ID "3f2a" found: no such container', BoxNotFound),
        ('the container doesn\'t exists: no container with name or ID "3f2a" found: no such container', BoxNotFound),
        ("no such file or directory", PathNotFound),
        ("no exec session with ID 0f95 found: no such exec session", ProviderError),
        ('no volume with name "sandbox-x-workspace" found: no such volume', ProviderError),
    ],
)
def test_podman_s_not_found_wording_is_read_like_docker_s(explanation: str, expected: type[Exception]) -> None:
    """podman's Docker API words its 404s its own way (seen on the real engine): only a missing container is gone."""
    response = requests.Response()
    response.status_code = 404
    err = docker.errors.NotFound("404 Client Error: Not Found", response=response, explanation=explanation)
    translated = _ERRORS.translate(err)
    assert type(translated) is expected, translated
    assert isinstance(translated, BoxNotFound) == (expected is BoxNotFound)


async def test_a_dropped_connection_or_a_dead_engine_is_unavailable(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    _, _, box = await _box(provider)
    engine.faults.fail("exec", ConnectionResetError("peer went away"))
    with pytest.raises(ProviderUnavailable):
        await box.exec(["true"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    dead = DockerProvider(DockerSettings(host=f"tcp://127.0.0.1:{closed_port}"))
    with pytest.raises(ProviderUnavailable):
        await dead.create(_spec(), "k")
    with pytest.raises(ProviderUnavailable):
        await dead.list_owned()


async def test_a_stopped_container_refuses_exec_as_unavailable_and_resume_starts_it(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    _, _, box = await _box(provider)
    await box.write_file("kept.txt", b"kept")
    api = await _sdk(engine)
    await asyncio.to_thread(api.stop, box.instance_id)
    with pytest.raises(ProviderUnavailable) as caught:
        await box.exec(["true"])
    assert not isinstance(caught.value, BoxNotFound)
    resumed = await provider.resume(box.serialize_state())
    assert await resumed.read_file("kept.txt") == b"kept"
    assert (await resumed.exec(["true"])).exit_code == 0


# -- create: labels, idempotency, image, volume, ports ----------------------------------------------


async def test_containers_carry_ownership_labels_and_a_key_derived_name(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    spec, key, box = await _box(provider)
    container = engine.containers[box.instance_id]
    assert container.labels["sandbox.owner"] == "sandbox-runtime"
    assert container.labels["sandbox.lease_id"] == spec.lease_id
    assert container.labels["sandbox.key"] == key
    assert container.labels["sandbox.epoch"] == "3"
    assert container.name == container_name_for_key("sandbox-runtime", key)
    assert container.host_config["Init"] is True
    # Another deployment's container on the same engine is not ours to sweep.
    other = DockerProvider(DockerSettings(host=engine.base_url, owner="other-runtime"))
    try:
        _, _, theirs = await _box(other, "theirs")
        mine = {o.instance_id for o in await provider.list_owned()}
        assert box.instance_id in mine and theirs.instance_id not in mine
    finally:
        await other.aclose()


async def test_boxes_are_created_hardened_with_the_limits_of_local_boxes(
    engine: FakeDockerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_DOCKER_HOST", engine.base_url)
    limited = build_provider(Settings(local_pids_max=100, local_memory_max="256M", local_cpu_max=0.5))
    default = build_provider(Settings())
    try:
        _, _, box = await _box(limited, "limited")
        _, _, other = await _box(default, "default")
    finally:
        await limited.aclose()
        await default.aclose()
    for container_id, (pids, memory, cpus) in (
        (box.instance_id, (100, 256 * 1024**2, 0.5)),
        (other.instance_id, (512, 2 * 1024**3, 2.0)),
    ):
        container = engine.containers[container_id]
        host_config = container.host_config
        assert container.config["User"] == "1000:1000", "the unprivileged box user, never root"
        assert host_config["SecurityOpt"] == ["no-new-privileges"]
        assert host_config["CapDrop"] == ["ALL"] and not host_config.get("CapAdd")
        assert not host_config.get("Privileged")
        assert (host_config["PidsLimit"], host_config["Memory"], host_config["NanoCpus"] / 1e9) == (pids, memory, cpus)
        assert host_config["MemorySwap"] == memory, "swap included, as for local boxes"
        assert host_config.get("NetworkMode") in (None, "", "default", "bridge")


async def test_concurrent_creates_with_one_key_make_one_container(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    spec = _spec("race")
    boxes = await asyncio.gather(*(provider.create(spec, "the-key") for _ in range(4)))
    assert len({b.instance_id for b in boxes}) == 1
    assert len([c for c in engine.containers.values() if c.labels.get("sandbox.key") == "the-key"]) == 1


async def test_create_adopts_a_stopped_container_of_its_key(provider: DockerProvider, engine: FakeDockerEngine) -> None:
    spec, key, box = await _box(provider)
    api = await _sdk(engine)
    await asyncio.to_thread(api.stop, box.instance_id)
    again = await provider.create(spec, key)
    assert again.instance_id == box.instance_id
    assert engine.containers[box.instance_id].status == "running"


async def test_a_dead_container_of_the_key_is_replaced_not_reported_missing(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    spec, key, box = await _box(provider)
    engine.containers[box.instance_id].status = "dead"
    with pytest.raises(BoxNotFound):
        await provider.resume(box.serialize_state())
    again = await provider.create(spec, key)
    assert again.instance_id != box.instance_id
    assert box.instance_id not in engine.containers
    assert (await again.exec(["true"])).exit_code == 0


async def test_terminate_removes_only_a_workspace_volume_it_named(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    _, _, box = await _box(provider)
    engine.volumes["precious"] = FakeVolume(name="precious", created_at="now")
    forged = Envelope(backend_id="docker", instance_id=box.instance_id, state={"workspaceVolume": "precious"})
    await provider.terminate(forged)
    assert "precious" in engine.volumes
    assert f"{box.name}-workspace" not in engine.volumes


async def test_a_container_the_runtime_does_not_own_is_never_resumed_or_removed(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    api = await _sdk(engine)
    foreign = (await asyncio.to_thread(api.create_container, DEFAULT_IMAGE, command=["sleep", "infinity"]))["Id"]
    await asyncio.to_thread(api.start, foreign)
    envelope = Envelope(backend_id="docker", instance_id=foreign)
    with pytest.raises(InvalidRequest):
        await provider.resume(envelope)
    with pytest.raises(InvalidRequest):
        await provider.terminate(envelope)
    assert engine.containers[foreign].status == "running"
    assert foreign not in {o.instance_id for o in await provider.list_owned()}


async def test_a_missing_image_is_pulled_once_or_fails_as_a_provider_error(
    engine: FakeDockerEngine,
) -> None:
    engine.registry.add("ghcr.io/example/desktop:1")
    pulled = DockerProvider(DockerSettings(host=engine.base_url, image="ghcr.io/example/desktop:1"))
    missing = DockerProvider(DockerSettings(host=engine.base_url, image="nowhere/desktop:9"))
    try:
        box = await pulled.create(_spec(), "pull")
        assert (await box.exec(["true"])).exit_code == 0
        assert ("POST", "/images/create") in engine.requests
        with pytest.raises(ProviderError) as caught:
            await missing.create(_spec(), "missing")
        assert not isinstance(caught.value, BoxNotFound | ProviderUnavailable)
        assert "deploy/desktop" in caught.value.message
    finally:
        await pulled.aclose()
        await missing.aclose()


async def test_named_workspace_volume_lives_and_dies_with_the_box(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    _, _, box = await _box(provider)
    volume = f"{box.name}-workspace"
    mount = engine.containers[box.instance_id].mounts[0]
    assert (mount["Type"], mount["Name"], mount["Destination"]) == ("volume", volume, "/workspace")
    assert volume in engine.volumes
    await provider.terminate(Envelope(backend_id="docker", instance_id=box.instance_id))
    assert volume not in engine.volumes
    assert box.instance_id not in engine.containers


async def test_a_volume_whose_container_is_gone_is_listed_and_removed_a_mounted_or_foreign_one_never(
    provider: DockerProvider, engine: FakeDockerEngine
) -> None:
    spec, _, lost = await _box(provider, "lost")
    _, _, live = await _box(provider, "live")
    volume, live_volume = f"{lost.name}-workspace", f"{live.name}-workspace"
    assert engine.volumes[volume].labels["sandbox.lease_id"] == spec.lease_id, "made with the box's labels"
    listed = {o.instance_id for o in await provider.list_owned()}
    assert volume not in listed and live_volume not in listed, "a mounted volume is its box's, never listed"
    del engine.containers[lost.instance_id]  # `docker rm -f` behind the runtime's back: the volume stays
    foreign = f"sandbox-{'f' * 24}-workspace"
    engine.volumes[foreign] = FakeVolume(name=foreign, created_at="now", labels={"sandbox.owner": "someone-else"})

    owned = {o.instance_id: o for o in await provider.list_owned()}
    assert volume in owned and owned[volume].lease_id == spec.lease_id and owned[volume].labels["epoch"] == "3"
    assert foreign not in owned and live_volume not in owned
    await provider.terminate(Envelope(backend_id="docker", instance_id=volume))
    assert volume not in engine.volumes
    await provider.terminate(Envelope(backend_id="docker", instance_id=volume))  # idempotent
    with pytest.raises(InvalidRequest):
        await provider.terminate(Envelope(backend_id="docker", instance_id=foreign))
    await provider.terminate(Envelope(backend_id="docker", instance_id=live_volume))  # mounted: left alone
    assert foreign in engine.volumes and live_volume in engine.volumes
    assert (await live.exec(["true"])).exit_code == 0


async def test_workspace_base_dir_binds_a_host_directory_per_box(engine: FakeDockerEngine, tmp_path: Path) -> None:
    base = tmp_path / "workspaces"
    provider = DockerProvider(DockerSettings(host=engine.base_url, workspace_base_dir=str(base)))
    try:
        _, _, box = await _box(provider)
        mount = engine.containers[box.instance_id].mounts[0]
        assert (mount["Type"], mount["Source"], mount["Destination"]) == (
            "bind",
            str(base / box.name),
            "/workspace",
        )
        await provider.terminate(box.serialize_state())
        assert (base / box.name).is_dir(), "the operator's directory is kept"
        assert not engine.volumes
    finally:
        await provider.aclose()


async def test_exposed_ports_resolve_to_the_published_host_ports(engine: FakeDockerEngine) -> None:
    provider = DockerProvider(DockerSettings(host=engine.base_url, exposed_ports="8000"))
    try:
        _, _, box = await _box(provider)
        bindings = engine.containers[box.instance_id].ports
        for port in (8000, 6080, 7681, 7682):
            endpoint = await box.resolve_exposed_port(port)
            assert endpoint.host == "127.0.0.1"
            assert str(endpoint.port) == bindings[f"{port}/tcp"][0]["HostPort"]  # type: ignore[index]
        assert len({(await box.resolve_exposed_port(p)).port for p in (8000, 6080, 7681, 7682)}) == 4
        with pytest.raises(StreamPortUnavailable):
            await box.resolve_exposed_port(9999)
        with pytest.raises(InvalidRequest):
            await box.resolve_exposed_port(0)
    finally:
        await provider.aclose()


async def test_on_a_user_network_ports_are_reached_by_short_id(engine: FakeDockerEngine) -> None:
    provider = DockerProvider(DockerSettings(host=engine.base_url, network="sandbox-net"))
    try:
        _, _, box = await _box(provider)
        assert engine.containers[box.instance_id].host_config["NetworkMode"] == "sandbox-net"
        endpoint = await box.resolve_exposed_port(6080)
        assert (endpoint.host, endpoint.port) == (box.instance_id[:12], 6080)
    finally:
        await provider.aclose()


# -- exec and files --------------------------------------------------------------------------------


async def test_exec_stdin_is_binary_safe_and_leaves_no_file(provider: DockerProvider) -> None:
    _, _, box = await _box(provider)
    payload = bytes(range(256)) * 300
    done = await box.exec(["sh", "-c", "cat; echo done >&2"], stdin=payload)
    assert (done.exit_code, done.stdout, done.stderr) == (0, payload, b"done\n")
    left = await box.exec(["sh", "-c", "ls -A /tmp | grep -c sandbox-stdin || true"])
    assert left.stdout.strip() == b"0"


async def test_exec_timeout_kills_the_whole_process_group(provider: DockerProvider) -> None:
    _, _, box = await _box(provider)
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as caught:
        await box.exec(["sh", "-c", "(sleep 2; touch /tmp/late) & sleep 30"], timeout=0.5)
    assert caught.value.timeout == 0.5
    assert time.monotonic() - started < 10
    await asyncio.sleep(2.5)
    assert not await box.path_exists("/tmp/late"), "the background child died with the command"
    # A command that exits 124 on its own, before its timeout, is an ordinary exit code.
    assert (await box.exec(["sh", "-c", "exit 124"], timeout=30)).exit_code == 124
    with pytest.raises(InvalidRequest):
        await box.exec(["true"], timeout=0)
    with pytest.raises(InvalidRequest):
        await box.exec([])


async def test_files_follow_symlinks_keep_modes_and_refuse_directories(provider: DockerProvider) -> None:
    _, _, box = await _box(provider)
    await box.write_file("bin/run.sh", b"#!/bin/sh\necho one\n")
    await box.exec(["chmod", "755", "bin/run.sh"])
    await box.write_file("bin/run.sh", b"#!/bin/sh\necho two\n")
    assert (await box.exec(["bin/run.sh"])).stdout == b"two\n", "rewriting a file keeps its mode"
    await box.exec(["ln", "-s", "bin/run.sh", "link"])
    assert await box.read_file("link") == b"#!/bin/sh\necho two\n"
    await box.write_file("link", b"via link\n")
    assert await box.read_file("bin/run.sh") == b"via link\n"
    assert (await box.list_dir("."))[-1].kind == "symlink"
    with pytest.raises(InvalidRequest):
        await box.read_file("bin")
    with pytest.raises(InvalidRequest):
        await box.write_file("bin", b"x")
    with pytest.raises(InvalidRequest):
        await box.list_dir("bin/run.sh")
    with pytest.raises(PathNotFound):
        await box.list_dir("nowhere")
    await box.write_file("/tmp/abs/deep.bin", b"\x00\xff")
    assert await box.read_file("/tmp/abs/deep.bin") == b"\x00\xff"


async def test_a_gone_box_is_not_found_for_files_too(provider: DockerProvider) -> None:
    _, _, box = await _box(provider)
    await provider.terminate(box.serialize_state())
    for call in (
        lambda: box.read_file("a"),
        lambda: box.write_file("a", b"x"),
        lambda: box.path_exists("a"),
        lambda: box.list_dir("."),
        lambda: box.resolve_exposed_port(6080),
    ):
        with pytest.raises(BoxNotFound):
            await call()


async def test_latency_is_added_to_every_engine_call(provider: DockerProvider, engine: FakeDockerEngine) -> None:
    _, _, box = await _box(provider)
    engine.faults.latency = 0.2
    started = time.monotonic()
    assert (await box.exec(["true"])).exit_code == 0
    # exec create, exec start, exec inspect: three engine calls.
    assert time.monotonic() - started >= 0.6
    assert engine.faults.calls["exec"] >= 1


# -- the image ----------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comment lines dropped."""
    logical: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += " " + line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_desktop_image_has_the_planes_tools_and_the_inbox_scripts() -> None:
    instructions = _instructions(REPO / "deploy" / "desktop" / "Dockerfile")
    runs = " ".join(args for op, args in instructions if op == "RUN").split()
    for package in (
        "xvfb",
        "x11vnc",
        "xauth",
        "websockify",
        "novnc",
        "ttyd",
        "ffmpeg",
        "xdotool",
        "imagemagick",
        "git",
    ):
        assert package in runs, package
    froms = [args for op, args in instructions if op == "FROM"]
    # The box is FROM the Debian base deploy/images/build makes locally (no registry can be pulled from).
    assert froms and froms[-1] == "${BASE}"
    assert ("ARG", "BASE=localhost/sandbox-base:bookworm") in instructions
    build = (REPO / "deploy" / "images" / "build").read_text()
    assert "debootstrap --variant=minbase" in build and "bookworm" in build, "the box itself is Debian"
    copies = " ".join(args for op, args in instructions if op == "COPY")
    for name in SCRIPT_NAMES:
        assert f"sandbox/scripts/{name}" in copies
        assert (REPO / "sandbox" / "scripts" / name).is_file()
    assert copies.rstrip().endswith("/usr/local/bin/")
    envs = " ".join(args for op, args in instructions if op == "ENV")
    assert "SANDBOX_EDGE_PYTHON=/opt/sandbox-edge/bin/python" in envs
