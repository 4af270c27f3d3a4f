"""The provider registry and `sandboxctl providers`: every backend builds offline; errors name the setting."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import _register, app
from providers.registry import (
    PROVIDER_MODULES,
    RUNNABLE_BACKENDS,
    ProviderRegistry,
    create_sandbox_client,
    create_sandbox_client_for_backend,
)
from sandbox.descriptors import SANDBOX_BACKENDS, select_backend
from sandbox.errors import SandboxConfigError, UnknownBackend, Unsupported
from sandbox.settings import Settings

# The least each backend needs to build its client (values are never sent anywhere: nothing dials out).
STUB_ENV: dict[str, dict[str, str]] = {
    "modal": {"SANDBOX_MODAL_APP_NAME": "sandbox-test"},
    "e2b": {"SANDBOX_E2B_API_KEY": "e2b_0123456789abcdef"},
    "daytona": {"SANDBOX_DAYTONA_API_KEY": "dtn_0123456789abcdef"},
    "runloop": {"SANDBOX_RUNLOOP_API_KEY": "ak_0123456789abcdef"},
    "blaxel": {"SANDBOX_BLAXEL_API_KEY": "bl_0123456789abcdef", "SANDBOX_BLAXEL_WORKSPACE": "sandbox-test"},
    "vercel": {"SANDBOX_VERCEL_TOKEN": "vc_0123456789abcdef", "SANDBOX_VERCEL_PROJECT_ID": "prj_0123456789"},
    "cloudflare": {"SANDBOX_CLOUDFLARE_WORKER_URL": "https://sandbox.example.workers.dev"},
}
REQUIRED: dict[str, str] = {
    "modal": "SANDBOX_MODAL_APP_NAME",
    "e2b": "SANDBOX_E2B_API_KEY",
    "daytona": "SANDBOX_DAYTONA_API_KEY",
    "runloop": "SANDBOX_RUNLOOP_API_KEY",
    "blaxel": "SANDBOX_BLAXEL_API_KEY",
    "vercel": "SANDBOX_VERCEL_TOKEN",
    "cloudflare": "SANDBOX_CLOUDFLARE_WORKER_URL",
}


def _built(backend: str) -> bool:
    # Backends whose provider module is in this tree (all of PROVIDER_MODULES once issue 8 is complete).
    import importlib.util

    return importlib.util.find_spec(PROVIDER_MODULES[backend]) is not None


BUILT = [b for b in RUNNABLE_BACKENDS if _built(b)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(("SANDBOX_", "MODAL_", "E2B_", "DAYTONA_", "RUNLOOP_", "BL_", "VERCEL_", "DOCKER_")):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _settings(tmp_path: object) -> Settings:
    return Settings(data_dir=tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BUILT)
def test_every_runnable_backend_builds_offline_with_the_descriptors_backend_id(
    backend: str, clean_env: pytest.MonkeyPatch, tmp_path: object
) -> None:
    for name, value in STUB_ENV.get(backend, {}).items():
        clean_env.setenv(name, value)
    provider = create_sandbox_client_for_backend(backend, _settings(tmp_path))
    assert provider.backend_id == select_backend(backend).backend_id
    assert provider.descriptor.backend == backend


@pytest.mark.parametrize("backend", [b for b in sorted(REQUIRED) if b in BUILT])
def test_a_missing_required_setting_is_named(backend: str, clean_env: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name, value in STUB_ENV[backend].items():
        if name != REQUIRED[backend]:
            clean_env.setenv(name, value)
    with pytest.raises(SandboxConfigError) as caught:
        create_sandbox_client_for_backend(backend, _settings(tmp_path))
    assert REQUIRED[backend] in caught.value.message
    assert f"[sandbox:{backend}]" in caught.value.message


def test_unknown_and_unbuilt_backends_are_typed(tmp_path: object) -> None:
    with pytest.raises(UnknownBackend):
        create_sandbox_client_for_backend("Modal", _settings(tmp_path))
    assert "opensandbox" in SANDBOX_BACKENDS and "opensandbox" not in PROVIDER_MODULES
    with pytest.raises(Unsupported):
        create_sandbox_client_for_backend("opensandbox", _settings(tmp_path))


def test_default_client_and_registry_overrides(tmp_path: object) -> None:
    settings = Settings(data_dir=tmp_path, default_backend="none")  # type: ignore[arg-type]
    assert create_sandbox_client(settings).backend_id == "none"
    injected = create_sandbox_client(settings)
    registry = ProviderRegistry(settings, providers={"modal": injected})
    assert registry.get("modal") is injected, "a ready-made provider is used as is"
    assert registry.get("none") is registry.get("none")


def test_cli_check_names_the_missing_setting_and_exits_2(clean_env: pytest.MonkeyPatch) -> None:
    _register()
    runner = CliRunner()
    backend = next((b for b in ("modal", "e2b", "cloudflare") if b in BUILT), None)
    if backend is not None:
        missing = runner.invoke(app, ["providers", "check", backend])
        assert missing.exit_code == 2
        assert REQUIRED[backend] in missing.output
        for name, value in STUB_ENV[backend].items():
            clean_env.setenv(name, value)
        ok = runner.invoke(app, ["providers", "check", backend, "--json"])
        assert ok.exit_code == 0, ok.output
        row = json.loads(ok.stdout)
        assert row["configured"] is True and row["backend_id"] == backend
    listed = json.loads(runner.invoke(app, ["providers", "list", "--json"]).stdout)
    assert [r["backend"] for r in listed] == list(SANDBOX_BACKENDS)
    assert next(r for r in listed if r["backend"] == "local")["configured"] is True
    assert runner.invoke(app, ["providers", "check", "nope"]).exit_code == 2
