"""The runtime's own secrets: made once, private, never read through a symlink or from an open file."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from sandbox.errors import SandboxConfigError
from sandbox.secret_files import load_or_create_secret, read_secret, write_private_file


def test_a_new_secret_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "k"
    first = load_or_create_secret(path, what="test key")
    assert len(first) == 32 and load_or_create_secret(path, what="test key") == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["k"]  # no temporary left


def test_concurrent_first_use_agrees_on_one_value(tmp_path: Path) -> None:
    path = tmp_path / "k"
    seen: list[bytes] = []
    threads = [threading.Thread(target=lambda: seen.append(load_or_create_secret(path, what="k"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8 and len(set(seen)) == 1


def test_a_secret_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    load_or_create_secret(path, what="test key")
    path.chmod(0o640)
    with pytest.raises(SandboxConfigError, match=r"test key .*readable by group or others .*chmod 600"):
        load_or_create_secret(path, what="test key")
    path.chmod(0o600)  # positive control: the same file, private again, is used
    assert load_or_create_secret(path, what="test key")


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_private_file(real, b"value")
    link = tmp_path / "k"
    link.symlink_to(real)
    with pytest.raises(SandboxConfigError, match="symlink is not followed"):
        load_or_create_secret(link, what="test key")
    assert load_or_create_secret(real, what="test key") == b"value"


def test_an_empty_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_private_file(path, b"")
    with pytest.raises(SandboxConfigError, match="empty"):
        load_or_create_secret(path, what="test key")


def test_read_secret_never_creates_and_reads_what_was_made(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "secrets" / "k"
    assert read_secret(path, what="test key") is None
    assert not (tmp_path / "missing").exists()  # neither the file nor any directory
    made = load_or_create_secret(path, what="test key")  # positive control: the maker's file is read
    assert read_secret(path, what="test key") == made
    path.chmod(0o644)
    with pytest.raises(SandboxConfigError, match="chmod 600"):
        read_secret(path, what="test key")


def test_write_private_file_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "d" / "f"
    write_private_file(path, b"one")
    path.chmod(0o644)
    write_private_file(path, b"two")
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
