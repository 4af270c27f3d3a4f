"""A Temporal dev server on a SQLite file, started as ``sandboxctl up`` starts it, for history tests.

The session's dev server (``temporal_env``) keeps history in memory; the tests that read what
Temporal stores on disk, or drive its Web UI with a codec endpoint, need their own server with
``--db-filename`` (and ``--ui-codec-endpoint``), as cli/stack.py runs it.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from tests.conftest import find_binary, free_port, wait_for_port
from workflows.server_settings import UPDATE_ADMISSION_LIMIT_BYTES, dev_server_flags


@dataclass(frozen=True)
class DevServer:
    """A running dev server: its gRPC address, Web UI URL and SQLite file."""

    address: str
    ui_url: str
    db_file: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the server and wait for it (SQLite checkpoints its WAL into the file on close)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until_serving(address: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Return once the frontend says SERVING: its port opens before it is healthy, and a client that
    connects in between is refused ("Frontend is not healthy yet")."""
    deadline = time.monotonic() + timeout
    while True:
        check = subprocess.run(
            [find_binary("temporal"), "operator", "cluster", "health", "--address", address],
            capture_output=True,
            timeout=30,
        )
        if check.returncode == 0 and b"SERVING" in check.stdout:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Temporal dev server at {address} never became healthy: {check.stdout!r}")
        time.sleep(0.1)


@contextlib.contextmanager
def dev_server(directory: Path, *, codec_endpoint: str | None = None, ui: bool = False) -> Iterator[DevServer]:
    """``temporal server start-dev --db-filename <directory>/temporal.db`` on free loopback ports."""
    port, ui_port = free_port(), free_port()
    db_file = directory / "temporal.db"
    argv = [
        find_binary("temporal"),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--db-filename",
        str(db_file),
        "--log-level",
        "error",
        *dev_server_flags(),
    ]
    argv += ["--ui-port", str(ui_port)] if ui else ["--headless"]
    if codec_endpoint is not None:
        argv += ["--ui-codec-endpoint", codec_endpoint]
    log = (directory / "temporal.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = DevServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}", db_file, proc)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        wait_until_serving(server.address, proc)
        if ui:
            wait_for_port(ui_port, timeout=60, proc=proc)
        yield server
    finally:
        server.stop()
        log.close()


async def refuses_oversized_updates(address: str) -> bool:
    """Whether the server at ``address`` refuses, at admission, an update over
    :data:`~workflows.server_settings.UPDATE_ADMISSION_LIMIT_BYTES` (as the runtime needs it to).

    The update goes to a workflow no worker serves: a server that takes it in holds it (the call then
    times out after 5 s); one configured as the runtime needs refuses it at once, naming the limit.
    """
    client = await Client.connect(address, retry_config=RetryConfig(max_retries=1))
    handle = await client.start_workflow("Unserved", id=f"oversized-{uuid.uuid4()}", task_queue=f"none-{uuid.uuid4()}")
    try:
        await handle.execute_update("any", "a" * (UPDATE_ADMISSION_LIMIT_BYTES + 1), rpc_timeout=timedelta(seconds=5))
    except RPCError as err:
        return err.status == RPCStatusCode.RESOURCE_EXHAUSTED and str(UPDATE_ADMISSION_LIMIT_BYTES) in err.message
    except Exception:  # noqa: BLE001 -- held, then timed out: not refused
        return False
    finally:
        await handle.terminate()
    return False
