"""The one place ``sandboxctl`` maps the client's typed errors to exit codes and one-line messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from cli.exits import (
    EXIT_BAD_SETTINGS,
    EXIT_CODES,
    EXIT_FENCED,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    load_settings,
    run,
)
from client.connection import TemporalUnreachable
from sandbox import errors
from sandbox.errors import LeaseNotWarm, StaleEpoch
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


def test_a_refusal_exits_with_its_own_code_and_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = exit_of(Settings(data_dir=tmp_path), LeaseNotWarm("acquire it first"), capsys)
    assert code == EXIT_REFUSED == 4 and "LeaseNotWarm: acquire it first" in stderr
    code, stderr = exit_of(Settings(data_dir=tmp_path), StaleEpoch("the lease is at epoch 3"), capsys)
    assert code == EXIT_FENCED and "StaleEpoch: the lease is at epoch 3" in stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("bad"), EXIT_REFUSED),
        (errors.LeaseNotWarm("cold"), EXIT_REFUSED),
        (errors.LeaseNotFound("gone"), EXIT_NOT_FOUND),
        (errors.HolderNotFound("gone"), EXIT_NOT_FOUND),
        (errors.PathNotFound("gone"), EXIT_NOT_FOUND),
        (errors.RecordingNotFound("gone"), EXIT_NOT_FOUND),
        (errors.StaleEpoch("old"), EXIT_FENCED),
        (errors.AgentOffline("offline"), EXIT_UNREACHABLE),
        (errors.ProviderUnavailable("down"), EXIT_UNREACHABLE),
        (errors.NoRunningStack("no stack", address="127.0.0.1:7233"), EXIT_UNREACHABLE),
        (errors.ExecTimeout("slow", timeout=1.0), EXIT_TIMEOUT),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_each_kind_of_failure_has_its_own_documented_code(
    error: errors.SandboxError, code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got, stderr = exit_of(Settings(data_dir=tmp_path), error, capsys)
    assert got == code and f"{error.error_type}: " in stderr
    assert code in EXIT_CODES and code != EXIT_USAGE


def test_the_codes_are_distinct_and_usage_keeps_click_s_2() -> None:
    assert EXIT_USAGE == 2
    assert (
        len({EXIT_BAD_SETTINGS, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_NOT_FOUND, EXIT_FENCED, EXIT_TIMEOUT})
        == 7
    )


def test_a_result_passes_through(tmp_path: Path) -> None:
    async def action() -> int:
        return 7

    assert run(Settings(data_dir=tmp_path), action) == 7


def test_malformed_settings_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SANDBOX_HOLDER_TTL_SECONDS", "soon")
    with pytest.raises(typer.Exit) as caught:
        load_settings(None)
    assert caught.value.exit_code == EXIT_BAD_SETTINGS and "SANDBOX_" in capsys.readouterr().err
