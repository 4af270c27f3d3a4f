"""A worker killed (SIGKILL) while a box is warming: the restarted worker finishes the same box.

The worker runs as a real subprocess (``python -m worker``). The readiness probe is slowed down by
a ``true`` on the box's PATH that sleeps, so the kill lands after the box was created and before
the lease committed it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from client import LeaseClient
from sandbox.settings import Settings
from tests.conftest import box_visible_bin


class WorkerProcess:
    """``python -m worker`` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if "worker running" in self.log.read_text():
                return
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log_file.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self._log_file.close()
        return rc


@pytest.fixture
def slow_true() -> Iterator[Path]:
    """A directory whose ``true`` sleeps 2 s, visible inside boxes."""
    with box_visible_bin({"true": "#!/bin/sh\nsleep 2\nexit 0\n"}) as root:
        yield root


async def test_worker_killed_during_warming_resumes_without_a_second_box(
    temporal_env: WorkflowEnvironment, tmp_path: Path, slow_true: Path
) -> None:
    target = temporal_env.client.service_client.config.target_host
    settings = Settings(
        data_dir=tmp_path / "data",
        temporal_address=target,
        task_queue=f"restart-{uuid.uuid4()}",
        warming_ttl_seconds=60,
        probe_timeout_seconds=20,
        activity_heartbeat_seconds=1.5,
        idle_grace_seconds=0.2,
    )
    env = {
        **os.environ,
        "SANDBOX_DATA_DIR": str(settings.data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": target,
        "SANDBOX_TASK_QUEUE": settings.task_queue,
    }
    boxes = settings.boxes_dir()
    first = WorkerProcess(env, tmp_path / "worker-a.log")
    first.wait_ready()
    leases = LeaseClient(temporal_env.client, settings)
    acquire = asyncio.create_task(
        leases.acquire("ws-restart", "g1", holder_id="t1", environment={"PATH": f"{slow_true}:/usr/bin:/bin"})
    )

    deadline = time.monotonic() + 20
    while not (boxes.exists() and any(p.name.startswith("box-") for p in boxes.iterdir())):
        assert time.monotonic() < deadline, "the box was never created"
        assert not acquire.done(), acquire
        await asyncio.sleep(0.02)
    first.kill()  # mid-probe: the box exists, the lease has not committed it
    assert not acquire.done()

    second = WorkerProcess(env, tmp_path / "worker-b.log")
    try:
        second.wait_ready()
        grant: Any = await asyncio.wait_for(acquire, timeout=45)
        assert (grant.role, grant.epoch, grant.liveness) == ("spawner", 1, "warm")
        made = [p.name for p in boxes.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert made == [grant.instance_id], made  # the retry adopted the box, it did not make a second one
        out = await leases.exec("ws-restart", "g1", ["sh", "-c", "echo alive"])
        assert out.stdout == "alive\n"
        await leases.drain("ws-restart", "g1", wait=True)
        assert not [p for p in boxes.iterdir() if not p.name.startswith(".")]
    finally:
        assert second.terminate() == 0, second.log.read_text()[-2000:]
