"""deploy/compose.yaml brought up for real with podman-compose: a lease on its workers, then nothing left.

The stack runs the images deploy/images/build made (``compose``, built once after collection,
``tests/conftest.py``): the `secrets` one-shot, Temporal, PostgreSQL, NATS with the runtime's
nkey authorization, moto's S3 and two worker replicas that create boxes through the session's
engine socket (``tests/container_engine.py``). The test waits on every service's own health check
(run with ``podman healthcheck run``: podman 4.3 schedules them through systemd, absent here), then
acts as a user's scheduler would: a :class:`~client.lease_client.LeaseClient` against the
compose Temporal acquires a lease on the docker backend, runs a command, drains with a capture,
restores into a new box and finds the file. ``down -v`` then leaves no container, volume or
network of the project, and no box or box volume. Skipped only when podman is absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from sandbox.settings import Settings
from tests.conftest import REPO, eventually, free_port
from tests.container_engine import ContainerEngine, engine_environment, require_podman

pytestmark = [pytest.mark.container_engine, pytest.mark.compose_stack, pytest.mark.timeout(600)]

COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SERVICES = ("secrets", "temporal", "postgres", "nats", "s3", "worker-1", "worker-2")
HEALTHY = ("temporal", "postgres", "nats", "s3", "worker-1", "worker-2")
_UP_TIMEOUT = 300.0


def podman_compose() -> str:
    """podman-compose (a dev dependency, next to the interpreter); skips only when podman is absent."""
    require_podman()
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    assert found, "podman-compose is a dev dependency (pyproject.toml): bash scripts/install installs it"
    return found


@dataclass
class Stack:
    """One compose project of this test, and what a client needs to reach it."""

    project: str
    env_file: Path
    secrets_dir: Path
    owner: str
    temporal_port: int
    postgres_port: int
    postgres_password: str
    log: Path

    def environment(self) -> dict[str, str]:
        """The environment podman-compose runs with: the engine settings, nothing of the test session's."""
        keep = {k: v for k, v in engine_environment().items() if not k.startswith(("SANDBOX_", "POSTGRES_", "S3_"))}
        return keep

    def compose(self, *args: str, timeout: float = _UP_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``podman-compose -p PROJECT -f deploy/compose.yaml --env-file ENV ARGS``; its output goes to the log."""
        argv = [podman_compose(), "-p", self.project, "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file)]
        done = subprocess.run(
            [*argv, *args], env=self.environment(), capture_output=True, text=True, timeout=timeout, check=False
        )
        with self.log.open("a") as log:
            log.write(f"$ podman-compose {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}\n")
        if check and done.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        """The container name podman-compose gives ``service``."""
        return f"{self.project}_{service}_1"

    def client_settings(self) -> Settings:
        """What a user's scheduler on the host sets: the published Temporal and store, the shared secrets."""
        data_dir = self.secrets_dir / "worker"
        return Settings(
            data_dir=data_dir,
            temporal_address=f"127.0.0.1:{self.temporal_port}",
            database_url=(
                f"postgresql+psycopg://sandbox:{self.postgres_password}@127.0.0.1:{self.postgres_port}/sandbox"
            ),
            payload_keys=SecretStr((data_dir / "secrets" / "payload-keys.json").read_text()),
            default_backend="docker",
        )


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_podman(), *args], env=engine_environment(), capture_output=True, text=True, timeout=120, check=check
    )


def _project_leftovers(project: str) -> dict[str, list[str]]:
    """Containers, volumes and networks podman still has of ``project``."""
    label = f"label=io.podman.compose.project={project}"
    found = {
        "containers": _podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split(),
        "volumes": _podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split(),
        "networks": [n for n in _podman("network", "ls", "--format", "{{.Name}}").stdout.split() if project in n],
    }
    return found


def _boxes(owner: str) -> list[str]:
    return _podman("ps", "-a", "--filter", f"label=sandbox.owner={owner}", "--format", "{{.Names}}").stdout.split()


@pytest.fixture
def stack(container_engine: ContainerEngine, tmp_path: Path) -> Iterator[Stack]:
    """The compose project, up; taken down (``down -v``) whatever the test did."""
    podman_compose()
    socket_path = container_engine.host.removeprefix("unix://")
    # `podman system service` makes its socket 0600; the workers (uid 10001) reach it through its
    # group, as they reach podman.socket's (0660) or Docker's (group docker) in a deployment.
    os.chmod(socket_path, 0o660)
    project = f"sbxsmoke{uuid.uuid4().hex[:8]}"
    stack = Stack(
        project=project,
        env_file=tmp_path / "compose.env",
        secrets_dir=tmp_path / "secrets",
        owner=f"{container_engine.owner}-compose",
        temporal_port=free_port(),
        postgres_port=free_port(),
        postgres_password=secrets.token_hex(16),
        log=tmp_path / "compose.log",
    )
    values = {
        "POSTGRES_PASSWORD": stack.postgres_password,
        "S3_ACCESS_KEY_ID": "smoke",
        "S3_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "SANDBOX_SECRETS_DIR": str(stack.secrets_dir),
        "SANDBOX_ENGINE_SOCKET": socket_path,
        "SANDBOX_ENGINE_SOCKET_GID": str(os.stat(socket_path).st_gid),
        "SANDBOX_DOCKER_IMAGE": container_engine.image,
        "SANDBOX_DOCKER_OWNER": stack.owner,
        "TEMPORAL_PORT": str(stack.temporal_port),
        "TEMPORAL_UI_PORT": str(free_port()),
        "POSTGRES_PORT": str(stack.postgres_port),
    }
    stack.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    try:
        stack.compose("up", "-d")
        yield stack
    finally:
        stack.compose("down", "-v", "-t", "30", check=False)
        # what a failed test may have left: its boxes (the engine fixture removes its own owner's only)
        for name in _boxes(stack.owner):
            _podman("rm", "-f", "-v", name, check=False)


