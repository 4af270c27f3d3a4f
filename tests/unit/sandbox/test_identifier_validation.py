"""Every identifier check refuses a trailing newline.

Python's ``$`` also matches just before a final ``"\\n"``, so ``re.match(r"^[a-z]+$", "ws\\n")``
succeeds: an id checked that way could carry a newline into a NATS subject (a line-based protocol),
a workflow id, a file name or an environment. The checks use ``fullmatch`` instead; hypothesis found
the first case (a recording id ``"0\\n"``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from client import validate_lease_ids
from providers.docker import _validate_container_id
from providers.local import _check_env
from providers.selfhosted import parse_instance_id
from sandbox.control_protocol import agent_subject, salvage_request_id, validate_agent_token
from sandbox.errors import InvalidRequest, SandboxError
from sandbox.routing import parse_sandbox_id
from store.artifacts import FilesystemArtifactStore
from workflows.models.recording import RecordingRequest

CHECKS: dict[str, tuple[Callable[[str], Any], str]] = {
    "lease workspace id": (lambda v: validate_lease_ids(v, "g1"), "ws1"),
    "lease group id": (lambda v: validate_lease_ids("ws1", v), "g1"),
    "agent token": (lambda v: validate_agent_token(v, "agent id"), "laptop"),
    "agent subject": (lambda v: agent_subject("ws1", v), "laptop"),
    "selfhosted instance id": (parse_instance_id, "ws1/laptop@3"),
    "session target": (parse_sandbox_id, "selfhosted:laptop"),
    "recording id": (lambda v: RecordingRequest(recording_id=v), "rec-1"),
    "artifact key": (lambda v: FilesystemArtifactStore(Path("/nonexistent")).path_of(v), "recordings/ws/s/r.mp4"),
    "environment name": (lambda v: _check_env({v: "x"}), "MY_VAR"),
    "docker container id": (_validate_container_id, "c0ffee"),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_a_valid_id_passes_and_the_same_with_a_trailing_newline_is_refused(name: str) -> None:
    check, valid = CHECKS[name]
    check(valid)
    for bad in (valid + "\n", valid + "\r\n", "\n" + valid):
        with pytest.raises((SandboxError, ValidationError, InvalidRequest)):
            check(bad)


def test_a_request_id_with_a_newline_is_not_salvaged() -> None:
    assert salvage_request_id(b'{"request_id": "r1"}') == "r1"
    assert salvage_request_id(b'{"request_id": "r1\\n"}') == ""
