"""A real container engine for the tests: podman serving the Docker Engine API on a socket of its own.

``podman system service`` is started on ``<dir>/podman.sock`` with the project's engine settings
(``deploy/images/containers.conf``: runc, default ulimits), and the box image is built by
``deploy/images/build`` (cached by content hash, so once it is built this costs a few inspects).
Tests that need the engine carry the ``container_engine`` mark: the session builds the images once,
after collection and before any test's timer runs (``tests/conftest.py``), and a test without
podman on the machine is skipped, the only reason it may be (``scripts/install`` installs podman).

Every box a session creates carries the session's own owner label, so the orphan views of two
sessions never meet and the session removes what its tests left behind (containers and their
workspace volumes), then stops the service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = REPO / "deploy" / "images" / "containers.conf"
BUILD = REPO / "deploy" / "images" / "build"
BOX_IMAGE = "sandbox-desktop:latest"
_START_TIMEOUT = 30.0
_BUILD_TIMEOUT = 1200.0


def podman() -> str | None:
    """The podman binary, or None when it is not installed."""
    return shutil.which("podman")


def engine_environment() -> dict[str, str]:
    """The environment podman commands and the service run with (the project's engine settings)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def require_podman() -> str:
    """The podman binary; skips the calling test when it is missing (the only reason to skip)."""
    found = podman()
    if found is None:
        pytest.skip("podman is not installed: bash scripts/install installs it (the real-engine tests need it)")
    return found


def build_images(target: str = "box") -> float:
    """Build (or find current) ``target`` with ``deploy/images/build``; returns the seconds it took.

    ``box`` is the box image; ``compose`` every image ``deploy/compose.yaml`` runs, the box's too.

    Raises:
        RuntimeError: the build failed; the message carries the script's output.
    """
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(BUILD), target],
        env={**engine_environment(), "SANDBOX_DOCKER_IMAGE": BOX_IMAGE, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=_BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"deploy/images/build {target} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return time.monotonic() - started


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            status = s.recv(64).split(b"\r\n", 1)[0]
            return status.startswith(b"HTTP/1.") and b" 200 " in status + b" "
    except OSError:
        return False


@dataclass
class ContainerEngine:
    """A running engine and what a provider needs to use it.

    Attributes:
        host: ``SANDBOX_DOCKER_HOST`` for it (``unix://<dir>/podman.sock``).
        image: The box image (``SANDBOX_DOCKER_IMAGE``).
        owner: The ``sandbox.owner`` label of this session's boxes (``SANDBOX_DOCKER_OWNER``).
        started_in: Seconds from spawning the service to its first answer.
    """

    host: str
    image: str
    owner: str
    started_in: float
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def environment(self) -> dict[str, str]:
        """``SANDBOX_DOCKER_*`` for a runtime (or a CLI) that should use this engine."""
        return {
            "SANDBOX_DOCKER_HOST": self.host,
            "SANDBOX_DOCKER_IMAGE": self.image,
            "SANDBOX_DOCKER_OWNER": self.owner,
        }

    def remove_owned(self) -> int:
        """Remove every container of this session's owner and its workspace volume; returns how many."""
        import docker  # type: ignore[import-untyped]

        client = docker.DockerClient(base_url=self.host, timeout=60)
        try:
            api = client.api
            found = api.containers(all=True, filters={"label": [f"sandbox.owner={self.owner}"]})
            for summary in found:
                volume = (summary.get("Labels") or {}).get("sandbox.workspace_volume")
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_container(summary["Id"], v=True, force=True)
                if volume:
                    with contextlib.suppress(docker.errors.APIError):
                        api.remove_volume(volume)
            # Workspace volumes whose container a test removed behind the runtime's back.
            leftovers = api.volumes(filters={"label": [f"sandbox.owner={self.owner}"]}).get("Volumes") or []
            for leftover in leftovers:
                with contextlib.suppress(docker.errors.APIError):
                    api.remove_volume(leftover["Name"])
            return len(found)
        finally:
            client.close()


@contextlib.contextmanager
def running_engine(directory: Path) -> Iterator[ContainerEngine]:
    """Start ``podman system service`` on ``directory/podman.sock``, yield it, then clean up and stop it.

    Skips when podman is not installed. Raises RuntimeError when the service does not answer.
    """
    binary = require_podman()
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "podman.sock"
    log = (directory / "podman-service.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        [binary, "system", "service", "--time=0", f"unix://{sock}"],
        env=engine_environment(),
        # conmon writes an empty "oom" file into its working directory when a box hits its memory limit
        cwd=directory,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    engine = ContainerEngine(
        host=f"unix://{sock}",
        image=BOX_IMAGE,
        owner=f"test-{uuid.uuid4().hex[:12]}",
        started_in=0.0,
        _process=process,
    )
    try:
        deadline = started + _START_TIMEOUT
        while not (sock.exists() and _ping(sock)):
            if process.poll() is not None:
                raise RuntimeError(
                    f"podman system service exited with {process.returncode}: "
                    f"{(directory / 'podman-service.log').read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not answer on {sock} within {_START_TIMEOUT} s")
            time.sleep(0.02)
        engine.started_in = time.monotonic() - started
        yield engine
    finally:
        try:
            if process.poll() is None and sock.exists():
                engine.remove_owned()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()


_session: ContainerEngine | None = None


def session_engine() -> ContainerEngine | None:
    """The engine the test session started (``tests/conftest.py``), if any."""
    return _session


def set_session_engine(engine: ContainerEngine | None) -> None:
    """Record (or forget) the session's engine, for harnesses that are not fixtures."""
    global _session
    _session = engine
