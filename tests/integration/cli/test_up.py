"""``sandboxctl up`` with the real Temporal dev server and nats-server, and a stand-in worker.

The worker is replaced through ``SANDBOX_WORKER_COMMAND`` by a tiny Python process that records
the environment it was given and sleeps until SIGTERM, so these tests exercise the stack's
process handling without depending on the real worker.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from client.stack import StackInfo, read_stack_info, resolve_settings
from tests.conftest import REPO, find_binary, free_port
from tests.dev_server import refuses_oversized_updates

# The real entry point (cli.main), forced into multi-command mode: while `up` is the only
# registered command, typer would otherwise make it the root command and refuse "up".
LAUNCHER = """
from cli import main
main._register()
if main.app.registered_callback is None:
    main.app.callback()(lambda: None)
main.app()
"""

FAKE_WORKER = shlex.join(
    [
        sys.executable,
        "-c",
        "import json, os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('SANDBOX_')}), flush=True)\n"
        "time.sleep(600)\n",
    ]
)
DYING_WORKER = shlex.join(
    [sys.executable, "-c", "import sys, time; time.sleep(1); print('worker boom', file=sys.stderr); sys.exit(3)"]
)
SEARCH_ATTRIBUTES = {
    "LeaseLiveness": "Keyword",
    "LeaseEpoch": "Int",
    "SandboxBackend": "Keyword",
    "WorkspaceId": "Keyword",
}


class Up:
    """A ``sandboxctl up`` subprocess whose stdout lines are collected as they arrive."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        worker: str = FAKE_WORKER,
        ports: bool = True,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir = data_dir.resolve()
        self.temporal_port, self.ui_port, self.nats_port = free_port(), free_port(), free_port()
        self.codec_port = free_port()
        args = ["up", "--data-dir", str(data_dir)]
        if ports:
            args += ["--temporal-port", str(self.temporal_port), "--ui-port", str(self.ui_port)]
            args += ["--nats-port", str(self.nats_port), "--codec-port", str(self.codec_port)]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SANDBOX_")}
        env |= {"SANDBOX_WORKER_COMMAND": worker, "PYTHONPATH": str(REPO), **(env_extra or {})}
        self.stderr_path = data_dir.parent / f"{data_dir.name}-up-{time.monotonic_ns()}.err"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, *args, *extra],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.stdout: list[str] = []

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float = 20.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output from `up` within {timeout}s; stderr:\n{self.stderr()}")
        self.stdout.append(line)
        return line

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def children(self) -> set[int]:
        """Pids whose parent is the `up` process."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                found.add(int(stat.parent.name))
        return found

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still exist, as processes or as members of their process group."""
    alive = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, pgrp = int(stat.parent.name), int(fields[2])
        if pid in pids or pgrp in pids:
            alive.add(pid)
    return alive


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ready_line(up: Up, *, codec: bool = True) -> str:
    codec_part = f" codec=http://127.0.0.1:{up.codec_port}" if codec else ""
    return (
        f"ready: temporal=127.0.0.1:{up.temporal_port} ui=http://127.0.0.1:{up.ui_port} "
        f"nats=nats://127.0.0.1:{up.nats_port}{codec_part} data={up.data_dir}"
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One stack shared by the read-only checks below."""
    up = Up(tmp_path_factory.mktemp("up") / "data")
    try:
        assert up.next_line() == _ready_line(up), up.stderr()
        yield up
    finally:
        up.kill()


def test_ready_line_then_hint_and_stack_json(running: Up) -> None:
    assert running.next_line() == f"next: SANDBOX_DATA_DIR={running.data_dir} sandboxctl lease acquire demo g1"
    info = json.loads((running.data_dir / "stack.json").read_text())
    assert info["pid"] == running.proc.pid
    assert info["temporal_address"] == f"127.0.0.1:{running.temporal_port}"
    assert info["ui_url"] == f"http://127.0.0.1:{running.ui_port}"
    assert info["nats_url"] == f"nats://127.0.0.1:{running.nats_port}"
    assert info["data_dir"] == str(running.data_dir)
    assert info["started_at"]
    assert read_stack_info(running.data_dir) == StackInfo.model_validate(info)


def test_resolve_settings_points_at_the_running_stack(running: Up, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_TEMPORAL_ADDRESS", raising=False)
    monkeypatch.delenv("SANDBOX_NATS_URL", raising=False)
    settings = resolve_settings(running.data_dir)
    assert settings.temporal_address == f"127.0.0.1:{running.temporal_port}"
    assert settings.nats_url == f"nats://127.0.0.1:{running.nats_port}"
    assert settings.data_dir == running.data_dir

    monkeypatch.setenv("SANDBOX_DATA_DIR", str(running.data_dir))
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", "10.0.0.1:7233")
    settings = resolve_settings(None)
    assert settings.temporal_address == "10.0.0.1:7233"  # an explicit env value wins
    assert settings.nats_url == f"nats://127.0.0.1:{running.nats_port}"


def test_worker_gets_the_stack_addresses(running: Up) -> None:
    log = running.data_dir / "logs" / "worker.log"
    deadline = time.monotonic() + 10
    while not log.read_text().endswith("}\n") and time.monotonic() < deadline:
        time.sleep(0.05)
    env = json.loads(log.read_text().splitlines()[-1])  # the first line is up's header
    assert env["SANDBOX_TEMPORAL_ADDRESS"] == f"127.0.0.1:{running.temporal_port}"
    assert env["SANDBOX_NATS_URL"] == f"nats://127.0.0.1:{running.nats_port}"
    assert env["SANDBOX_DATA_DIR"] == str(running.data_dir)
    assert (running.data_dir / "logs" / "temporal.log").exists()
    assert (running.data_dir / "logs" / "nats.log").exists()


def test_temporal_ui_and_nats_answer_with_search_attributes(running: Up) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.ui_port}/", timeout=5) as response:
        assert response.status == 200
    assert _port_open(running.nats_port)
    listed = subprocess.run(
        [
            find_binary("temporal"),
            "operator",
            "search-attribute",
            "list",
            "--address",
            f"127.0.0.1:{running.temporal_port}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    rows = {tuple(line.split()) for line in listed.splitlines() if line.strip()}
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert (name, kind) in rows, listed


async def test_temporal_refuses_an_update_too_big_to_answer(running: Up) -> None:
    """The stack's server is configured as the runtime needs (workflows/server_settings.py)."""
    assert await refuses_oversized_updates(f"127.0.0.1:{running.temporal_port}")


def test_second_up_on_same_data_dir_fails_fast(running: Up) -> None:
    started = time.monotonic()
    second = Up(running.data_dir)
    assert second.proc.wait(timeout=10) != 0
    assert time.monotonic() - started < 5
    message = " ".join(second.stderr().split())
    assert f"a stack is already running for {running.data_dir} (pid {running.proc.pid})" in message
    assert f"`kill {running.proc.pid}`" in message
    assert running.proc.poll() is None  # the first stack is untouched
    assert read_stack_info(running.data_dir) is not None


def test_sigterm_stops_everything_and_the_data_dir_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Up(data)
    try:
        assert first.next_line() == _ready_line(first)
        children = first.children()
        assert len(children) == 4  # temporal, nats, codec server, worker
        assert first.stop(signal.SIGTERM) == 0
    finally:
        first.kill()
    assert _alive(children) == set()
    assert not (data / "stack.json").exists()
    assert read_stack_info(data) is None
    for port in (first.temporal_port, first.ui_port, first.nats_port, first.codec_port):
        assert not _port_open(port)

    # Same data dir (same SQLite file, same lock) right away; --json; stopped with Ctrl-C this time.
    second = Up(data, "--json")
    try:
        event = json.loads(second.next_line())
        assert event["event"] == "ready"
        assert event["temporal_address"] == f"127.0.0.1:{second.temporal_port}"
        assert event["data_dir"] == str(data)
        assert event["next"].endswith("sandboxctl lease acquire demo g1")
        children = second.children()
        assert second.stop(signal.SIGINT) == 0
    finally:
        second.kill()
    assert _alive(children) == set()
    assert not (data / "stack.json").exists()
    assert "Traceback" not in second.stderr()


def test_a_dying_child_stops_the_stack_with_an_error(tmp_path: Path) -> None:
    up = Up(tmp_path / "data", worker=DYING_WORKER)
    try:
        assert up.next_line().startswith("ready: ")
        children = up.children()
        assert len(children) >= 2  # at least temporal and nats, whatever the worker's state
        assert up.proc.wait(timeout=15) != 0
    finally:
        up.kill()
    assert _alive(children) == set()
    stderr = up.stderr()
    assert "worker exited with code 3 unexpectedly" in stderr
    assert "worker boom" in stderr  # the tail of its log
    assert not (tmp_path / "data" / "stack.json").exists()


def test_port_in_use_is_refused_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = Up(tmp_path / "data", "--nats-port", str(port))
        assert up.proc.wait(timeout=10) != 0
    message = " ".join(up.stderr().split())
    assert f"port {port} on 127.0.0.1 is already in use (--nats-port)" in message
    assert "choose another with --nats-port" in message
    assert not (tmp_path / "data" / "logs" / "temporal.log").exists()  # nothing was started


def test_read_stack_info_ignores_stale_and_malformed_files(tmp_path: Path) -> None:
    assert read_stack_info(tmp_path) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = StackInfo(
        pid=dead.pid,
        temporal_address="127.0.0.1:1",
        ui_url="http://127.0.0.1:2",
        nats_url="nats://127.0.0.1:3",
        data_dir=tmp_path,
        started_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    (tmp_path / "stack.json").write_text(stale.model_dump_json())
    assert read_stack_info(tmp_path) is None
    (tmp_path / "stack.json").write_text(stale.model_copy(update={"pid": os.getpid()}).model_dump_json())
    assert read_stack_info(tmp_path) == stale.model_copy(update={"pid": os.getpid()})
    (tmp_path / "stack.json").write_text("{not json")
    assert read_stack_info(tmp_path) is None


# --------------------------------------------------------------------------- the codec server


def _post(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_codec_server_decrypts_with_the_stacks_keys(running: Up) -> None:
    """The stack made the keys file (0600), started the codec server on it and pointed the UI there."""
    import base64
    import stat

    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payload, Payloads

    from sandbox.payload_codec import PayloadEncryptionCodec, PayloadKeys

    keys_file = running.data_dir / "secrets" / "payload-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    codec_url = f"http://127.0.0.1:{running.codec_port}"
    assert json.loads((running.data_dir / "stack.json").read_text())["codec_url"] == codec_url
    temporal_command = (running.data_dir / "logs" / "temporal.log").read_text().splitlines()[0]
    assert f"--ui-codec-endpoint {codec_url}" in temporal_command

    sealed = PayloadEncryptionCodec(PayloadKeys.from_json(keys_file.read_text())).encrypt(
        Payload(metadata={"encoding": b"json/plain"}, data=b'"a secret"')
    )
    body = json_format.MessageToDict(Payloads(payloads=[sealed]))
    ui = f"http://127.0.0.1:{running.ui_port}"
    headers = {"Content-Type": "application/json", "X-Namespace": "default", "Origin": ui}
    status, decoded = _post(f"{codec_url}/decode", body, headers)
    assert status == 200, decoded
    assert decoded == {
        "payloads": [
            {
                "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                "data": base64.b64encode(b'"a secret"').decode(),
            }
        ]
    }
    # Negative control: the same request from another page's origin gets nothing.
    status, refused = _post(f"{codec_url}/decode", body, {**headers, "Origin": "http://evil.example"})
    assert status == 403 and "payloads" not in refused


def test_without_payload_encryption_there_is_no_codec_server(tmp_path: Path) -> None:
    up = Up(tmp_path / "data", env_extra={"SANDBOX_PAYLOAD_ENCRYPTION": "false"})
    try:
        assert up.next_line() == _ready_line(up, codec=False), up.stderr()
        assert not _port_open(up.codec_port)
        assert "--ui-codec-endpoint" not in (tmp_path / "data" / "logs" / "temporal.log").read_text()
        assert not (tmp_path / "data" / "secrets" / "payload-keys.json").exists()  # no key made for nothing
    finally:
        up.kill()
