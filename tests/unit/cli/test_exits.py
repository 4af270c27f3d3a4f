"""The one place ``sandboxctl`` maps the client's typed errors to exit codes and one-line messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from cli.exits import EXIT_BAD_SETTINGS, EXIT_REFUSED, EXIT_UNREACHABLE, load_settings, run
from client.connection import TemporalUnreachable
from sandbox.errors import StaleEpoch
from sandbox.settings import Settings


def exit_of(settings: Settings, error: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    async def action() -> None:
        raise error

    with pytest.raises(typer.Exit) as caught:
        run(settings, action)
    return caught.value.exit_code, capsys.readouterr().err


def test_unreachable_temporal_exits_3_and_says_to_start_the_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path)
    err = TemporalUnreachable("cannot reach Temporal at 127.0.0.1:1 (refused)", address="127.0.0.1:1")
    code, stderr = exit_of(settings, err, capsys)
    assert code == EXIT_UNREACHABLE
    assert "cannot reach Temporal at 127.0.0.1:1" in stderr and "sandboxctl up" in stderr and str(tmp_path) in stderr


def test_a_refusal_exits_2_with_its_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = exit_of(Settings(data_dir=tmp_path), StaleEpoch("the lease is at epoch 3"), capsys)
    assert code == EXIT_REFUSED and "StaleEpoch: the lease is at epoch 3" in stderr


def test_a_result_passes_through(tmp_path: Path) -> None:
    async def action() -> int:
        return 7

    assert run(Settings(data_dir=tmp_path), action) == 7


def test_malformed_settings_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SANDBOX_HOLDER_TTL_SECONDS", "soon")
    with pytest.raises(typer.Exit) as caught:
        load_settings(None)
    assert caught.value.exit_code == EXIT_BAD_SETTINGS and "SANDBOX_" in capsys.readouterr().err
