"""``SANDBOX_OTEL_EXPORTER=otlp`` sends spans to a collector over gRPC and over HTTP.

Each case runs :func:`worker.configure_tracing` in a fresh process (a process installs one tracer
provider) against a collector this test serves: a real gRPC ``TraceService`` or an HTTP endpoint
taking ``POST /v1/traces``. The collector decodes what arrives, so the span's name is checked,
not just that bytes came.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import REPO, free_port

EMIT = """
from opentelemetry import trace
from sandbox.settings import Settings
from worker import configure_tracing, flush_tracing

configure_tracing(Settings())
with trace.get_tracer("probe").start_as_current_span("probe-span"):
    pass
flush_tracing()
"""


def _span_names(request: trace_service_pb2.ExportTraceServiceRequest) -> list[str]:
    return [span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def _emit(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", EMIT],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:  # noqa: N802
        self.names += _span_names(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_collector() -> Iterator[tuple[str, _Collector]]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", collector
    finally:
        server.stop(0)


@pytest.fixture
def http_collector() -> Iterator[tuple[str, list[str]]]:
    names: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                names.extend(_span_names(request))
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", names
    finally:
        server.shutdown()


def test_otlp_over_grpc_reaches_the_collector(grpc_collector: tuple[str, _Collector]) -> None:
    endpoint, collector = grpc_collector
    done = _emit(SANDBOX_OTEL_EXPORTER="otlp", SANDBOX_OTEL_ENDPOINT=endpoint, SANDBOX_OTEL_PROTOCOL="grpc")
    assert done.returncode == 0, done.stderr
    assert collector.names == ["probe-span"]


def test_otlp_over_http_reaches_the_collector(http_collector: tuple[str, list[str]]) -> None:
    endpoint, names = http_collector
    done = _emit(SANDBOX_OTEL_EXPORTER="otlp", SANDBOX_OTEL_ENDPOINT=endpoint, SANDBOX_OTEL_PROTOCOL="http/protobuf")
    assert done.returncode == 0, done.stderr
    assert names == ["probe-span"]


def test_tracing_off_sends_nothing(http_collector: tuple[str, list[str]]) -> None:
    # Positive control: the same process with tracing off reaches no collector.
    endpoint, names = http_collector
    done = _emit(SANDBOX_OTEL_EXPORTER="none", SANDBOX_OTEL_ENDPOINT=endpoint, SANDBOX_OTEL_PROTOCOL="http/protobuf")
    assert done.returncode == 0, done.stderr
    assert names == []
