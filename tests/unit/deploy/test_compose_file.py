"""deploy/compose.yaml read as a user's compose would, without an engine: what it promises holds.

Every worker setting is one the runtime reads (a misspelt ``SANDBOX_*`` is silently ignored by
pydantic-settings, so a typo here would quietly run a worker on defaults), the settings it makes
pass the worker's boot checks, the dev server registers the lease workflow's search attributes,
every long-running service has a health check and a restart policy, no image comes from a
registry, and no secret is written in the file. The stack itself runs in ``test_compose.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from providers.docker import DockerSettings
from sandbox.settings import Settings
from tests.conftest import REPO
from workflows.server_settings import dev_server_flags

COMPOSE = REPO / "deploy" / "compose.yaml"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``, from ``env``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _VARIABLE.sub(one, value)


def _example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z0-9_]+=", line))
    return dict(pairs)


def _worker_environment(env: dict[str, str]) -> dict[str, str]:
    worker = _compose()["services"]["worker-1"]
    return {key: _interpolate(str(value), env) for key, value in worker["environment"].items()}


def test_both_workers_are_the_same_worker() -> None:
    services = _compose()["services"]
    assert services["worker-1"] == services["worker-2"]
    assert services["worker-1"]["image"].endswith("sandbox-worker:latest}")


def test_every_worker_setting_is_one_the_runtime_reads() -> None:
    known = {f"SANDBOX_{name.upper()}" for name in Settings.model_fields} | {
        f"SANDBOX_DOCKER_{name.upper()}" for name in DockerSettings.model_fields
    }
    unknown = sorted(set(_worker_environment(_example_env())) - known)
    assert unknown == [], f"settings no part of the runtime reads: {unknown}"


def test_the_workers_settings_pass_the_boot_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    for key, value in _worker_environment(_example_env()).items():
        monkeypatch.setenv(key, value)
    settings = Settings().check()
    assert settings.default_backend == "docker"
    assert settings.resolved_database_url().startswith("postgresql+psycopg://sandbox:change-me@postgres:5432/")
    assert (settings.artifacts_url, settings.s3_endpoint) == ("s3://sandbox-artifacts/workspaces", "http://s3:9000")
    assert settings.nats_auth == "on" and settings.payload_encryption, "auth and history encryption stay on"
    assert settings.data_dir == Path("/var/lib/sandbox"), "the shared secrets' mount"
    docker = DockerSettings()
    docker.validate()
    assert docker.host == "unix:///run/sandbox/engine.sock"


def test_a_missing_password_is_refused_with_its_name() -> None:
    env = _example_env()
    del env["POSTGRES_PASSWORD"]
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _worker_environment(env)


def test_the_dev_server_gets_every_flag_the_runtime_needs() -> None:
    # The lease search attributes and the update admission limit (workflows/server_settings.py).
    command = _compose()["services"]["temporal"]["command"]
    given = [arg for arg in command if arg.startswith(("--search-attribute=", "--dynamic-config-value="))]
    flags = dev_server_flags()
    wanted = [f"{flag}={value}" for flag, value in zip(flags[::2], flags[1::2], strict=True)]
    assert given == wanted, "workflows/server_settings.py and the compose dev server agree"


def test_services_are_checked_restarted_and_built_here() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        image = _interpolate(service["image"], {})
        assert image.startswith("localhost/sandbox-"), f"{name}: built by deploy/images/build, never pulled"
        if name == "secrets":
            assert service["restart"] == "no", "a one-shot"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_no_secret_is_written_in_the_file() -> None:
    secret_keys = re.compile(r"^\s*[A-Z0-9_]*(PASSWORD|SECRET|KEY_ID|KEYS|TOKEN)[A-Z0-9_]*:\s*(?P<value>.*)$")
    checked = 0
    for line in COMPOSE.read_text().splitlines():
        found = secret_keys.match(line)
        if found:
            checked += 1
            assert found["value"].startswith("${"), f"a secret comes from the env file: {line.strip()}"
    assert checked >= 3, "the password and the S3 keys were seen"
    url = _compose()["services"]["worker-1"]["environment"]["SANDBOX_DATABASE_URL"]
    assert re.fullmatch(r"postgresql\+psycopg://sandbox:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/sandbox", url)
