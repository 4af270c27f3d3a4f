"""RecordingWorkflow end to end: real Temporal dev server, worker, local boxes, Xvfb and ffmpeg.

The main path (a recording stored and playable) also runs on the docker backend on the real
engine (podman, ``docker_engine_runtime``); skipped there only when podman is absent.

Each recording holds its lease (acquired in the test through LeaseClient) as a ``recording`` holder.
Set ``SANDBOX_RECORD_HISTORIES=1`` to (re)write the replay fixtures under ``tests/replay/histories``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from client.recording_client import RecordingClient, save_recording
from store.artifacts import FilesystemArtifactStore, artifact_root, artifact_store
from store.recordings import RecordingStore
from store.s3_artifacts import S3ArtifactStore
from tests.conftest import box_visible_bin, eventually, ids
from tests.integration.recording.conftest import FAST, box_tmp, ffprobe, wait_state
from workflows.models.recording import recording_workflow_id

pytestmark = pytest.mark.timeout(90)

HISTORIES = Path(__file__).resolve().parents[2] / "replay" / "histories"
ENGINE = "docker_engine"
"""The docker backend on the session's real engine (``docker_engine_runtime``)."""


async def record_history(runtime: Any, recording_id: str, name: str) -> None:
    """Save the recording workflow's history as a replay fixture when recording is switched on."""
    if os.environ.get("SANDBOX_RECORD_HISTORIES") != "1":
        return
    history = await runtime.client.get_workflow_handle(recording_workflow_id(recording_id)).fetch_history()
    (HISTORIES / f"recording_{name}.json").write_text(history.to_json())


@pytest.fixture
def on(request: pytest.FixtureRequest) -> Any:
    """The runtime of the backend a test is parametrized ``on``: local boxes, or docker on the real engine."""
    return request.getfixturevalue("docker_engine_runtime" if request.param == ENGINE else "runtime")


async def box_recording_files(runtime: Any, ws: str, group: str, instance_id: str, rid: str) -> list[str]:
    """The names of the recording's files in the box's temp dir (``og-rec-<id>.*``), sorted.

    A local box's temp dir is looked at on the host; a docker box's through an exec in the box.
    """
    if runtime.settings.default_backend != "docker":
        return sorted(p.name for p in box_tmp(runtime, instance_id).glob(f"og-rec-{rid}.*"))
    out = await runtime.leases().exec(
        ws,
        group,
        [
            "sh",
            "-c",
            'cd "${TMPDIR:-/tmp}" && for f in og-rec-"$1".*; do [ -e "$f" ] && echo "$f"; done; true',
            "sh",
            rid,
        ],
    )
    assert out.exit_code == 0, out
    return sorted(out.stdout.split())


