"""Never lose a workspace: capture on drain, restore on the next acquire, capture failures keep the box,
box loss restores the last archive, periodic capture, and rotation ahead of the provider lifetime."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sandbox import errors
from store.snapshots import SnapshotLedger
from tests.conftest import eventually, ids, remove_box_directory
from tests.integration.test_lease_workflow import box_dir_of, record_history


async def _state(leases: Any, ws: str, g: str, liveness: str) -> Any:
    view = await leases.describe(ws, g)
    return view if view.liveness == liveness else None


WRITE = (
    "mkdir -p src/empty && printf 'print(1)\\n' > src/main.py && chmod 750 src/main.py"
    " && ln -s src/main.py link && printf notes > ~/.notes"
)
CHECK = "cat src/main.py && stat -c %a src/main.py && readlink link && test -d src/empty && cat ~/.notes"


async def test_drain_captures_and_the_next_box_is_restored(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=0.2)
    ws, g = ids("snap")
    first = await leases.acquire(ws, g, holder_id="t1")
    out = await leases.exec(ws, g, ["sh", "-c", WRITE])
    assert out.exit_code == 0, out
    await leases.release(ws, g, "t1")
    cold = await eventually(lambda: _state(leases, ws, g, "cold"))
    assert cold.archive_current is not None and cold.archive_current.epoch == first.epoch
    assert not box_dir_of(runtime, first.instance_id).exists()

    second = await leases.acquire(ws, g, holder_id="t2")
    assert second.instance_id != first.instance_id and second.epoch == first.epoch + 2
    out = await leases.exec(ws, g, ["sh", "-c", CHECK])
    assert out.stdout.split() == ["print(1)", "750", "src/main.py", "notes"], out
    view = await leases.describe(ws, g)
    assert view.restore_status == "restored"
    assert view.transitions[-1].reason.startswith("box ready, restored archive")

    rows = await SnapshotLedger(runtime.db).list(ws, g)
    assert [r.state for r in rows if r.state in ("current", "previous")] == ["current"]
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "drain_capture_restore")


async def test_capture_failure_keeps_the_box_and_retries(runtime: Any) -> None:
    leases = runtime.leases(idle_grace_seconds=0.1, teardown_retry_seconds=0.5)
    ws, g = ids("snap")
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.exec(ws, g, ["sh", "-c", "echo precious > keep.txt"])
    artifacts = Path(runtime.settings.data_dir) / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    moved = artifacts.with_name("artifacts.away")
    artifacts.rename(moved)
    artifacts.write_text("not a directory: every store write fails")
    try:
        await leases.release(ws, g, "t1")

        async def failing() -> Any:
            view = await leases.describe(ws, g)
            return view if view.last_error and "teardown failed" in view.last_error else None

        view = await eventually(failing, timeout=60)
        assert view.liveness == "draining" and view.instance_id == grant.instance_id
        assert box_dir_of(runtime, grant.instance_id).is_dir()  # never terminated without an archive
        out = await leases.exec(ws, g, ["cat", "keep.txt"]) if view.liveness == "warm" else None
        assert out is None
    finally:
        artifacts.unlink()
        moved.rename(artifacts)
    cold = await eventually(lambda: _state(leases, ws, g, "cold"), timeout=60)
    assert cold.archive_current is not None
    again = await leases.acquire(ws, g, holder_id="t2")
    out = await leases.exec(ws, g, ["cat", "keep.txt"])
    assert (again.epoch, out.stdout) == (grant.epoch + 2, "precious\n")
    await leases.drain(ws, g, wait=True)


async def test_lost_box_is_restored_from_the_last_archive(runtime: Any) -> None:
    leases = runtime.leases(snapshot_interval_seconds=0.5)
    ws, g = ids("snap")
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.exec(ws, g, ["sh", "-c", "echo kept-by-periodic-capture > p.txt"])

    async def captured() -> Any:
        view = await leases.describe(ws, g)
        return view if view.archive_current is not None else None

    first = await eventually(captured, timeout=30)
    await asyncio.sleep(1.5)  # more intervals pass with no change: no new snapshot
    assert (await leases.describe(ws, g)).archive_current == first.archive_current

    remove_box_directory(box_dir_of(runtime, grant.instance_id))
    with pytest.raises(errors.BoxNotFound):
        await leases.exec(ws, g, ["true"])
    again = await leases.acquire(ws, g, holder_id="t1")
    assert again.epoch == grant.epoch + 2
    out = await leases.exec(ws, g, ["cat", "p.txt"])
    assert out.stdout == "kept-by-periodic-capture\n"
    await leases.drain(ws, g, wait=True)


async def test_rotation_replaces_the_box_before_the_provider_lifetime_ends(runtime: Any) -> None:
    leases = runtime.leases(hard_lifetime_seconds=3.0, rotation_lead_seconds=1.5)
    ws, g = ids("snap")
    grant = await leases.acquire(ws, g, holder_id="t1")
    await leases.exec(ws, g, ["sh", "-c", "echo survives-rotation > r.txt"])
    assert (await leases.describe(ws, g)).rotation_due_at is not None

    async def rotated() -> Any:
        view = await leases.describe(ws, g)
        return view if view.liveness == "warm" and view.epoch == grant.epoch + 2 else None

    view = await eventually(rotated, timeout=30)
    assert view.instance_id != grant.instance_id
    assert any(t.reason.startswith("rotation") for t in view.transitions)
    with pytest.raises(errors.StaleEpoch):  # the old grant is fenced; the holder re-acquires
        await leases.heartbeat(ws, g, "t1", grant.epoch)
    again = await leases.acquire(ws, g, holder_id="t1")
    assert again.epoch == view.epoch
    out = await leases.exec(ws, g, ["cat", "r.txt"])
    assert out.stdout == "survives-rotation\n"
    await leases.drain(ws, g, wait=True)
    await record_history(runtime, ws, g, "rotation")


MANIFEST = (
    # Directory sizes are a file-system detail (they do not shrink), so only files carry a size.
    "cd /workspace && { find . ~ -type f -printf '%p f %m %s\\n'; find . ~ ! -type f -printf '%p %y %m %l\\n'; }"
    " | sort > /tmp/manifest && find . ~ -type f -print0 | sort -z | xargs -0 sha256sum >> /tmp/manifest"
    " && sha256sum < /tmp/manifest && grep -v '^[0-9a-f]\\{64\\} ' /tmp/manifest | head -c 200000"
)


async def test_full_size_round_trip_through_the_lease(runtime: Any) -> None:
    """10,000 small files, one 100 MB file, modes, symlinks and empty dirs survive drain → cold → acquire."""
    leases = runtime.leases(idle_grace_seconds=0.2, capture_timeout_seconds=300)
    ws, g = ids("snap")
    await leases.acquire(ws, g, holder_id="t1")
    make = (
        "mkdir -p many empty/nested && cd many && seq 1 10000 | xargs -n 500 sh -c 'for i; do echo $i > f$i; done' _"
        " && cd .. && head -c 100000000 /dev/urandom > big.bin && chmod 640 big.bin && chmod 711 many"
        " && ln -s big.bin link-to-big && ln -s /nowhere dangling && mkdir -p ~/.config && echo x > ~/.config/rc"
    )
    out = await leases.exec(ws, g, ["sh", "-c", make], timeout_seconds=300)
    assert out.exit_code == 0, out
    before = await leases.exec(ws, g, ["sh", "-c", MANIFEST], timeout_seconds=300)
    assert before.exit_code == 0, before
    await leases.release(ws, g, "t1")
    await eventually(lambda: _state(leases, ws, g, "cold"), timeout=300)
    await leases.acquire(ws, g, holder_id="t2")
    after = await leases.exec(ws, g, ["sh", "-c", MANIFEST], timeout_seconds=300)
    # Same paths, kinds, modes, file sizes, link targets and contents.
    assert after.stdout.splitlines() == before.stdout.splitlines()
    count = await leases.exec(ws, g, ["sh", "-c", "ls many | wc -l"])
    assert count.stdout.strip() == "10000"
    await leases.drain(ws, g, wait=True)