async def _healthy(stack: Stack, service: str) -> bool:
    """Whether ``service``'s own health check passes now (run once; podman records the result)."""
    done = await asyncio.to_thread(_podman, "healthcheck", "run", stack.container(service), check=False)
    return done.returncode == 0


async def _exit_code(stack: Stack, service: str) -> tuple[int] | None:
    """``(exit code,)`` once ``service`` has exited, else None."""
    done = await asyncio.to_thread(
        _podman, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", stack.container(service)
    )
    status, code = done.stdout.split()
    return (int(code),) if status == "exited" else None


async def test_the_compose_stack_runs_a_lease_on_the_docker_backend_and_leaves_nothing(
    stack: Stack, container_engine: ContainerEngine
) -> None:
    from client.lease_client import LeaseClient
    from worker import connect

    started = time.monotonic()
    running = _podman(
        "ps", "-a", "--filter", f"label=io.podman.compose.project={stack.project}", "--format", "{{.Names}}"
    ).stdout.split()
    assert sorted(running) == sorted(stack.container(s) for s in SERVICES)
    assert await eventually(lambda: _exit_code(stack, "secrets"), timeout=60) == (0,), "the secrets one-shot succeeded"
    for service in HEALTHY:
        await eventually(lambda service=service: _healthy(stack, service), timeout=_UP_TIMEOUT, interval=1.0)
    healthy_in = time.monotonic() - started

    # The images run as their services' own users, not root.
    for service, user in {"worker-1": "10001", "temporal": "10003", "nats": "10002", "s3": "10004"}.items():
        assert _podman("exec", stack.container(service), "id", "-u").stdout.strip() == user, service
    assert _podman("exec", stack.container("postgres"), "id", "-un").stdout.strip() == "postgres"
    # NATS refuses an anonymous connection and takes the runtime's nkey (positive control).
    probe = (
        "import asyncio, nats, pathlib\n"
        "async def main(seed):\n"
        "    try:\n"
        "        c = await nats.connect('nats://nats:4222', nkeys_seed_str=seed, max_reconnect_attempts=0,"
        " connect_timeout=3, allow_reconnect=False)\n"
        "    except Exception as e:\n"
        "        return 'refused'\n"
        "    await c.close(); return 'connected'\n"
        "seed = pathlib.Path('/var/lib/sandbox/secrets/nats/runtime.nk').read_text().strip()\n"
        "print(asyncio.run(main(None)), asyncio.run(main(seed)))\n"
    )
    outcome = _podman("exec", stack.container("worker-1"), "python", "-c", probe).stdout.split()
    assert outcome == ["refused", "connected"]

    settings = stack.client_settings()
    leases = LeaseClient(await connect(settings), settings)
    ws, g = f"compose-{uuid.uuid4().hex[:8]}", "g1"
    try:
        grant = await leases.acquire(ws, g, holder_id="smoke", backend="docker")
        boxes = _boxes(stack.owner)
        made = set(boxes)
        assert len(boxes) == 1, "the box was made through the engine socket, labelled with the deployment's owner"
        out = await leases.exec(ws, g, ["sh", "-c", "echo from-compose > /workspace/kept.txt && id -u"])
        assert (out.exit_code, out.stdout) == (0, "1000\n"), out
        await leases.heartbeat(ws, g, "smoke", grant.epoch)  # recorded in the compose PostgreSQL

        drained = await leases.drain(ws, g, wait=True)
        assert drained.liveness == "cold"
        assert drained.archive_current is not None and drained.archive_current.epoch == grant.epoch, (
            "the drain captured the workspace into the S3 store"
        )
        assert _boxes(stack.owner) == [], "the drained box is gone"

        again = await leases.acquire(ws, g, holder_id="smoke2", backend="docker")
        assert again.instance_id != grant.instance_id
        made.update(_boxes(stack.owner))
        out = await leases.exec(ws, g, ["cat", "/workspace/kept.txt"])
        assert (out.exit_code, out.stdout) == (0, "from-compose\n"), out
        assert (await leases.describe(ws, g)).restore_status == "restored"
        await leases.drain(ws, g, wait=True)
    finally:
        leases.close()
    lease_in = time.monotonic() - started - healthy_in

    up = _project_leftovers(stack.project)
    assert (len(up["containers"]), len(up["volumes"]), len(up["networks"])) == (len(SERVICES), 3, 1), (
        "the leftover check sees the project's containers, volumes (temporal, postgres, nats) and network"
    )
    stack.compose("down", "-v", "-t", "30")
    leftovers = _project_leftovers(stack.project)
    assert leftovers == {"containers": [], "volumes": [], "networks": []}, leftovers
    assert _boxes(stack.owner) == [], "no box container is left"
    assert len(made) == 2
    volumes = set(_podman("volume", "ls", "--format", "{{.Name}}").stdout.split())
    assert volumes.isdisjoint(f"{name}-workspace" for name in made), "no box workspace volume is left"
    print(
        json.dumps(
            {
                "healthy_s": round(healthy_in, 1),
                "lease_s": round(lease_in, 1),
                "total_s": round(time.monotonic() - started, 1),
            }
        )
    )
