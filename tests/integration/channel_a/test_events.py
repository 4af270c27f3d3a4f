"""Channel-A events on a real nats-server: subject, JSON shape, and best-effort delivery."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sandbox.channel_a import ChannelA, ChannelAEvent, NatsEventSink, events_subject
from sandbox.errors import InvalidRequest
from sandbox.nats_flush import flush_in_order
from tests.conftest import free_port, nats_server_at
from tests.integration.channel_a.conftest import TestBox


async def test_mutations_publish_fs_changed_with_epoch_and_revision(nats_url: str, box: TestBox) -> None:
    nc = await nats_server_at(nats_url).connect("events")
    received: list[tuple[str, dict[str, Any]]] = []
    done = asyncio.Event()

    async def on_message(msg: Any) -> None:
        received.append((msg.subject, json.loads(msg.data)))
        if len(received) == 3:
            done.set()

    await nc.subscribe("session.ws1.sess-1.events", cb=on_message)
    await flush_in_order(nc)
    sink = NatsEventSink(nats_url, workspace_id="ws1", session_id="sess-1", auth=nats_server_at(nats_url).auth())
    ca = ChannelA(box.session, events=sink, lease_epoch=12, revision=40)
    try:
        await ca.fs_write("notes/a.txt", "hello")
        await ca.fs_move("notes/a.txt", "notes/b.txt")
        await ca.terminal_exec("echo hi")
        await sink.flush()
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await sink.aclose()
        await nc.drain()

    subjects = {subject for subject, _ in received}
    assert subjects == {"session.ws1.sess-1.events"}
    write, move, output = (doc for _, doc in received)
    assert write["type"] == "fs.changed" and move["type"] == "fs.changed"
    assert (write["leaseEpoch"], write["revision"]) == (12, 41)
    assert (move["leaseEpoch"], move["revision"]) == (12, 42)
    assert write["workspaceId"] == "ws1" and write["sessionId"] == "sess-1"
    assert write["payload"] == {
        "changes": [{"path": "notes/a.txt", "kind": "created", "isDir": False, "sizeBytes": 5, "oldPath": None}],
        "source": "write",
        "revision": 41,
        "leaseEpoch": 12,
    }
    assert [(c["path"], c["kind"]) for c in move["payload"]["changes"]] == [
        ("notes/a.txt", "deleted"),
        ("notes/b.txt", "created"),
    ]
    assert output["type"] == "sandbox.command.output.delta" and output["revision"] == 42
    assert output["payload"]["chunk"] == "hi\n"
    assert len({write["id"], move["id"], output["id"]}) == 3 and write["at"].endswith("+00:00")


async def test_an_unreachable_nats_drops_events_without_failing_operations(box: TestBox) -> None:
    sink = NatsEventSink(f"nats://127.0.0.1:{free_port()}", workspace_id="ws1", session_id="s", connect_timeout=0.5)
    ca = ChannelA(box.session, events=sink)
    result = await ca.fs_write("a.txt", "x")
    assert result.revision == 1 and (box.workspace / "a.txt").read_text() == "x"
    await ca.fs_write("b.txt", "y")  # no second connect attempt: retry_after has not passed
    assert ca.revision == 2
    await sink.aclose()


async def test_a_failing_sink_never_fails_the_operation(box: TestBox) -> None:
    class Broken:
        async def publish(self, event: ChannelAEvent) -> None:
            raise RuntimeError("sink down")

    ca = ChannelA(box.session, events=Broken())
    assert (await ca.fs_mkdir("d")).revision == 1


def test_subject_tokens_are_checked() -> None:
    assert events_subject("ws-1", "g_2") == "session.ws-1.g_2.events"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(InvalidRequest):
            events_subject(bad, "s")
        with pytest.raises(InvalidRequest):
            NatsEventSink("nats://x", workspace_id="w", session_id=bad)
