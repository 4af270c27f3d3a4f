"""Capture → store → publish → provision with restore, through the real activities, local provider and store."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from activities.boxes import BoxActivities
from sandbox.errors import ArtifactStoreUnavailable
from store.artifacts import ArtifactStore, StoredArtifact
from store.s3_artifacts import S3ArtifactStore
from tests.conftest import free_port
from tests.integration.snapshots.conftest import SnapshotRig, manifest
from workflows.models.lease import ArchiveRef

SMALL_FILES = 10_000
BIG_FILE_MB = 100


def write_big_file(path: Path, megabytes: int) -> None:
    """Half random, half zero blocks: realistic-ish compressibility."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(megabytes):
            f.write(block[: 1 << 19] + bytes(1 << 19) if i % 2 else os.urandom(1 << 20))


def write_small_files(root: Path, count: int) -> None:
    for i in range(count):
        d = root / f"dir{i % 100:02d}" / f"sub{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.txt").write_bytes(f"file {i}\n".encode() * (1 + i % 40))


async def test_round_trip_of_10k_files_and_100mb_restores_an_identical_tree(rig: SnapshotRig) -> None:
    first = await rig.provision(epoch=1)
    box = await rig.box(first)
    ws, home = box.workspace_path, box.home_path
    await asyncio.to_thread(write_small_files, ws / "many", SMALL_FILES)
    await asyncio.to_thread(write_big_file, ws / "big.bin", BIG_FILE_MB)
    # Written from inside the box: modes, links, empty dirs, a read-only dir.
    script = (
        "set -e; mkdir -p empty/nested-empty tools locked; printf '#!/bin/sh\\necho ok\\n' > tools/run.sh;"
        " chmod 750 tools/run.sh; echo secret > tools/key; chmod 600 tools/key; ln -s tools/run.sh run;"
        " ln -s /workspace/tools/key abs-link; ln -s nowhere dangling; echo ro > locked/f; chmod 444 locked/f;"
        " chmod 555 locked; echo 'export A=1' > $HOME/.profile; mkdir -p $HOME/.cache/empty"
    )
    out = await box.exec(["sh", "-c", script])
    assert out.exit_code == 0, out.stderr
    before = {"workspace": manifest(ws), "home": manifest(home)}
    assert len(before["workspace"]) > SMALL_FILES

    tracemalloc.start()
    t0 = time.perf_counter()
    ref = await rig.capture(first, epoch=1)
    capture_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 48 * 1024 * 1024, f"capture held {peak / 2**20:.0f} MiB of Python memory"

    row = await rig.ledger.get(ref.snapshot_id)
    assert row is not None and row.state == "candidate"
    assert (row.sha256, row.size_bytes, row.key) == (ref.sha256, ref.size_bytes, ref.key)
    assert ref.key == f"snapshots/{rig.workspace_id}/g1/{ref.snapshot_id}.tar" + (
        ".zst" if ref.kind == "tar+zstd" else ""
    )
    assert await rig.artifacts.size_of(ref.key) == ref.size_bytes
    slots = await rig.publish(ref.snapshot_id)
    assert [s.snapshot_id for s in slots] == [ref.snapshot_id]
    assert (await rig.ledger.get(ref.snapshot_id)).state == "current"  # type: ignore[union-attr]

    t0 = time.perf_counter()
    second = await rig.provision(epoch=2, restore=[ref])
    restore_s = time.perf_counter() - t0
    assert second.restore is not None
    assert (second.restore.restored_from, second.restore.degraded, second.restore.notes) == (ref.snapshot_id, False, [])
    restored = await rig.box(second)
    assert restored.instance_id != box.instance_id
    after = {"workspace": manifest(restored.workspace_path), "home": manifest(restored.home_path)}
    assert after == before
    run = await restored.exec(["./run"])
    assert run.stdout == b"ok\n"
    print(
        f"\nround trip: {len(before['workspace'])} entries, archive {ref.size_bytes / 2**20:.1f} MiB ({ref.kind}), "
        f"capture {capture_s:.2f}s, provision+restore {restore_s:.2f}s, capture peak {peak / 2**20:.1f} MiB"
    )


