"""What Temporal stores on disk of an exec: with the codec, nothing readable; without it, everything.

A real ``temporal server start-dev --db-filename`` (as ``sandboxctl up`` runs it) keeps history in
a SQLite file. A lease ``exec`` on a local box carries a marker in its command, its environment
and its output (three distinct strings; the output one is assembled by the shell, so it appears
in no input). The test then looks for each marker in every cell of every table (text and blobs)
and in the raw bytes of the database file and its WAL, while the server runs and after it has
stopped. With payload encryption on the markers are nowhere; the positive control, the same run
with ``SANDBOX_PAYLOAD_ENCRYPTION=false``, finds every one of them, so the search can see them.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, running_runtime
from tests.dev_server import DevServer, dev_server
from worker import connect


@dataclass(frozen=True)
class Markers:
    cmd: str
    env: str
    out: str

    def all(self) -> dict[str, bytes]:
        return {"command": self.cmd.encode(), "environment": self.env.encode(), "output": self.out.encode()}


async def run_exec(server: DevServer, data_dir: Path, *, encryption: bool) -> Markers:
    """A worker and a client on ``server`` run one lease exec carrying the markers, then drain it."""
    base = f"m{uuid.uuid4().hex}"
    markers = Markers(cmd=f"{base}-cmd", env=f"{base}-env", out=f"{base}-out")
    settings = Settings(
        data_dir=data_dir,
        temporal_address=server.address,
        task_queue=f"enc-{uuid.uuid4()}",
        payload_encryption=encryption,
        **FAST_TIMERS,
    )
    client = await connect(settings)
    async with running_runtime(client, settings) as runtime:
        leases = runtime.leases()
        ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
        await leases.acquire(ws, g, kind="turn", holder_id="t1", backend="local")
        script = f"echo {markers.cmd} >/dev/null; printf '%s-%s\\n' {base} out; printf '%s\\n' \"$SECRET\""
        out = await leases.exec(ws, g, ["sh", "-c", script], env={"SECRET": markers.env})
        assert out.stdout == f"{markers.out}\n{markers.env}\n"
        assert markers.out not in script
        view = await leases.describe(ws, g)  # the query works through the codec too
        assert view.liveness == "warm"
        await leases.release(ws, g, "t1", kind="turn")
        await leases.drain(ws, g, wait=True)
    return markers


def found_in_tables(db_file: Path, needle: bytes) -> list[str]:
    """``table.column`` of every cell (text or blob) holding ``needle``, read through SQLite."""
    hits: list[str] = []
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert len(tables) > 10, tables  # Temporal's schema, not an empty file
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    if needle in raw:
                        hits.append(f"{table}.{column}")
    return hits


def found_in_files(db_file: Path, needle: bytes) -> list[str]:
    """The database file, WAL and shared-memory file whose raw bytes hold ``needle``."""
    candidates = [db_file, db_file.with_name(db_file.name + "-wal"), db_file.with_name(db_file.name + "-shm")]
    return [f"file:{path.name}" for path in candidates if path.exists() and needle in path.read_bytes()]


def where(server: DevServer, markers: Markers) -> dict[str, list[str]]:
    return {
        name: found_in_tables(server.db_file, needle) + found_in_files(server.db_file, needle)
        for name, needle in markers.all().items()
    }


@pytest.mark.parametrize("encryption", [True, False], ids=["encrypted", "control-plain"])
async def test_exec_markers_on_temporal_disk(tmp_path: Path, encryption: bool) -> None:
    with dev_server(tmp_path) as server:
        markers = await run_exec(server, tmp_path / "data", encryption=encryption)
        running = where(server, markers)
        server.stop()
        stopped = where(server, markers)
    if encryption:
        assert running == {"command": [], "environment": [], "output": []}
        assert stopped == {"command": [], "environment": [], "output": []}
    else:
        # Positive control: the search does see each marker, in a table and in the raw file bytes.
        for name in ("command", "environment", "output"):
            hits = running[name] + stopped[name]
            assert any(not hit.startswith("file:") for hit in hits), (name, running, stopped)
            assert any(hit.startswith("file:") for hit in hits), (name, running, stopped)
