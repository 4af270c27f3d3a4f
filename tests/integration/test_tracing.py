"""Traces follow requests: one ``exec`` from a caller is one tree, from the caller's span to the box.

A separate process runs the worker (:func:`worker.run_worker`) and a client with
``SANDBOX_OTEL_EXPORTER=console``, as an operator would, so the spans come out of the runtime's own
tracing setup; the test reads them from its stderr and checks the parent links.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client

from tests.conftest import REPO

SECRET = "s3cret-env-value-4711"

PROBE = f"""
import asyncio
from opentelemetry import trace
from client.connection import connect_leases, flush_traces
from sandbox.payload_codec import ensure_payload_keys
from sandbox.settings import Settings
from worker import run_worker

async def main() -> None:
    settings = Settings()
    # The worker side makes the payload keys; the client below connects before the worker task
    # has run, and a client only reads them.
    ensure_payload_keys(settings)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    leases = await connect_leases(settings)
    tracer = trace.get_tracer("caller")
    with tracer.start_as_current_span("caller-acquire"):
        grant = await leases.acquire("ws-trace", "g1", holder_id="t1", backend="local")
    with tracer.start_as_current_span("caller-exec"):
        cmd = ["sh", "-c", "exit 3"]
        out = await leases.exec("ws-trace", "g1", cmd, env={{"TOKEN": "{SECRET}"}}, epoch=grant.epoch)
        assert out.exit_code == 3, out
    with tracer.start_as_current_span("caller-drain"):
        await leases.drain("ws-trace", "g1", wait=True)
    stop.set()
    await worker
    flush_traces()

asyncio.run(main())
"""


def _spans(stdout: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    spans, i = [], 0
    while (start := stdout.find('{\n    "name"', i)) != -1:
        span, i = decoder.raw_decode(stdout, start)
        spans.append(span)
    return spans


def _run_probe(client: Client, data_dir: Path) -> list[dict[str, Any]]:
    env = {
        # Without the session's SANDBOX_PAYLOAD_KEYS: the probe's worker and client share the data
        # dir's keys file, as an operator's do.
        **{key: value for key, value in os.environ.items() if key.upper() != "SANDBOX_PAYLOAD_KEYS"},
        "PYTHONPATH": str(REPO),
        "SANDBOX_DATA_DIR": str(data_dir),
        "SANDBOX_TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "SANDBOX_TASK_QUEUE": f"trace-{uuid.uuid4()}",
        "SANDBOX_OTEL_EXPORTER": "console",
        "SANDBOX_MAINTENANCE_SCHEDULES_ENABLED": "false",
        "SANDBOX_IDLE_GRACE_SECONDS": "0.5",
        "SANDBOX_ACTIVITY_HEARTBEAT_SECONDS": "2",
    }
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout and SECRET not in done.stderr  # no env value in any span or log line
    return _spans(done.stderr)


def test_one_exec_is_one_tree_from_the_caller_to_the_box(temporal_client: Client, tmp_path: Path) -> None:
    spans = _run_probe(temporal_client, tmp_path / "data")
    by_id = {s["context"]["span_id"]: s for s in spans}

    def one(name: str, trace_id: str) -> dict[str, Any]:
        found = [s for s in spans if s["name"] == name and s["context"]["trace_id"] == trace_id]
        assert len(found) == 1, (name, [s["name"] for s in spans if s["context"]["trace_id"] == trace_id])
        return found[0]

    def parent(span: dict[str, Any]) -> dict[str, Any]:
        return by_id[span["parent_id"]]

    roots = {s["name"]: s for s in spans if s["name"].startswith("caller-")}
    assert set(roots) == {"caller-acquire", "caller-exec", "caller-drain"}
    traces = {name: s["context"]["trace_id"] for name, s in roots.items()}
    assert len(set(traces.values())) == 3  # each call its own trace

    # exec: caller -> client update -> HandleUpdate -> StartActivity -> RunActivity -> the box.
    t = traces["caller-exec"]
    handle = one("HandleUpdate:exec", t)
    start = one("StartActivity:exec_in_box", t)
    run = one("RunActivity:exec_in_box", t)
    box = one("sandbox.box.exec", t)
    assert parent(box) is run and parent(run) is start and parent(start) is handle
    chain, span = [], handle
    while span.get("parent_id"):
        span = parent(span)
        chain.append(span["name"])
    assert chain[-1] == "caller-exec", chain
    assert box["attributes"]["sandbox.backend"] == "local"
    assert box["attributes"]["sandbox.argv0"] == "sh" and box["attributes"]["sandbox.exit_code"] == 3
    assert box["attributes"]["sandbox.epoch"] == 1
    assert box["attributes"]["sandbox.lease_id"] == handle["attributes"]["sandbox.lease_id"]
    assert handle["attributes"]["sandbox.epoch"] == 1

    # acquire carries the holder's kind; the drain's handling is in the drain's trace, not the
    # trace of the acquire that started the lease workflow (the positive control of the fix).
    assert one("HandleUpdate:acquire", traces["caller-acquire"])["attributes"]["sandbox.holder_kind"] == "turn"
    one("HandleUpdate:drain", traces["caller-drain"])
    assert not [
        s for s in spans if s["name"] == "HandleUpdate:drain" and s["context"]["trace_id"] != traces["caller-drain"]
    ]