@pytest.mark.parametrize(
    ("on", "codec", "ext", "codec_name"),
    [
        ("local", "h264-mp4", "mp4", "h264"),
        ("local", "vp9-webm", "webm", "vp9"),
        # The docker backend on the real engine: ffmpeg in a hardened box, the file read back by dd.
        pytest.param(ENGINE, "h264-mp4", "mp4", "h264", marks=pytest.mark.container_engine),
    ],
    indirect=["on"],
)
async def test_a_three_second_recording_is_stored_and_plays(
    on: Any, tmp_path: Path, codec: str, ext: str, codec_name: str
) -> None:
    runtime = on
    recordings = RecordingClient(runtime.client, runtime.settings)
    leases = runtime.leases()
    ws, group = ids("ws-rec")
    async with leases.hold(ws, group, kind="turn") as grant:
        started = await recordings.start(ws, group, recordings.request(codec=codec, session_id="s1"), timers=FAST)
        rid = started.recording_id
        view = await wait_state(recordings, rid, "recording")
        began = time.monotonic()
        assert view.epoch == grant.epoch and view.instance_id == grant.instance_id
        assert (view.width, view.height) == (1280, 800)
        lease = await leases.describe(ws, group)
        assert ("recording", rid) in {(h.kind, h.holder_id) for h in lease.holders}
        box_file = f"og-rec-{rid}.{ext}"
        # ffmpeg opens its output once the encoder is ready: in the box's /tmp, outside the workspace.
        await eventually(
            lambda: _listed(box_recording_files(runtime, ws, group, grant.instance_id, rid), box_file),
            timeout=5,
            interval=0.05,
        )

        await asyncio.sleep(3 - (time.monotonic() - began))
        wall = time.monotonic() - began
        stopped = await recordings.stop(rid, wait=True)

        assert stopped.state == "available", stopped
        assert stopped.stop_cause == "requested"
        assert stopped.storage_key == f"recordings/{ws}/s1/{rid}.{ext}"
        row = await RecordingStore(runtime.db).get(rid)
        assert row is not None and row.state == "available" and row.reason is None
        assert row.storage_key == stopped.storage_key and row.codec == codec
        assert (row.width, row.height) == (1280, 800)
        stored = FilesystemArtifactStore(artifact_root(runtime.settings)).path_of(row.storage_key)
        assert stored.stat().st_size == row.size_bytes and row.size_bytes > 0
        probe = ffprobe(stored)
        duration = float(probe["format"]["duration"])
        # On the engine, the start and the stop each reach ffmpeg through engine execs (0.1-0.5 s each
        # on a loaded 2-core machine), time the video has and the test's clock does not.
        slack = 0.2 * wall + (1.0 if runtime.settings.default_backend == "docker" else 0.0)
        assert abs(duration - wall) <= slack, (duration, wall)
        assert row.duration_seconds is not None and abs(row.duration_seconds - duration) < 0.05
        assert probe["streams"][0]["codec_name"] == codec_name
        assert (probe["streams"][0]["width"], probe["streams"][0]["height"]) == (1280, 800)
        left = await box_recording_files(runtime, ws, group, grant.instance_id, rid)
        assert box_file not in left, "the box file is deleted once the row is committed"
        assert not left

        # The recording released its holder; stop again is idempotent and reports the same outcome.
        lease = await leases.describe(ws, group)
        assert "recording" not in {h.kind for h in lease.holders}
        again = await recordings.stop(rid, wait=True)
        assert (again.state, again.storage_key, again.size_bytes) == ("available", row.storage_key, row.size_bytes)
    if codec == "h264-mp4" and runtime.settings.default_backend != "docker":
        await record_history(runtime, rid, "available")


async def test_max_seconds_stops_by_itself(runtime: Any, recordings: RecordingClient) -> None:
    ws, group = ids("ws-rec")
    async with runtime.leases().hold(ws, group):
        started = await recordings.start(ws, group, recordings.request(max_seconds=2), timers=FAST)
        view = await recordings.result(started.recording_id, timeout=40)
    assert view.state == "available", view
    assert view.stop_cause in ("max-duration", "ffmpeg-exited")
    assert view.duration_seconds is not None and 1.5 <= view.duration_seconds <= 2.5
    await record_history(runtime, started.recording_id, "max_seconds")


async def test_tiny_max_bytes_fails_and_keeps_the_box_file(runtime: Any, recordings: RecordingClient) -> None:
    ws, group = ids("ws-rec")
    async with runtime.leases().hold(ws, group) as grant:
        # Even the first bytes ffmpeg writes are over 10: the check while recording stops it by itself.
        started = await recordings.start(ws, group, recordings.request(max_bytes=10), timers=FAST)
        view = await recordings.result(started.recording_id, timeout=40)
        assert (view.state, view.reason) == ("failed", "max-bytes-exceeded"), view
        assert view.stop_cause == "max-bytes"
        box_file = box_tmp(runtime, grant.instance_id) / f"og-rec-{started.recording_id}.mp4"
        assert view.size_bytes is not None and box_file.stat().st_size == view.size_bytes > 10, "kept on the box"
    row = await RecordingStore(runtime.db).get(started.recording_id)
    assert row is not None and (row.state, row.reason, row.storage_key) == ("failed", "max-bytes-exceeded", None)
    assert (
        not FilesystemArtifactStore(artifact_root(runtime.settings))
        .path_of(f"recordings/{ws}/{group}/{started.recording_id}.mp4")
        .exists()
    )
    await record_history(runtime, started.recording_id, "max_bytes_exceeded")


