"""Activities of the recording workflow: ffmpeg in the box, the box file, the artifact, the row, the lease.

Box side (one short command each, so no exec ever blocks on ffmpeg):

- ``start``: ``nohup setsid ffmpeg -f x11grab … -t <max_seconds> <encoder> <file>`` in the background,
  with a pid file ``<pid> <start time>`` (the start time tells a recycled pid apart). A retried start
  adopts the ffmpeg an earlier attempt launched.
- ``probe``: is that ffmpeg still running, and how big is its file.
- ``stop``: SIGINT (ffmpeg writes its trailer), a bounded wait, then SIGKILL; idempotent.
- ``inspect``: ``stat`` the file against the size gate, and ``ffprobe`` it (duration, geometry), so a
  missing file proves ``box-death``, an empty or unreadable one ``ffmpeg-error``, and one above
  ``max_bytes`` ``max-bytes-exceeded`` (the file is left on the box).
- ``upload``: copy the file into the artifact store without holding it in memory. A local box's file
  is opened on the host (its ``/tmp`` is ``<box>/tmp``; without following symbolic links) and, when
  the store can take a file (:class:`~store.artifacts.LocalFileArtifactStore`, the filesystem
  store), copied by the kernel; otherwise it is streamed chunk by chunk. Other boxes are read
  through ``dd`` one chunk per exec.
- ``delete``: ``rm -f`` the file, pid file and log; the workflow calls it only after the row committed.

Files live in the box's temp directory, outside the workspace: ``${TMPDIR:-/tmp}/og-rec-<id>.<ext>``,
``.pid`` and ``.log``. The display and its X authority are the desktop plane's
(``.sandbox-edge/desktop/{display,xauth}`` beside them).

Lease side: the recording holds its lease as the ``recording`` holder ``<recording_id>`` through the
lease workflow's own ``acquire``/``heartbeat``/``release`` updates, called here with the worker's
Temporal client (a workflow cannot call another workflow's update).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from temporalio import activity

from activities.box_sessions import BoxSessions
from activities.provider_errors import maps_provider_errors
from providers.local import LocalBoxSession, LocalProvider
from providers.registry import ProviderRegistry
from sandbox.box import BoxSession
from sandbox.errors import BoxNotFound, HolderNotFound, LeaseNotFound, RecordingError
from sandbox.failures import call_workflow
from store.artifacts import CHUNK_SIZE, ArtifactStore, LocalFileArtifactStore, StoredArtifact
from store.recordings import RecordingStore
from workflows.activity_names import ActivityName
from workflows.lease import LeaseWorkflow
from workflows.models.lease import (
    AcquireRequest,
    BoxLostReport,
    BoxLostResult,
    HeartbeatRequest,
    HeartbeatResult,
    HolderRef,
    LeaseGrant,
    ReleaseResult,
    lease_workflow_id,
)
from workflows.models.recording import (
    FfmpegProbe,
    FfmpegProcess,
    FfmpegStartInput,
    FfmpegStopInput,
    FfmpegStopped,
    InspectInput,
    Inspection,
    LeaseBoxLostInput,
    LeaseHolderInput,
    ProjectRecordingInput,
    RecordingBoxInput,
    UploadInput,
    UploadResult,
    box_file_name,
    codec_extension,
)

__all__ = ["RecordingActivities", "ffmpeg_encoder_args"]

COMMAND_TIMEOUT_SECONDS: Final = 30.0
EXIT_START_FAILED: Final = 21
EXIT_MISSING_TOOL: Final = 16
LOG_TAIL_BYTES: Final = 600
READ_CHUNK: Final = CHUNK_SIZE
"""Chunks of a host-visible box file streamed to a store that cannot copy files: at most two in memory."""

# Shared by every box script: names of the files from "$1" (og-rec-<id>) and "$2" (the extension), and
# `alive`, true while the process in the pid file is the one that was recorded (builtins only).
_PREAMBLE: Final = r"""
set -u
DIR=${TMPDIR:-/tmp}
EDGE=${SANDBOX_EDGE_DIR:-$DIR/.sandbox-edge}
OUT="$DIR/$1.$2"
PIDF="$DIR/$1.pid"
LOG="$DIR/$1.log"
proc_start() {
    local s
    read -r s 2>/dev/null <"/proc/$1/stat" || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    [ "$1" != Z ] && [ "$1" != X ] || return 1
    PSTART=${20}
}
alive() {
    local pid start
    read -r pid start 2>/dev/null <"$PIDF" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    proc_start "$pid" || return 1
    [ "$PSTART" = "$start" ]
}
"""

_START: Final = (
    _PREAMBLE
    + r"""
# $3 display number, $4 WxH, $5 framerate, $6 max seconds, $7 codec
if alive; then
    read -r pid _ <"$PIDF"
    echo "SANDBOX_RECORDING_STARTED pid=$pid path=$OUT adopted=1"
    exit 0
fi
command -v ffmpeg >/dev/null 2>&1 || { echo "SANDBOX_RECORDING_UNAVAILABLE missing=ffmpeg"; exit 16; }
case "$7" in
    h264-mp4) ENC=(-c:v libx264 -preset veryfast -pix_fmt yuv420p -movflags +faststart) ;;
    vp9-webm) ENC=(-c:v libvpx-vp9 -b:v 0 -crf 32 -row-mt 1 -deadline realtime -cpu-used 8) ;;
    *) echo "unknown codec $7" >&2; exit 2 ;;
esac
rm -f "$OUT" "$LOG" "$PIDF"
XAUTHORITY="$EDGE/desktop/xauth" nohup setsid ffmpeg -nostdin -hide_banner -loglevel error -y \
    -f x11grab -draw_mouse 1 -framerate "$5" -video_size "$4" -i ":$3.0" -t "$6" "${ENC[@]}" "$OUT" \
    </dev/null >"$LOG" 2>&1 &
pid=$!
PSTART=0
proc_start "$pid"
echo "$pid $PSTART" >"$PIDF"
# ffmpeg fails fast on a bad display or encoder: give it a moment to prove it runs.
for _ in 1 2 3; do
    alive || break
    sleep 0.05
done
if ! alive; then
    echo "ffmpeg exited at once: $(tail -c 600 "$LOG" 2>/dev/null)" >&2
    exit 21
fi
echo "SANDBOX_RECORDING_STARTED pid=$pid path=$OUT adopted=0"
"""
)

_PROBE: Final = (
    _PREAMBLE
    + r"""
a=0
alive && a=1
size=$(stat -c %s "$OUT" 2>/dev/null) || size=-1
echo "SANDBOX_RECORDING_PROBE alive=$a size=$size"
"""
)

_STOP: Final = (
    _PREAMBLE
    + r"""
# $3 tenths of a second to wait for ffmpeg to finish its file after SIGINT
was=0 exited=1 killed=0
if alive; then
    was=1
    read -r pid _ <"$PIDF"
    kill -INT "$pid" 2>/dev/null
    for ((i = 0; i < $3; i++)); do
        alive || break
        sleep 0.1
    done
    if alive; then
        kill -KILL "$pid" 2>/dev/null
        killed=1 exited=0
        for _ in 1 2 3 4 5 6 7 8 9 10; do alive || break; sleep 0.05; done
    fi
fi
echo "SANDBOX_RECORDING_STOPPED was_running=$was exited=$exited killed=$killed"
"""
)

_INSPECT: Final = (
    _PREAMBLE
    + r"""
# $3 max bytes
if ! size=$(stat -c %s "$OUT" 2>/dev/null); then
    echo "SANDBOX_RECORDING_INSPECT missing"
    exit 0
fi
echo "SANDBOX_RECORDING_INSPECT size=$size"
if [ "$size" -gt 0 ] && [ "$size" -le "$3" ] && command -v ffprobe >/dev/null 2>&1; then
    ffprobe -v error -select_streams v:0 -show_entries stream=width,height:format=duration \
        -of default=noprint_wrappers=1 "$OUT" 2>&1 | head -c 2000
    echo "SANDBOX_FFPROBE rc=${PIPESTATUS[0]}"
fi
echo "SANDBOX_RECORDING_LOG"
tail -c 600 "$LOG" 2>/dev/null
exit 0
"""
)

_DELETE: Final = _PREAMBLE + '\nrm -f "$OUT" "$PIDF" "$LOG" && echo "SANDBOX_RECORDING_DELETED"\n'

_READ_CHUNK: Final = _PREAMBLE + '\nexec dd if="$OUT" bs="$3" skip="$4" count=1 status=none\n'

_STARTED_RE: Final = re.compile(r"^SANDBOX_RECORDING_STARTED pid=(\d+) path=(\S+) adopted=([01])$", re.M)
_PROBE_RE: Final = re.compile(r"^SANDBOX_RECORDING_PROBE alive=([01]) size=(-?\d+)$", re.M)
_STOPPED_RE: Final = re.compile(r"^SANDBOX_RECORDING_STOPPED was_running=([01]) exited=([01]) killed=([01])$", re.M)
_INSPECT_RE: Final = re.compile(r"^SANDBOX_RECORDING_INSPECT (missing|size=(\S+))$", re.M)
_FFPROBE_RC_RE: Final = re.compile(r"^SANDBOX_FFPROBE rc=(\d+)$", re.M)


def ffmpeg_encoder_args(codec: str) -> list[str]:
    """The encoder arguments the start script uses for ``codec`` (documentation and tests)."""
    if codec == "h264-mp4":
        return ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
    return ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "32", "-row-mt", "1", "-deadline", "realtime", "-cpu-used", "8"]


@contextlib.asynccontextmanager
async def _heartbeating(interval: float = 1.0) -> AsyncIterator[None]:
    """Heartbeat while the block runs when inside an activity (tests call the methods directly)."""
    if not activity.in_activity():
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


def _parse_ffprobe(text: str) -> tuple[float | None, int | None, int | None]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name in ("duration", "width", "height"):
            values[name] = value.strip()

    def number(name: str) -> float | None:
        try:
            return float(values[name])
        except (KeyError, ValueError):
            return None

    duration, width, height = number("duration"), number("width"), number("height")
    return duration, int(width) if width else None, int(height) if height else None


class RecordingActivities:
    """Recording activities; one instance per worker.

    Args:
        providers: The worker's provider registry.
        recordings: The ``recordings`` table.
        artifacts: Where finished videos are stored.
    """

    def __init__(self, providers: ProviderRegistry, recordings: RecordingStore, artifacts: ArtifactStore) -> None:
        self._providers = providers
        self._recordings = recordings
        self._artifacts = artifacts
        self._sessions = BoxSessions(providers)

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """Every recording activity, for the worker's activity list."""
        return [
            self.hold_lease,
            self.heartbeat_lease,
            self.release_lease,
            self.report_box_lost,
            self.start,
            self.probe,
            self.stop,
            self.inspect,
            self.upload,
            self.delete_box_files,
            self.project,
        ]

    # -- box helpers ----------------------------------------------------------------------------

    async def _script(self, inp: RecordingBoxInput, script: str, *args: str) -> tuple[int, str, str]:
        base = box_file_name(inp.recording_id, inp.codec).rsplit(".", 1)[0]
        argv = ["bash", "-c", script, "recording", base, codec_extension(inp.codec), *args]
        try:
            session = await self._sessions.get(inp.backend, inp.envelope)
            result = await session.exec(argv, timeout=COMMAND_TIMEOUT_SECONDS)
        except BoxNotFound:
            self._sessions.forget(inp.backend, inp.envelope.instance_id)
            raise
        return result.exit_code, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")

    # -- ffmpeg ---------------------------------------------------------------------------------

    @activity.defn(name=ActivityName.RECORDING_START_FFMPEG)
    @maps_provider_errors
    async def start(self, inp: FfmpegStartInput) -> FfmpegProcess:
        """Launch ffmpeg x11grab in the background (or adopt the one a previous attempt launched).

        Raises:
            RecordingError: ffmpeg is missing or exited at once (``reason`` ``ffmpeg-error``).
            BoxNotFound: The box is gone.
        """
        code, out, err = await self._script(
            inp,
            _START,
            str(inp.display),
            f"{inp.width}x{inp.height}",
            str(inp.framerate),
            str(inp.max_seconds),
            inp.codec,
        )
        m = _STARTED_RE.search(out)
        if code == 0 and m is not None:
            return FfmpegProcess(pid=int(m[1]), box_path=m[2], adopted=m[3] == "1")
        if code == EXIT_MISSING_TOOL:
            raise RecordingError("this box cannot record: ffmpeg is missing", reason="ffmpeg-error")
        raise RecordingError(
            f"ffmpeg did not start (exit {code}): {(err or out).strip()[-LOG_TAIL_BYTES:]}", reason="ffmpeg-error"
        )

    @activity.defn(name=ActivityName.RECORDING_PROBE_FFMPEG)
    @maps_provider_errors
    async def probe(self, inp: RecordingBoxInput) -> FfmpegProbe:
        """Whether the recorded ffmpeg still runs, and the size of its file so far (-1: no file).

        Raises:
            BoxNotFound: The box is gone.
        """
        code, out, err = await self._script(inp, _PROBE)
        m = _PROBE_RE.search(out)
        if m is None:
            raise RecordingError(f"probing ffmpeg failed (exit {code}): {err.strip()[-300:]}", retryable=True)
        return FfmpegProbe(alive=m[1] == "1", size_bytes=int(m[2]))

    @activity.defn(name=ActivityName.RECORDING_STOP_FFMPEG)
    @maps_provider_errors
    async def stop(self, inp: FfmpegStopInput) -> FfmpegStopped:
        """SIGINT ffmpeg, wait up to ``wait_seconds`` for its trailer, then SIGKILL; idempotent.

        Raises:
            BoxNotFound: The box is gone.
        """
        tenths = max(1, round(inp.wait_seconds * 10))
        code, out, err = await self._script(inp, _STOP, str(tenths))
        m = _STOPPED_RE.search(out)
        if m is None:
            raise RecordingError(f"stopping ffmpeg failed (exit {code}): {err.strip()[-300:]}", retryable=True)
        return FfmpegStopped(was_running=m[1] == "1", exited=m[2] == "1", killed=m[3] == "1")

    # -- finalize -------------------------------------------------------------------------------

    @activity.defn(name=ActivityName.RECORDING_INSPECT)
    @maps_provider_errors
    async def inspect(self, inp: InspectInput) -> Inspection:
        """Check the box file: missing (``box-death``), empty or unreadable (``ffmpeg-error``), too big, or ok.

        A box that is gone is ``box-death`` too (the file went with it).
        """
        try:
            code, out, err = await self._script(inp, _INSPECT, str(inp.max_bytes))
        except BoxNotFound:
            return Inspection(outcome="box-death", detail="the box is gone, and the video with it")
        head, _, log = out.partition("SANDBOX_RECORDING_LOG\n")
        log = log.strip()[-LOG_TAIL_BYTES:]
        m = _INSPECT_RE.search(head)
        if m is None:
            raise RecordingError(f"inspecting the video failed (exit {code}): {err.strip()[-300:]}", retryable=True)
        if m[1] == "missing":
            return Inspection(outcome="box-death", detail="the video file is not on the box (the box was replaced?)")
        try:
            size = int(m[2])
        except ValueError:
            size = 0
        if size <= 0:
            return Inspection(outcome="ffmpeg-error", size_bytes=max(size, 0), detail=f"empty video; ffmpeg: {log}")
        if size > inp.max_bytes:
            return Inspection(
                outcome="max-bytes-exceeded",
                size_bytes=size,
                detail=f"{size} bytes is over the {inp.max_bytes} byte limit; the file is kept on the box",
            )
        rc = _FFPROBE_RC_RE.search(head)
        if rc is None:  # no ffprobe in the box: the size gate is all we can check here
            return Inspection(outcome="ok", size_bytes=size)
        duration, width, height = _parse_ffprobe(head[: rc.start()])
        if rc[1] != "0" or duration is None:
            probe_out = head[m.end() : rc.start()].strip()[-300:]
            return Inspection(
                outcome="ffmpeg-error", size_bytes=size, detail=f"ffprobe cannot read the video: {probe_out} {log}"
            )
        return Inspection(outcome="ok", size_bytes=size, duration_seconds=duration, width=width, height=height)

    def _host_file(self, inp: RecordingBoxInput, session: BoxSession) -> Path | None:
        """The box file on the host when the box's temp directory is a host directory (local boxes)."""
        provider = self._providers.get(inp.backend)
        if not isinstance(provider, LocalProvider) or not isinstance(session, LocalBoxSession):
            return None
        # Both isolation modes give the box <box>/tmp as its temp directory.
        return session.tmp_path / box_file_name(inp.recording_id, inp.codec)

    @staticmethod
    async def _open_host_file(path: Path) -> int:
        try:
            # O_NOFOLLOW: whatever runs in the box must not be able to point us at a host file.
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RecordingError("the video file disappeared from the box before the upload") from None
        except OSError as err:
            raise RecordingError(f"cannot open the video on the box: {err}") from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RecordingError("the video in the box is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _put_host_file(self, key: str, path: Path, size: int) -> StoredArtifact:
        fd = await self._open_host_file(path)
        try:
            if isinstance(self._artifacts, LocalFileArtifactStore):
                return await self._artifacts.put_file(key, fd, size)
            return await self._artifacts.put(key, self._fd_chunks(fd, size))
        finally:
            os.close(fd)

    @staticmethod
    async def _fd_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
        pending: asyncio.Future[bytes] | None = None
        try:
            sent = 0
            # One read ahead: the next chunk is read while the store hashes and writes this one.
            pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, min(READ_CHUNK, size)))
            while sent < size and pending is not None:
                chunk = await pending
                pending = None
                if not chunk:
                    break
                sent += len(chunk)
                if sent < size:
                    pending = asyncio.ensure_future(asyncio.to_thread(os.read, fd, min(READ_CHUNK, size - sent)))
                yield chunk
        finally:
            if pending is not None:
                # Never let the caller close the descriptor under a read in flight.
                await asyncio.gather(pending, return_exceptions=True)

    async def _exec_chunks(self, inp: RecordingBoxInput, size: int) -> AsyncIterator[bytes]:
        base = box_file_name(inp.recording_id, inp.codec).rsplit(".", 1)[0]
        argv = ["bash", "-c", _READ_CHUNK, "recording", base, codec_extension(inp.codec), str(CHUNK_SIZE)]
        sent = 0
        index = 0
        while sent < size:
            # One chunk per exec: only CHUNK_SIZE bytes of the video are ever in memory.
            session = await self._sessions.get(inp.backend, inp.envelope)
            result = await session.exec([*argv, str(index)], timeout=COMMAND_TIMEOUT_SECONDS)
            if result.exit_code != 0:
                raise RecordingError(f"reading the video from the box failed (exit {result.exit_code})", retryable=True)
            chunk = result.stdout[: size - sent]
            if not chunk:
                break
            sent += len(chunk)
            index += 1
            yield chunk

    @activity.defn(name=ActivityName.RECORDING_UPLOAD)
    @maps_provider_errors
    async def upload(self, inp: UploadInput) -> UploadResult:
        """Stream the box file into the artifact store under ``inp.key`` (atomic; a retry replaces it).

        Raises:
            RecordingError: The file is not the size inspected (changed or vanished).
            ArtifactStoreUnavailable: The store failed to write; retried.
            BoxNotFound: The box is gone.
        """
        session = await self._sessions.get(inp.backend, inp.envelope)
        host = self._host_file(inp, session)
        async with _heartbeating():
            if host is not None:
                stored = await self._put_host_file(inp.key, host, inp.size_bytes)
            else:
                stored = await self._artifacts.put(inp.key, self._exec_chunks(inp, inp.size_bytes))
        if stored.size_bytes != inp.size_bytes:
            await self._artifacts.delete(inp.key)
            raise RecordingError(
                f"the video was {inp.size_bytes} bytes at inspection but {stored.size_bytes} bytes were read",
                retryable=True,
            )
        return UploadResult(key=stored.key, sha256=stored.sha256, size_bytes=stored.size_bytes)

    @activity.defn(name=ActivityName.RECORDING_DELETE_BOX_FILES)
    @maps_provider_errors
    async def delete_box_files(self, inp: RecordingBoxInput) -> bool:
        """Remove the video, pid file and log from the box; a gone box has nothing to remove (False)."""
        try:
            code, out, err = await self._script(inp, _DELETE)
        except BoxNotFound:
            return False
        if code != 0:
            raise RecordingError(f"deleting the box files failed (exit {code}): {err.strip()[-300:]}", retryable=True)
        return "SANDBOX_RECORDING_DELETED" in out

    @activity.defn(name=ActivityName.RECORDING_PROJECT)
    async def project(self, inp: ProjectRecordingInput) -> bool:
        """Write the recording row (a write older than the stored one is ignored); heartbeats while it waits."""
        async with _heartbeating():
            return await self._recordings.apply(inp.record)

    # -- the lease ------------------------------------------------------------------------------

    async def _lease_update(self, inp: LeaseHolderInput | LeaseBoxLostInput, update: Any, arg: Any) -> Any:
        handle = activity.client().get_workflow_handle_for(
            LeaseWorkflow.run, lease_workflow_id(inp.workspace_id, inp.group_id)
        )
        return await call_workflow(lambda: handle.execute_update(update, arg))

    @activity.defn(name=ActivityName.RECORDING_HOLD_LEASE)
    @maps_provider_errors
    async def hold_lease(self, inp: LeaseHolderInput) -> LeaseGrant:
        """Hold the lease as the ``recording`` holder; waits until its box is warm.

        Raises:
            LeaseNotFound, LeaseStopping, StaleEpoch, ProvisionFailed: Typed refusals of the lease.
        """
        req = AcquireRequest(
            kind="recording", holder_id=inp.recording_id, subject=inp.subject, expected_epoch=inp.epoch
        )
        async with _heartbeating():
            grant: LeaseGrant = await self._lease_update(inp, LeaseWorkflow.acquire, req)
        return grant

    @activity.defn(name=ActivityName.RECORDING_HEARTBEAT_LEASE)
    @maps_provider_errors
    async def heartbeat_lease(self, inp: LeaseHolderInput) -> HeartbeatResult:
        """Keep the ``recording`` holder alive.

        Raises:
            StaleEpoch, HolderNotFound: The lease moved on (box lost or the holder dropped).
        """
        req = HeartbeatRequest(kind="recording", holder_id=inp.recording_id, epoch=inp.epoch or 0)
        result: HeartbeatResult = await self._lease_update(inp, LeaseWorkflow.heartbeat, req)
        return result

    @activity.defn(name=ActivityName.RECORDING_RELEASE_LEASE)
    @maps_provider_errors
    async def release_lease(self, inp: LeaseHolderInput) -> bool:
        """Stop holding the lease; a holder that is already gone (or a lease that is) is fine (False)."""
        try:
            result: ReleaseResult = await self._lease_update(
                inp, LeaseWorkflow.release, HolderRef(kind="recording", holder_id=inp.recording_id)
            )
        except (HolderNotFound, LeaseNotFound):
            return False
        return result.released

    @activity.defn(name=ActivityName.RECORDING_REPORT_BOX_LOST)
    @maps_provider_errors
    async def report_box_lost(self, inp: LeaseBoxLostInput) -> bool:
        """Tell the lease its box looks gone; the lease confirms with the provider. Returns whether it agreed."""
        result: BoxLostResult = await self._lease_update(
            inp, LeaseWorkflow.report_box_lost, BoxLostReport(epoch=inp.epoch, instance_id=inp.instance_id)
        )
        return result.lost
