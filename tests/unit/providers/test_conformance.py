"""What every provider must do, checked the same way for each backend (see conftest.py).

Each test is what the lease workflow and the planes rely on: a retried create adopts the same box,
commands give exit codes and bytes back, files round-trip, a workspace captured on one box restores
on another, ``BoxNotFound`` only when the box is really gone and never for a transient failure,
resume from a stored envelope, and the orphan sweep's view of owned boxes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from sandbox.box import BoxSession, BoxSpec, Envelope, Provider
from sandbox.errors import BoxNotFound, ExecTimeout, PathNotFound, ProviderUnavailable, Unsupported
from tests.unit.providers.harness import ProviderHarness

_MANIFEST = (
    r"""cd "$1" && find . -mindepth 1 -printf '%P %y %m %s %l\n' | LC_ALL=C sort && """
    r"""find . -type f -exec sha256sum {} + | LC_ALL=C sort -k2"""
)


def _spec(tag: str) -> BoxSpec:
    group = f"g-{tag}-{uuid.uuid4().hex[:8]}"
    return BoxSpec(lease_id=f"lease/conformance/{group}", workspace_id="conformance", group_id=group, epoch=1)


async def _new_box(provider: Provider, tag: str) -> tuple[BoxSpec, str, BoxSession]:
    spec = _spec(tag)
    key = f"{spec.lease_id}#1"
    return spec, key, await provider.create(spec, key)


async def _sh(box: BoxSession, script: str) -> bytes:
    done = await box.exec(["sh", "-c", script])
    assert done.exit_code == 0, done.stderr
    return done.stdout


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _roundtrip(envelope: Envelope) -> Envelope:
    return Envelope.model_validate_json(envelope.model_dump_json())


async def test_create_is_idempotent_by_key(harness: ProviderHarness) -> None:
    provider = harness.provider
    spec, key, first = await _new_box(provider, "idem")
    await first.write_file("marker.txt", b"first")
    again = await provider.create(spec, key)
    assert again.instance_id == first.instance_id
    assert await again.read_file("marker.txt") == b"first"
    _, _, other = await _new_box(provider, "idem-other")
    assert other.instance_id != first.instance_id


async def test_exec_gives_exit_code_and_binary_output(harness: ProviderHarness) -> None:
    _, _, box = await _new_box(harness.provider, "exec")
    done = await box.exec(["sh", "-c", "printf 'out\\000\\377'; echo err >&2; exit 3"])
    assert (done.exit_code, done.stdout, done.stderr) == (3, b"out\x00\xff", b"err\n")
    ok = await box.exec(["sh", "-c", 'printf "%s %s" "$FOO" "$(pwd)"'], env={"FOO": "bar"})
    assert ok.exit_code == 0 and ok.stdout == f"bar {harness.workspace_root}".encode()
    await box.exec(["mkdir", "-p", "sub/dir"])
    inside = await box.exec(["pwd"], workdir="sub/dir")
    assert inside.stdout.strip() == f"{harness.workspace_root}/sub/dir".encode()


async def test_exec_timeout_is_typed_and_prompt(harness: ProviderHarness) -> None:
    _, _, box = await _new_box(harness.provider, "timeout")
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        await box.exec(["sleep", "30"], timeout=1.0)
    assert time.monotonic() - started < 15
    assert (await box.exec(["true"])).exit_code == 0, "the box still runs commands after a timeout"


async def test_files_round_trip(harness: ProviderHarness) -> None:
    _, _, box = await _new_box(harness.provider, "files")
    payload = bytes(range(256)) * 64
    await box.write_file("dir/nested/data.bin", payload)
    assert await box.read_file("dir/nested/data.bin") == payload
    assert await box.read_file(f"{harness.workspace_root}/dir/nested/data.bin") == payload
    await box.write_file(f"{harness.workspace_root}/dir/abs.txt", b"absolute")
    entries = {e.name: e for e in await box.list_dir("dir")}
    assert entries["nested"].kind == "dir"
    assert entries["abs.txt"].kind == "file" and entries["abs.txt"].size == len(b"absolute")
    assert await box.path_exists("dir/nested/data.bin")
    assert not await box.path_exists("dir/missing.txt")
    with pytest.raises(PathNotFound):
        await box.read_file("dir/missing.txt")
    # The file is really in the box: its processes see it.
    assert await _sh(box, "sha256sum dir/nested/data.bin | cut -c1-8") != b""


async def test_exposed_port_resolves_to_an_endpoint(harness: ProviderHarness) -> None:
    _, _, box = await _new_box(harness.provider, "port")
    if not harness.ports_reachable:
        with pytest.raises(Unsupported):
            await box.resolve_exposed_port(6080)
        return
    endpoint = await box.resolve_exposed_port(6080)
    assert endpoint.host and 0 < endpoint.port < 65536


async def test_workspace_captured_on_one_box_restores_on_another(harness: ProviderHarness) -> None:
    provider = harness.provider
    _, _, source = await _new_box(provider, "capture")
    await _sh(
        source,
        "mkdir -p d/empty d/sub && printf hello > d/sub/f.txt && head -c 200000 /dev/urandom > big.bin && "
        "chmod 750 d/sub && chmod 640 d/sub/f.txt && ln -s sub/f.txt d/link",
    )
    archive = b"".join([chunk async for chunk in provider.capture_workspace(source.serialize_state())])
    assert archive
    _, _, target = await _new_box(provider, "restore")
    await target.write_file("stale.txt", b"to be replaced")
    await provider.restore_workspace(target.serialize_state(), _chunks(archive))
    root = harness.workspace_root
    assert await _sh(target, f"{_MANIFEST.replace('$1', root)}") == await _sh(
        source, f"{_MANIFEST.replace('$1', root)}"
    )
    assert not await target.path_exists("stale.txt")
    assert await target.read_file("d/link") == b"hello"


async def test_fingerprint_is_stable_and_sees_changes(harness: ProviderHarness) -> None:
    provider = harness.provider
    _, _, box = await _new_box(provider, "fingerprint")
    await box.write_file("a.txt", b"1")
    first = await provider.workspace_fingerprint(box.serialize_state())
    if first is None:
        return  # "cannot tell cheaply" is allowed: the caller then captures
    assert await provider.workspace_fingerprint(box.serialize_state()) == first
    await box.write_file("a.txt", b"22")
    assert await provider.workspace_fingerprint(box.serialize_state()) != first


async def test_resume_from_a_stored_envelope(harness: ProviderHarness) -> None:
    provider = harness.provider
    _, _, box = await _new_box(provider, "resume")
    await box.write_file("kept.txt", b"still here")
    resumed = await provider.resume(_roundtrip(box.serialize_state()))
    assert resumed.instance_id == box.instance_id
    assert resumed.serialize_state().backend_id == provider.backend_id
    assert await resumed.read_file("kept.txt") == b"still here"


async def test_terminate_makes_the_box_not_found(harness: ProviderHarness) -> None:
    provider = harness.provider
    spec, _, box = await _new_box(provider, "terminate")
    envelope = _roundtrip(box.serialize_state())
    assert any(o.instance_id == box.instance_id and o.lease_id == spec.lease_id for o in await provider.list_owned())
    await provider.terminate(envelope)
    await provider.terminate(envelope)  # idempotent
    with pytest.raises(BoxNotFound):
        resumed = await provider.resume(envelope)
        await resumed.exec(["true"])
    with pytest.raises(BoxNotFound):
        await box.exec(["true"])
    assert all(o.instance_id != box.instance_id for o in await provider.list_owned())


async def test_unknown_id_is_not_found(harness: ProviderHarness) -> None:
    if harness.unknown_id is None:
        pytest.skip("this backend's ids are derived from the idempotency key (every well-formed id can exist)")
    _, _, box = await _new_box(harness.provider, "unknown")
    live = box.serialize_state()
    forged = Envelope.model_validate_json(live.model_dump_json().replace(live.instance_id, harness.unknown_id))
    assert forged.instance_id == harness.unknown_id
    with pytest.raises(BoxNotFound):
        resumed = await harness.provider.resume(forged)
        await resumed.exec(["true"])


@pytest.mark.needs_fake_service
async def test_transient_errors_are_unavailable_never_not_found(harness: ProviderHarness) -> None:
    assert harness.faults is not None and harness.transient_error is not None, "a fake harness must inject faults"
    provider = harness.provider
    _, _, box = await _new_box(provider, "transient")
    envelope = _roundtrip(box.serialize_state())
    for operation, call in (
        ("get", lambda: provider.resume(envelope)),
        ("exec", lambda: box.exec(["true"])),
    ):
        harness.faults.fail(operation, harness.transient_error, times=50)
        try:
            with pytest.raises(ProviderUnavailable) as caught:
                await asyncio.wait_for(call(), timeout=60)
            assert not isinstance(caught.value, BoxNotFound)
        finally:
            harness.faults.clear()
    # Once the service recovers, the same box is there.
    assert (await (await provider.resume(envelope)).exec(["true"])).exit_code == 0


async def test_orphan_sweep_view_and_terminate_by_id_alone(harness: ProviderHarness) -> None:
    """The orphan sweep lists owned boxes (lease, age, epoch) and terminates one knowing only its id."""
    provider = harness.provider
    spec, _, box = await _new_box(provider, "sweep")
    owned = {o.instance_id: o for o in await provider.list_owned()}
    mine = owned[box.instance_id]
    assert mine.lease_id == spec.lease_id
    assert mine.created_at is not None and abs(time.time() - mine.created_at) < 600
    assert mine.labels.get("epoch") == str(spec.epoch)
    full = _roundtrip(box.serialize_state())
    await provider.terminate(Envelope(backend_id=provider.backend_id, instance_id=box.instance_id, state={}))
    with pytest.raises(BoxNotFound):
        resumed = await provider.resume(full)
        await resumed.exec(["true"])
