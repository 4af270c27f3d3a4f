"""Workspace archives on the local provider: capture/restore streams, determinism, discard on failure."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from providers.local import LocalBoxSession, LocalProvider
from providers.none import NoneProvider
from providers.workspace_archive import (
    ZSTD_MAGIC,
    archive_kind,
    extract_tar,
    stream_tar,
    tree_fingerprint,
    zstd_available,
)
from sandbox.box import BoxSpec, Envelope
from sandbox.errors import ArchiveCorrupt, BoxNotFound, Unsupported
from store.artifacts import verified


def spec(epoch: int = 1) -> BoxSpec:
    return BoxSpec(lease_id="lease/ws1/g1", workspace_id="ws1", group_id="g1", epoch=epoch)


async def stream(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def capture(provider: LocalProvider, box: LocalBoxSession) -> bytes:
    return b"".join([c async for c in provider.capture_workspace(box.serialize_state())])


def listing(root: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, mtime_ns, content hash or link target) for everything under root."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = (st.st_mode, st.st_mtime_ns, "->" + os.readlink(path))
            elif path.is_file():
                out[rel] = (st.st_mode, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = (st.st_mode, st.st_mtime_ns, "dir")
    return out


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalProvider]:
    p = LocalProvider(tmp_path / "boxes", bubblewrap="never")
    try:
        yield p
    finally:
        await p.aclose()


async def new_box(provider: LocalProvider) -> LocalBoxSession:
    return await provider.create(spec(), f"lease/ws1/g1/{secrets.token_hex(4)}")


def populate(box: LocalBoxSession) -> None:
    ws = box.workspace_path
    (ws / "src" / "pkg").mkdir(parents=True)
    (ws / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (ws / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "secret").write_bytes(b"\x00\x01binary")
    os.chmod(ws / "secret", 0o600)
    (ws / "empty-dir").mkdir()
    (ws / "locked").mkdir()
    (ws / "locked" / "ro.txt").write_text("read only")
    os.chmod(ws / "locked" / "ro.txt", 0o444)
    os.chmod(ws / "locked", 0o555)
    os.symlink("src/pkg/mod.py", ws / "link-rel")
    os.symlink("/workspace/run.sh", ws / "link-abs")
    os.symlink("does-not-exist", ws / "link-dangling")
    os.link(ws / "run.sh", ws / "hardlink.sh")
    os.utime(ws / "src" / "pkg" / "mod.py", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    home = box.home_path
    (home / ".config").mkdir()
    (home / ".config" / "tool.toml").write_text("x = 1\n")


async def test_capture_restore_round_trip_preserves_the_tree(provider: LocalProvider) -> None:
    source = await new_box(provider)
    populate(source)
    archive = await capture(provider, source)
    assert archive_kind(archive) == ("tar+zstd" if zstd_available() else "tar")

    target = await new_box(provider)
    (target.workspace_path / "stale.txt").write_text("must disappear")
    await provider.restore_workspace(
        target.serialize_state(), stream([archive[i : i + 4096] for i in range(0, len(archive), 4096)])
    )

    for sub in ("workspace", "home"):
        assert listing(target.path / sub) == listing(source.path / sub)
    ws = target.workspace_path
    assert os.stat(ws / "run.sh").st_ino == os.stat(ws / "hardlink.sh").st_ino
    assert (ws / "locked").stat().st_mode & 0o777 == 0o555
    assert os.readlink(ws / "link-abs") == "/workspace/run.sh"
    assert not (target.path / ".restore").exists() or not any((target.data_path / ".restore").iterdir())
    # The restored box works: its exec sees the files.
    out = await target.exec(["sh", "-c", "cat src/pkg/mod.py && ./run.sh"])
    assert out.stdout == b"print('hi')\nrun\n"


async def test_archives_are_deterministic_and_survive_a_restore(provider: LocalProvider) -> None:
    source = await new_box(provider)
    populate(source)
    first = await capture(provider, source)
    assert await capture(provider, source) == first
    target = await new_box(provider)
    await provider.restore_workspace(target.serialize_state(), stream([first]))
    # Same tree, same bytes: a periodic capture after a restore can tell "unchanged" by SHA-256.
    assert await capture(provider, target) == first
    (target.workspace_path / "run.sh").write_text("#!/bin/sh\necho changed\n")
    assert await capture(provider, target) != first


async def test_a_stream_that_fails_verification_leaves_the_box_as_it_was(provider: LocalProvider) -> None:
    source = await new_box(provider)
    populate(source)
    archive = await capture(provider, source)
    target = await new_box(provider)
    (target.workspace_path / "keep.txt").write_text("the tree the box had")
    before = listing(target.workspace_path)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ArchiveCorrupt):
        await provider.restore_workspace(
            target.serialize_state(), verified(stream([archive]), sha256=wrong, size_bytes=len(archive))
        )
    assert listing(target.workspace_path) == before
    assert not any((target.data_path / ".restore").iterdir()), "the staged tree must be discarded"


async def test_undecodable_and_empty_archives_are_corrupt(provider: LocalProvider) -> None:
    box = await new_box(provider)
    (box.workspace_path / "keep.txt").write_text("x")
    for bad in ([ZSTD_MAGIC + os.urandom(5000)], [], [b""]):
        with pytest.raises(ArchiveCorrupt):
            await provider.restore_workspace(box.serialize_state(), stream(bad))
    assert (box.workspace_path / "keep.txt").read_text() == "x"


async def test_plain_and_zstd_archives_both_extract(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "workspace" / "d").mkdir(parents=True)
    (src / "workspace" / "d" / "f").write_text("payload")
    (src / "home").mkdir()
    kinds = [False, True] if zstd_available() else [False]
    for compress in kinds:
        data = b"".join([c async for c in stream_tar(src, ["workspace", "home"], compress=compress)])
        assert data.startswith(ZSTD_MAGIC) == compress
        dest = tmp_path / f"out-{compress}"
        dest.mkdir()
        kind = await extract_tar(dest, stream([data]))
        assert kind == ("tar+zstd" if compress else "tar")
        assert (dest / "workspace" / "d" / "f").read_text() == "payload"


async def test_an_abandoned_capture_stops_tar(provider: LocalProvider) -> None:
    box = await new_box(provider)
    (box.workspace_path / "big").write_bytes(os.urandom(8 * 1024 * 1024))
    chunks = provider.capture_workspace(box.serialize_state())
    first = await anext(chunks)
    assert first
    await chunks.aclose()  # type: ignore[attr-defined]
    # Nothing is left running: a new capture of the same box works and is complete.
    assert len(await capture(provider, box)) > 1024 * 1024


async def test_gone_boxes_are_box_not_found(provider: LocalProvider) -> None:
    box = await new_box(provider)
    envelope = box.serialize_state()
    await provider.terminate(envelope)
    with pytest.raises(BoxNotFound):
        await capture(provider, box)
    with pytest.raises(BoxNotFound):
        await provider.restore_workspace(envelope, stream([b"irrelevant"]))
    with pytest.raises(BoxNotFound):
        await provider.workspace_fingerprint(envelope)


async def test_fingerprint_sees_every_change_but_no_reads(provider: LocalProvider) -> None:
    box = await new_box(provider)
    populate(box)
    envelope = box.serialize_state()
    fp = await provider.workspace_fingerprint(envelope)
    assert fp == await provider.workspace_fingerprint(envelope)
    (box.workspace_path / "src" / "pkg" / "mod.py").read_text()
    assert await provider.workspace_fingerprint(envelope) == fp

    # Same size, mtime set back: the change time still moves, so the change is seen.
    target = box.workspace_path / "src" / "pkg" / "mod.py"
    st = target.stat()
    target.write_text("print('HI')\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert await provider.workspace_fingerprint(envelope) != fp
    fp2 = await provider.workspace_fingerprint(envelope)
    (box.home_path / "new").mkdir()
    assert await provider.workspace_fingerprint(envelope) != fp2
    assert tree_fingerprint(box.data_path, ["workspace", "home"]) == await provider.workspace_fingerprint(envelope)


async def test_none_provider_refuses_snapshots() -> None:
    none = NoneProvider()
    envelope = Envelope(backend_id="none", instance_id="x")
    with pytest.raises(Unsupported):
        [c async for c in none.capture_workspace(envelope)]
    with pytest.raises(Unsupported):
        await none.restore_workspace(envelope, stream([b""]))
    with pytest.raises(Unsupported):
        await none.delete_snapshot("snap")


async def test_local_provider_has_no_native_snapshots(provider: LocalProvider) -> None:
    with pytest.raises(Unsupported):
        await provider.delete_snapshot("snap-1")
