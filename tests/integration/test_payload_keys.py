"""Payload keys come from the worker side; a client only reads them, against a real Temporal.

With ``SANDBOX_PAYLOAD_KEYS`` unset, the keys are the data dir's ``secrets/payload-keys.json``. A
client that made that file itself would encrypt with a key the worker does not have, so a client
(here :func:`client.connection.connect_temporal`, what ``LeaseClient`` and every ``sandboxctl``
command connect with) is refused with a typed error and creates nothing; once the worker side
(:func:`sandbox.payload_codec.ensure_payload_keys`: the worker's start, ``sandboxctl up``) made
the keys, the same client connects and what it writes to Temporal is encrypted with that ring.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from temporalio.client import Client

from client.connection import connect_temporal
from client.stack import resolve_settings
from sandbox.errors import SandboxConfigError
from sandbox.payload_codec import ENCODING, KEY_ID_METADATA, ensure_payload_keys

pytestmark = pytest.mark.timeout(60)


async def test_a_client_reads_the_workers_keys_and_never_makes_its_own(
    temporal_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = temporal_client.service_client.config.target_host
    monkeypatch.delenv("SANDBOX_PAYLOAD_KEYS")  # the session's keys: this test uses the data dir's file
    monkeypatch.setenv("SANDBOX_TEMPORAL_ADDRESS", address)
    data = tmp_path / "data"
    settings = resolve_settings(data)

    with pytest.raises(SandboxConfigError) as caught:
        await connect_temporal(settings)
    message = caught.value.message
    assert "SANDBOX_PAYLOAD_KEYS" in message and str(data / "secrets" / "payload-keys.json") in message
    assert "sandboxctl up" in message
    assert not data.exists()  # neither a keys file nor the data dir

    # Positive control: the worker side makes the keys, then the same client connects and its
    # payloads are encrypted under that ring's key, and come back through its codec.
    worker_keys = ensure_payload_keys(settings)
    assert worker_keys.current != "test-session"  # the file's own ring, not the session's
    client = await connect_temporal(settings)
    marker = f"marker-{uuid.uuid4().hex}"
    workflow_id = f"keys-{uuid.uuid4()}"
    # No worker polls this queue: the start alone writes the input payload to history.
    handle = await client.start_workflow("NoWorkerRunsThis", marker, id=workflow_id, task_queue=workflow_id)
    try:
        raw_client = await Client.connect(address, namespace=settings.temporal_namespace)  # no codec
        history = await raw_client.get_workflow_handle(workflow_id).fetch_history()
        [payload] = history.events[0].workflow_execution_started_event_attributes.input.payloads
        assert payload.metadata["encoding"] == ENCODING
        assert payload.metadata[KEY_ID_METADATA] == worker_keys.current.encode()
        assert marker.encode() not in payload.data
        codec = client.data_converter.payload_codec
        assert codec is not None
        [plain] = await codec.decode([payload])
        assert marker.encode() in plain.data
    finally:
        await handle.terminate()
