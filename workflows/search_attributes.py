"""Search attributes the lease workflow upserts so operators can filter in the Temporal UI.

They must be registered on the server: ``sandboxctl up`` passes them to the dev server
(:mod:`workflows.server_settings`), and production clusters register them with
``temporal operator search-attribute create``.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

LEASE_LIVENESS = SearchAttributeKey.for_keyword("LeaseLiveness")
LEASE_EPOCH = SearchAttributeKey.for_int("LeaseEpoch")
SANDBOX_BACKEND = SearchAttributeKey.for_keyword("SandboxBackend")
WORKSPACE_ID = SearchAttributeKey.for_keyword("WorkspaceId")
RECORDING_STATE = SearchAttributeKey.for_keyword("RecordingState")
"""State of a recording workflow: starting, recording, stopping, finalizing, available or failed."""

ALL_KEYS: list[SearchAttributeKey[str] | SearchAttributeKey[int]] = [
    LEASE_LIVENESS,
    LEASE_EPOCH,
    SANDBOX_BACKEND,
    WORKSPACE_ID,
    RECORDING_STATE,
]


def search_attribute_flags() -> list[str]:
    """``--search-attribute NAME=TYPE`` flags for ``temporal server start-dev`` (part of
    :func:`workflows.server_settings.dev_server_flags`)."""
    flags: list[str] = []
    for key in ALL_KEYS:
        kind = "Int" if key is LEASE_EPOCH else "Keyword"
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags
