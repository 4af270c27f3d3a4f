"""Pure parts of recordings: ids, storage keys, request validation, ffprobe parsing, encoder arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from activities.recording import _START, _parse_ffprobe, ffmpeg_encoder_args
from store.artifacts import FilesystemArtifactStore
from workflows.recording_models import (
    RECORDING_ID_PATTERN,
    RecordingRequest,
    RecordingTimers,
    box_file_name,
    codec_content_type,
    recording_input,
    recording_storage_key,
    recording_workflow_id,
)


def test_storage_key_file_name_and_workflow_id() -> None:
    assert recording_storage_key("ws1", "s1", "rec-1", "h264-mp4") == "recordings/ws1/s1/rec-1.mp4"
    assert recording_storage_key("ws1", "s1", "rec-1", "vp9-webm") == "recordings/ws1/s1/rec-1.webm"
    assert box_file_name("rec-1", "vp9-webm") == "og-rec-rec-1.webm"
    assert recording_workflow_id("rec-1") == "recording/rec-1"
    assert (codec_content_type("h264-mp4"), codec_content_type("vp9-webm")) == ("video/mp4", "video/webm")


def test_defaults_are_the_upstream_ones() -> None:
    req = RecordingRequest()
    assert (req.codec, req.framerate, req.max_seconds, req.max_bytes) == ("h264-mp4", 15, 600, 256 * 1024 * 1024)


def test_the_session_defaults_to_the_group() -> None:
    inp = recording_input("ws1", "g1", RecordingRequest(), "rec-1", RecordingTimers())
    assert (inp.session_id, inp.lease_id, inp.storage_key) == ("g1", "lease/ws1/g1", "recordings/ws1/g1/rec-1.mp4")
    inp = recording_input("ws1", "g1", RecordingRequest(session_id="s9"), "rec-1", RecordingTimers())
    assert inp.storage_key == "recordings/ws1/s9/rec-1.mp4"


@pytest.mark.parametrize(
    "fields",
    [
        {"codec": "gif"},
        {"framerate": 0},
        {"framerate": 61},
        {"max_seconds": 0},
        {"max_seconds": 14_401},
        {"max_bytes": 0},
        {"recording_id": "../x"},
        {"recording_id": "a/b"},
        {"recording_id": "x" * 65},
        {"recording_id": "-x"},
        {"session_id": "a/b"},
        {"session_id": ""},
    ],
)
def test_malformed_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RecordingRequest.model_validate(fields)


@given(st.text(min_size=1, max_size=80))
def test_every_accepted_id_is_a_safe_key_segment_and_file_name(rid: str) -> None:
    if not RECORDING_ID_PATTERN.fullmatch(rid):
        with pytest.raises(ValidationError):
            RecordingRequest(recording_id=rid)
        return
    req = RecordingRequest(recording_id=rid)
    assert req.recording_id == rid
    # The artifact store accepts the key, and the box file name has no path in it.
    FilesystemArtifactStore(Path("/nonexistent")).path_of(recording_storage_key("ws", "s", rid, "h264-mp4"))
    assert "/" not in box_file_name(rid, "h264-mp4")


def test_ffprobe_output_is_parsed() -> None:
    assert _parse_ffprobe("width=1280\nheight=800\nduration=3.021000\n") == (3.021, 1280, 800)
    assert _parse_ffprobe("duration=N/A\n") == (None, None, None)
    assert _parse_ffprobe("") == (None, None, None)


@pytest.mark.parametrize("codec", ["h264-mp4", "vp9-webm"])
def test_the_start_script_uses_the_documented_encoder(codec: str) -> None:
    arm = next(line for line in _START.splitlines() if line.strip().startswith(f"{codec})"))
    assert " ".join(ffmpeg_encoder_args(codec)) in arm
    assert '-t "$6"' in _START and "x11grab" in _START and "nohup setsid ffmpeg" in _START