async def test_periodic_capture_of_an_unchanged_workspace_adds_no_row(
    rig: SnapshotRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await rig.provision(epoch=1)
    box = await rig.box(first)
    # Written as the box would (owned by the box user): a restore gives every file to the box user.
    await box.write_file("notes.md", b"v1\n")
    ref = await rig.capture(first, epoch=1)
    await rig.publish(ref.snapshot_id)

    same = await rig.capture(first, epoch=1, only_if_changed=True, previous_sha256=ref.sha256, reason="periodic")
    assert same.unchanged and same.snapshot_id == ref.snapshot_id
    assert [r.snapshot_id for r in await rig.ledger.list(rig.workspace_id, rig.group_id)] == [ref.snapshot_id]
    # That capture remembered the fingerprint: the next unchanged check reads no file content at all.
    streams = 0
    original = rig.local.capture_workspace

    def counting(envelope: Any) -> Any:
        nonlocal streams
        streams += 1
        return original(envelope)

    monkeypatch.setattr(rig.local, "capture_workspace", counting)
    cheap = await rig.capture(first, epoch=1, only_if_changed=True, previous_sha256=ref.sha256, reason="periodic")
    assert cheap.unchanged and cheap.snapshot_id == ref.snapshot_id and streams == 0
    monkeypatch.undo()

    # A restored copy has other inodes (fingerprint differs) but the same bytes: still unchanged, still no row.
    second = await rig.provision(epoch=2, restore=[ref])
    again = await rig.capture(second, epoch=2, only_if_changed=True, previous_sha256=ref.sha256, reason="periodic")
    assert again.unchanged and again.snapshot_id == ref.snapshot_id
    assert [r.snapshot_id for r in await rig.ledger.list(rig.workspace_id, rig.group_id)] == [ref.snapshot_id]
    assert len(await rig.keys_beside(ref.key)) == 1, "the duplicate archive was dropped"

    (await rig.box(second)).workspace_path.joinpath("notes.md").write_text("v2\n")
    changed = await rig.capture(second, epoch=2, only_if_changed=True, previous_sha256=ref.sha256, reason="periodic")
    assert not changed.unchanged and changed.snapshot_id != ref.snapshot_id and changed.epoch == 2


async def test_capture_of_a_gone_box_is_box_not_found_and_stores_nothing(rig: SnapshotRig) -> None:
    first = await rig.provision(epoch=1)
    box = await rig.box(first)
    await rig.local.terminate(box.serialize_state())
    with pytest.raises(ApplicationError) as err:
        await rig.capture(first, epoch=1)
    assert err.value.type == "BoxNotFound" and err.value.non_retryable
    assert await rig.ledger.list(rig.workspace_id, rig.group_id) == []


async def _two_archives(rig: SnapshotRig) -> tuple[ArchiveRef, ArchiveRef]:
    """Two published archives of one box: older has version A (previous), newer version B (current)."""
    first = await rig.provision(epoch=1)
    box = await rig.box(first)
    (box.workspace_path / "version.txt").write_text("A")
    older = await rig.capture(first, epoch=1)
    await rig.publish(older.snapshot_id)
    (box.workspace_path / "version.txt").write_text("B")
    newer = await rig.capture(first, epoch=1)
    assert [s.snapshot_id for s in await rig.publish(newer.snapshot_id)] == [newer.snapshot_id, older.snapshot_id]
    return older, newer


async def corrupt(rig: SnapshotRig, key: str) -> None:
    """Flip one byte of the stored object (its ledger row keeps the old SHA-256), on either store."""
    data = bytearray(b"".join([chunk async for chunk in rig.artifacts.get(key)]))
    data[len(data) // 2] ^= 0xFF

    async def damaged() -> AsyncIterator[bytes]:
        yield bytes(data)

    await rig.artifacts.put(key, damaged())


async def test_corrupt_current_falls_back_to_previous_and_says_so(rig: SnapshotRig) -> None:
    older, newer = await _two_archives(rig)
    await corrupt(rig, newer.key)
    result = await rig.provision(epoch=2, restore=[newer, older])
    assert result.restore is not None
    assert result.restore.restored_from == older.snapshot_id
    assert not result.restore.degraded
    assert len(result.restore.notes) == 1
    assert newer.snapshot_id in result.restore.notes[0] and "ArchiveCorrupt" in result.restore.notes[0]
    assert ((await rig.box(result)).workspace_path / "version.txt").read_text() == "A"


async def test_missing_current_falls_back_to_previous(rig: SnapshotRig) -> None:
    older, newer = await _two_archives(rig)
    await rig.artifacts.delete(newer.key)
    result = await rig.provision(epoch=2, restore=[newer, older])
    assert result.restore is not None
    assert result.restore.restored_from == older.snapshot_id
    assert "ArtifactNotFound" in result.restore.notes[0]


async def test_no_usable_archive_is_degraded_and_the_box_starts_empty(rig: SnapshotRig) -> None:
    older, newer = await _two_archives(rig)
    await corrupt(rig, newer.key)
    await rig.artifacts.delete(older.key)
    result = await rig.provision(epoch=2, restore=[newer, older])
    assert result.restore is not None
    assert result.restore.restored_from is None
    assert result.restore.degraded
    assert [n.split(":")[1].strip() for n in result.restore.notes] == ["ArchiveCorrupt", "ArtifactNotFound"]
    box = await rig.box(result)
    assert list(box.workspace_path.iterdir()) == [], "nothing of the unverified archive may remain"
    assert (await box.exec(["true"])).exit_code == 0


class _FailingReads:
    """The rig's artifact store, except that its reads fail like a disk with I/O errors (or a server with 5xx)."""

    def __init__(self, inner: ArtifactStore) -> None:
        self._inner = inner

    async def put(self, key: str, chunks: Any) -> StoredArtifact:
        return await self._inner.put(key, chunks)

    async def delete(self, key: str) -> bool:
        return await self._inner.delete(key)

    async def exists(self, key: str) -> bool:
        return await self._inner.exists(key)

    async def get(self, key: str) -> AsyncIterator[bytes]:
        raise ArtifactStoreUnavailable(f"I/O error reading {key}")
        yield b""  # pragma: no cover


async def test_a_transient_store_failure_fails_provision_instead_of_falling_back(rig: SnapshotRig) -> None:
    older, newer = await _two_archives(rig)
    rig.boxes = BoxActivities(rig.providers, _FailingReads(rig.artifacts))
    with pytest.raises(ApplicationError) as err:
        await rig.provision(epoch=2, restore=[newer, older])
    assert err.value.type == "ArtifactStoreUnavailable" and not err.value.non_retryable


async def test_an_unreachable_s3_server_fails_provision_instead_of_falling_back(rig: SnapshotRig) -> None:
    if not isinstance(rig.artifacts, S3ArtifactStore):
        pytest.skip("the S3 store's outage; the filesystem store's is the test above")
    older, newer = await _two_archives(rig)
    bucket = rig.artifacts.url.removeprefix("s3://").split("/")[0]
    # The same bucket, but nothing listens where the store is told the server is (a network outage).
    unreachable = S3ArtifactStore(
        bucket,
        prefix="artifacts",
        endpoint=f"http://127.0.0.1:{free_port()}",
        access_key_id="a",
        secret_access_key="b",
        retry={"max_retries": 1, "retry_timeout": timedelta(seconds=3)},
    )
    rig.boxes = BoxActivities(rig.providers, unreachable)
    with pytest.raises(ApplicationError) as err:
        await rig.provision(epoch=2, restore=[newer, older])
    assert err.value.type == "ArtifactStoreUnavailable" and not err.value.non_retryable
