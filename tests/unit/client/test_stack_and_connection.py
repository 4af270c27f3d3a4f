"""Finding the stack of a data dir and connecting to it, as any client does (no CLI involved)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from client.connection import NoRunningStack, TemporalUnreachable, connect_temporal, open_store
from client.stack import STACK_FILE, StackInfo, read_stack_info, resolve_settings
from sandbox.errors import SandboxConfigError
from sandbox.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SANDBOX_"):
            monkeypatch.delenv(name)


def publish(data_dir: Path, *, pid: int) -> StackInfo:
    info = StackInfo(
        pid=pid,
        temporal_address="127.0.0.1:17233",
        ui_url="http://127.0.0.1:18233",
        nats_url="nats://127.0.0.1:14222",
        data_dir=data_dir,
        started_at=datetime.now(UTC),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STACK_FILE).write_text(info.model_dump_json())
    return info


def test_a_running_stack_supplies_its_addresses(tmp_path: Path) -> None:
    publish(tmp_path, pid=os.getpid())
    settings = resolve_settings(tmp_path)
    assert (settings.temporal_address, settings.nats_url) == ("127.0.0.1:17233", "nats://127.0.0.1:14222")
    assert settings.data_dir == tmp_path.resolve()


def test_an_address_set_in_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(tmp_path, pid=os.getpid())
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", "temporal.example:7233")
    settings = resolve_settings(tmp_path)
    assert (settings.temporal_address, settings.nats_url) == ("temporal.example:7233", "nats://127.0.0.1:14222")


def test_a_dead_or_garbled_stack_file_counts_as_no_stack(tmp_path: Path) -> None:
    publish(tmp_path, pid=2**22 + 12345)  # above any pid_max: no such process
    assert read_stack_info(tmp_path) is None
    assert resolve_settings(tmp_path).temporal_address == Settings().temporal_address
    (tmp_path / STACK_FILE).write_text("{not json")
    assert read_stack_info(tmp_path) is None


def test_the_data_dir_comes_from_the_environment_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tmp_path, pid=os.getpid())
    monkeypatch.setenv("SANDBOX_DATA_DIR", str(tmp_path))
    assert resolve_settings().temporal_address == "127.0.0.1:17233"


def test_a_malformed_setting_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_HOLDER_TTL_SECONDS", "not a number")
    with pytest.raises(SandboxConfigError, match="SANDBOX_"):
        resolve_settings(tmp_path)


async def test_nothing_listening_is_temporal_unreachable_naming_the_address(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, temporal_address=address, payload_encryption=False)
    with pytest.raises(TemporalUnreachable) as caught:
        await connect_temporal(settings)
    assert caught.value.address == address and address in caught.value.message
    assert caught.value.retryable


async def test_open_store_yields_a_migrated_store_and_disposes_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    async with open_store(settings) as db:
        async with db.sessionmaker() as session:
            tables = (await session.execute(text("select name from sqlite_master where type='table'"))).scalars()
            assert "sandbox_leases" in set(tables)
    assert (tmp_path / "sandbox.db").is_file()


async def test_no_stack_and_no_address_is_no_running_stack_and_dials_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker

    async def dial(settings: Settings) -> None:
        raise AssertionError(f"dialled {settings.temporal_address} though nobody chose it")

    monkeypatch.setattr(worker, "connect", dial)
    settings = resolve_settings(tmp_path / "nothing-runs-here")
    with pytest.raises(NoRunningStack) as caught:
        await connect_temporal(settings)
    message = caught.value.message
    assert str(tmp_path / "nothing-runs-here") in message
    assert "sandboxctl up" in message and "SANDBOX_TEMPORAL_ADDRESS" in message
    assert isinstance(caught.value, TemporalUnreachable) and not caught.value.retryable
    assert not (tmp_path / "nothing-runs-here").exists()


async def test_an_explicit_address_or_a_running_stack_is_dialled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Positive controls: the same data dir without a stack connects once an address is chosen.
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", address)
    monkeypatch.setenv("SANDBOX_PAYLOAD_ENCRYPTION", "false")
    with pytest.raises(TemporalUnreachable) as caught:
        await connect_temporal(resolve_settings(tmp_path))
    assert type(caught.value) is TemporalUnreachable and caught.value.address == address

    monkeypatch.delenv("SANDBOX_TEMPORAL_ADDRESS")
    info = publish(tmp_path, pid=os.getpid()).model_copy(update={"temporal_address": address})
    (tmp_path / STACK_FILE).write_text(info.model_dump_json())
    with pytest.raises(TemporalUnreachable) as caught:
        await connect_temporal(resolve_settings(tmp_path))
    assert type(caught.value) is TemporalUnreachable and caught.value.address == address


async def test_a_client_without_payload_keys_is_refused_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit address, a missing data dir and no SANDBOX_PAYLOAD_KEYS: a typed error, nothing made.

    A client that made a keys file would encrypt with a key the worker does not have. Positive
    control: once the worker side made the keys, the same client gets past them and dials the address.
    """
    from sandbox.payload_codec import ensure_payload_keys

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", address)
    data = tmp_path / "missing"
    settings = resolve_settings(data)
    with pytest.raises(SandboxConfigError) as caught:
        await connect_temporal(settings)
    assert type(caught.value) is SandboxConfigError
    message = caught.value.message
    assert "SANDBOX_PAYLOAD_KEYS" in message and str(data / "secrets" / "payload-keys.json") in message
    assert "sandboxctl up" in message
    assert not data.exists()

    ensure_payload_keys(settings)
    with pytest.raises(TemporalUnreachable) as unreachable:
        await connect_temporal(settings)
    assert unreachable.value.address == address


def test_a_data_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0::/root:/bin/sh\n")
    with pytest.raises(SandboxConfigError) as caught:
        resolve_settings(file)
    assert str(file) in caught.value.message and "not a directory" in caught.value.message