async def test_terminating_the_box_mid_recording_is_box_death(runtime: Any, recordings: RecordingClient) -> None:
    from sandbox.box import Envelope

    ws, group = ids("ws-rec")
    leases = runtime.leases()
    grant = await leases.acquire(ws, group, holder_id="t1")
    started = await recordings.start(ws, group, recordings.request(), timers=FAST)
    await wait_state(recordings, started.recording_id, "recording")
    provider = runtime_provider(runtime)
    await provider.terminate(Envelope(**grant.envelope.model_dump()))
    view = await recordings.result(started.recording_id, timeout=40)
    assert (view.state, view.reason) == ("failed", "box-death"), view
    assert view.stop_cause == "box-lost"
    # The recording told the lease, which confirmed with the provider and went cold.
    lease = await eventually(lambda: _cold(leases, ws, group), timeout=30)
    assert lease.epoch > grant.epoch
    await record_history(runtime, started.recording_id, "box_death")


async def test_no_display_is_display_unavailable(runtime: Any, recordings: RecordingClient) -> None:
    # Xvfb on the box's PATH fails at once: the desktop cannot come up.
    with box_visible_bin({"Xvfb": "#!/bin/sh\necho 'no display for you' >&2\nexit 1\n"}) as bindir:
        ws, group = ids("ws-rec")
        env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
        grant = await runtime.leases().acquire(ws, group, holder_id="t1", environment=env)
        started = await recordings.start(ws, group, recordings.request(), timers=FAST)
        view = await recordings.result(started.recording_id, timeout=40)
        assert (view.state, view.reason) == ("failed", "display-unavailable"), view
        assert view.epoch == grant.epoch and "xvfb" in (view.detail or "")
        lease = await runtime.leases().describe(ws, group)
        assert "recording" not in {h.kind for h in lease.holders}
        await runtime.leases().release(ws, group, "t1")
    await record_history(runtime, started.recording_id, "display_unavailable")


async def test_a_recording_of_a_missing_lease_fails_without_a_box(recordings: RecordingClient) -> None:
    ws, group = ids("ws-rec")
    started = await recordings.start(ws, group, recordings.request(), timers=FAST)
    view = await recordings.result(started.recording_id, timeout=30)
    assert (view.state, view.reason) == ("failed", "box-death")
    assert "LeaseNotFound" in (view.detail or "")


async def _listed(names: Awaitable[list[str]], name: str) -> bool:
    return name in await names


async def _cold(leases: Any, ws: str, group: str) -> Any:
    view = await leases.describe(ws, group)
    return view if view.liveness == "cold" else None


def runtime_provider(runtime: Any) -> Any:
    from providers.local import LocalProvider

    return LocalProvider(runtime.settings.boxes_dir())


async def test_a_recording_on_a_worker_with_s3_artifacts_goes_to_the_bucket_and_saves(
    s3_runtime: Any, tmp_path: Path
) -> None:
    recordings = RecordingClient(s3_runtime.client, s3_runtime.settings)
    ws, group = ids("ws-rec-s3")
    async with s3_runtime.leases().hold(ws, group):
        started = await recordings.start(ws, group, recordings.request(max_seconds=2), timers=FAST)
        view = await recordings.result(started.recording_id, timeout=40)
    assert view.state == "available", view
    row = await RecordingStore(s3_runtime.db).get(started.recording_id)
    assert row is not None and row.storage_key is not None and row.size_bytes
    store = artifact_store(s3_runtime.settings)
    assert isinstance(store, S3ArtifactStore)
    assert await store.size_of(row.storage_key) == row.size_bytes
    local = FilesystemArtifactStore(artifact_root(s3_runtime.settings))
    assert not local.path_of(row.storage_key).exists(), "nothing of it on the worker's disk"
    # What `sandboxctl recording save` does: it reads the bucket too.
    saved = await save_recording(s3_runtime.settings, s3_runtime.db, started.recording_id, tmp_path / "out.mp4")
    assert saved.size_bytes == row.size_bytes
    probe = ffprobe(tmp_path / "out.mp4")
    assert probe["streams"][0]["codec_name"] == "h264" and 1.5 <= float(probe["format"]["duration"]) <= 2.5
