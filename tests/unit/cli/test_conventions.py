"""``sandboxctl`` conventions a user checks without a stack: which stack a command talks to, the
exit-code table in ``--help``, help text, piped tables, ``status`` and ``logs``."""

from __future__ import annotations

import io
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.exits import EXIT_BAD_SETTINGS, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_USAGE
from cli.main import _register, app
from cli.output import emit
from client.stack import STACK_FILE, StackInfo
from tests.conftest import free_port

_register()

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("SANDBOX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # ./.sandbox, the default data dir, is the test's own


def sandboxctl(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "command",
    [["lease", "acquire", "W", "G"], ["lease", "describe", "W", "G"], ["exec", "W", "G"]],
    ids=" ".join,
)
def test_no_running_stack_is_an_error_not_the_default_address(tmp_path: Path, command: list[str]) -> None:
    data = tmp_path / "no-stack"
    tail = ["--", "true"] if command[0] == "exec" else []
    res = sandboxctl(*command, "--data-dir", str(data), *tail)
    assert res.exit_code == EXIT_UNREACHABLE, res.output
    assert f"no running stack for {data}" in res.stderr
    assert "sandboxctl up" in res.stderr and "SANDBOX_TEMPORAL_ADDRESS" in res.stderr
    assert "127.0.0.1:7233" not in res.stderr
    assert not data.exists()


def test_an_explicit_address_is_still_dialled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", address)
    monkeypatch.setenv("SANDBOX_PAYLOAD_ENCRYPTION", "false")
    res = sandboxctl("lease", "describe", "W", "G", "--data-dir", str(tmp_path))
    assert res.exit_code == EXIT_UNREACHABLE and f"cannot reach Temporal at {address}" in res.stderr
    assert "NoRunningStack" not in res.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["lease", "describe", "W", "G"],
        ["exec", "W", "G", "--", "true"],
        ["fs", "ls", "W", "G", "."],
        ["desktop", "open", "W", "G"],
    ],
    ids=" ".join,
)
def test_without_payload_keys_a_command_says_how_to_get_them_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # A key the CLI made up would be one the worker does not have: the stack makes them.
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    data = tmp_path / "missing"
    res = sandboxctl(*command, "--data-dir", str(data))
    assert res.exit_code == EXIT_BAD_SETTINGS, res.output
    assert "SANDBOX_PAYLOAD_KEYS" in res.stderr and "sandboxctl up" in res.stderr
    assert "Traceback" not in res.output
    assert not data.exists()


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0::/root:/bin/sh\n")
    for command in (["lease", "acquire", "W", "G"], ["lease", "list"], ["status"], ["logs"]):
        res = sandboxctl(*command, "--data-dir", str(file))
        assert res.exit_code == EXIT_BAD_SETTINGS, (command, res.output)
        assert f"the data dir {file} is not a directory" in res.stderr
        assert "Traceback" not in res.output and "FileExistsError" not in res.output


@pytest.mark.parametrize(
    "command",
    [
        ["lease", "list"],
        ["machine", "list", "W"],
        ["snapshot", "list", "W", "G"],
        ["session", "show", "S"],
        ["record", "list", "W"],
        ["status"],
        ["logs", "worker"],
        ["lease", "describe", "W", "G"],
    ],
    ids=" ".join,
)
def test_read_only_commands_never_create_a_missing_data_dir(tmp_path: Path, command: list[str]) -> None:
    data = tmp_path / "missing" / "data"
    res = sandboxctl(*command, "--data-dir", str(data))
    assert res.exit_code in (EXIT_UNREACHABLE, EXIT_NOT_FOUND), res.output
    assert not (tmp_path / "missing").exists()


def test_root_help_lists_the_exit_codes() -> None:
    res = sandboxctl("--help")
    assert res.exit_code == 0
    assert "Exit codes:" in res.stdout
    for code, word in [
        (2, "usage"),
        (3, "unavailable"),
        (4, "refused"),
        (5, "not found"),
        (6, "fenced"),
        (7, "timeout"),
    ]:
        assert re.search(rf"^\s*{code}\s+{word}", res.stdout, re.MULTILINE), (code, res.stdout)


def _all_commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        out.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return out


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p) or "root")
def test_help_shows_real_types_and_no_rest_markup(path: list[str]) -> None:
    res = sandboxctl(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.stdout
    assert "``" not in res.stdout and not re.search(r":(func|class|mod|data|meth|attr):`", res.stdout)


def test_every_command_takes_json() -> None:
    root = typer.main.get_command(app)
    missing = []
    for path in _all_commands():
        command: Any = root
        for name in path:
            command = command.commands[name]
        if getattr(command, "commands", None) is not None:
            continue  # a group
        if not any("--json" in getattr(param, "opts", ()) for param in command.params):
            missing.append(" ".join(path))
    assert not missing, f"no --json on: {missing}"


def test_piped_tables_are_not_cut_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    long = "x" * 150
    emit([{"name": "a", "detail": long}], json_mode=False)
    emit({"detail": long + "y"}, json_mode=False)
    assert long in out.getvalue() and long + "y" in out.getvalue() and "…" not in out.getvalue()


def test_status_without_a_stack_says_so(tmp_path: Path) -> None:
    res = sandboxctl("status", "--data-dir", str(tmp_path), "--json")
    assert res.exit_code == EXIT_UNREACHABLE
    assert json.loads(res.stdout) == {"data_dir": str(tmp_path), "running": False, "services": []}
    res = sandboxctl("status", "--data-dir", str(tmp_path))
    assert res.exit_code == EXIT_UNREACHABLE and f"no running stack for {tmp_path}" in res.stderr


def test_status_of_a_published_stack_lists_services_ports_versions_health(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every server is unhealthy, and status says so
    info = StackInfo(
        pid=os.getpid(),
        temporal_address=f"127.0.0.1:{port}",
        ui_url=f"http://127.0.0.1:{port}",
        nats_url=f"nats://127.0.0.1:{port}",
        data_dir=tmp_path,
        started_at=datetime.now(UTC),
    )
    (tmp_path / STACK_FILE).write_text(info.model_dump_json())
    res = sandboxctl("status", "--data-dir", str(tmp_path), "--json")
    assert res.exit_code == EXIT_UNREACHABLE, res.output
    doc = json.loads(res.stdout)
    assert doc["running"] is True and doc["healthy"] is False and doc["pid"] == os.getpid()
    services = {s["service"]: s for s in doc["services"]}
    assert {"temporal", "temporal-ui", "nats", "worker"} <= services.keys()
    assert services["temporal"]["address"] == f"127.0.0.1:{port}" and services["temporal"]["healthy"] is False
    assert "temporal" in (services["temporal"]["version"] or "temporal")


def test_logs_prints_the_tail_of_a_service_log(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "nats.log").write_text("".join(f"line {i}\n" for i in range(100)))
    res = sandboxctl("logs", "nats", "-n", "3", "--data-dir", str(tmp_path))
    assert res.exit_code == 0 and res.stdout == "line 97\nline 98\nline 99\n"
    res = sandboxctl("logs", "nats", "-n", "2", "--data-dir", str(tmp_path), "--json")
    assert json.loads(res.stdout)["lines"] == ["line 98", "line 99"]
    res = sandboxctl("logs", "worker", "--data-dir", str(tmp_path))
    assert res.exit_code == EXIT_NOT_FOUND and "no worker log" in res.stderr
    res = sandboxctl("logs", "postgres", "--data-dir", str(tmp_path))
    assert res.exit_code == EXIT_USAGE and "worker, temporal, nats" in res.stderr
