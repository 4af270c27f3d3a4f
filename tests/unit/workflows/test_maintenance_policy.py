"""Which backends the orphan sweep lists, from settings."""

from __future__ import annotations

from pathlib import Path

from sandbox.settings import Settings
from workflows.schedules import MaintenancePolicy


def test_sweep_covers_local_and_the_default_cloud_backend(tmp_path: Path) -> None:
    assert MaintenancePolicy.from_settings(Settings(data_dir=tmp_path)).orphan_backends == ["local"]
    modal = Settings(data_dir=tmp_path, default_backend="modal")
    assert MaintenancePolicy.from_settings(modal).sweep_input().backends == ["local", "modal"]
    selfhosted = Settings(data_dir=tmp_path, default_backend="selfhosted")
    assert MaintenancePolicy.from_settings(selfhosted).orphan_backends == ["local"]
    explicit = Settings(data_dir=tmp_path, orphan_sweep_backends="docker, e2b")
    assert MaintenancePolicy.from_settings(explicit).orphan_backends == ["docker", "e2b"]
