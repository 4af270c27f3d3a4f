"""The Temporal worker of the sandbox runtime.

``python -m worker`` reads :class:`sandbox.settings.Settings` from the environment, migrates the
store, and runs the lease workflow and its activities on ``SANDBOX_TASK_QUEUE`` until SIGTERM
or SIGINT, then shuts down gracefully (running activities get ``graceful_shutdown_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from temporalio.client import Client, Interceptor
from temporalio.runtime import PrometheusConfig, TelemetryConfig
from temporalio.runtime import Runtime as TemporalRuntime
from temporalio.service import TLSConfig
from temporalio.worker import Worker

from activities.boxes import BoxActivities
from activities.computer_use import ComputerUseActivities
from activities.events import SessionEventActivities
from activities.metrics import ARCHIVE_SIZE_BUCKETS, CensusGauges, SandboxMetrics
from activities.orphans import OrphanActivities
from activities.planes import PlaneActivities
from activities.projection import ProjectionActivities
from activities.recording import RecordingActivities
from activities.snapshots import SnapshotActivities
from providers.registry import ProviderRegistry
from sandbox.errors import SandboxConfigError
from sandbox.payload_codec import data_converter, ensure_payload_keys
from sandbox.settings import Settings
from store.artifacts import artifact_store
from store.database import Database
from store.heartbeats import HolderHeartbeats
from store.leases import LeaseRepository
from store.recordings import RecordingStore
from store.snapshots import SnapshotLedger
from workflows.lease import LeaseWorkflow
from workflows.orphan_sweep import OrphanSweepWorkflow
from workflows.recording import RecordingWorkflow
from workflows.schedules import ensure_schedules
from workflows.snapshot_gc import SnapshotGcWorkflow
from workflows.tracing import LeaseTracingInterceptor

log = logging.getLogger("sandbox.worker")

WORKFLOWS: Sequence[type] = (LeaseWorkflow, SnapshotGcWorkflow, OrphanSweepWorkflow, RecordingWorkflow)


_TRACING: dict[str, Any] = {}  # the provider configure_tracing installed (set once per process)


def configure_tracing(settings: Settings) -> None:
    """Install an OpenTelemetry tracer provider with the exporter the settings choose (off by default).

    ``SANDBOX_OTEL_EXPORTER``: ``none``, ``console`` (JSON spans on stderr), or ``otlp`` to
    ``SANDBOX_OTEL_ENDPOINT`` over ``SANDBOX_OTEL_PROTOCOL`` (``grpc``, the default, or
    ``http/protobuf``); the OTLP exporters' own ``OTEL_EXPORTER_OTLP_*`` variables apply too. A
    process installs one provider: later calls change nothing. :func:`flush_tracing` sends what is
    buffered before the process ends.
    """
    if settings.otel_exporter == "none" or "provider" in _TRACING:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if settings.otel_exporter == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout is the CLI's output (and its --json)
    elif settings.otel_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=settings.otel_endpoint) if settings.otel_endpoint else GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(endpoint=settings.otel_endpoint) if settings.otel_endpoint else HttpExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sandbox-runtime"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _TRACING["provider"] = provider


def flush_tracing(timeout_seconds: float = 5.0) -> None:
    """Export every span still buffered (a no-op when :func:`configure_tracing` installed nothing)."""
    provider = _TRACING.get("provider")
    if provider is not None:
        provider.force_flush(int(timeout_seconds * 1000))


def _read_tls_file(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SandboxConfigError(f"{setting}={path}: cannot read it ({exc.strerror}); point it at a PEM file") from None


def temporal_tls(settings: Settings) -> TLSConfig | Literal[False]:
    """What ``Client.connect`` gets as ``tls`` for these settings (False: plain gRPC).

    TLS is on when ``SANDBOX_TEMPORAL_TLS`` says so, or, left unset, when a TLS file or an API key
    is configured: Temporal Cloud takes API keys over TLS only, so a key alone means TLS with the
    system roots. ``SANDBOX_TEMPORAL_TLS=false`` forces plain gRPC (a key behind a TLS-terminating
    proxy on loopback).

    Raises:
        SandboxConfigError: a certificate without its key (or the reverse), an unreadable file, or
            TLS files together with ``SANDBOX_TEMPORAL_TLS=false``.
    """
    files = {
        "SANDBOX_TEMPORAL_TLS_CERT": settings.temporal_tls_cert,
        "SANDBOX_TEMPORAL_TLS_KEY": settings.temporal_tls_key,
        "SANDBOX_TEMPORAL_TLS_CA": settings.temporal_tls_ca,
    }
    configured = [name for name, path in files.items() if path is not None]
    if settings.temporal_tls_server_name:
        configured.append("SANDBOX_TEMPORAL_TLS_SERVER_NAME")
    if settings.temporal_tls is False:
        if configured:
            raise SandboxConfigError(
                f"SANDBOX_TEMPORAL_TLS=false contradicts {', '.join(configured)}; unset one or the other"
            )
        return False
    if settings.temporal_tls is None and not configured and settings.temporal_api_key is None:
        return False
    cert, key = settings.temporal_tls_cert, settings.temporal_tls_key
    if (cert is None) != (key is None):
        given, missing = ("CERT", "KEY") if key is None else ("KEY", "CERT")
        raise SandboxConfigError(
            f"SANDBOX_TEMPORAL_TLS_{given} is set without SANDBOX_TEMPORAL_TLS_{missing}; "
            "mTLS needs both the client certificate and its private key"
        )
    ca = settings.temporal_tls_ca
    return TLSConfig(
        server_root_ca_cert=_read_tls_file(ca, "SANDBOX_TEMPORAL_TLS_CA") if ca else None,
        client_cert=_read_tls_file(cert, "SANDBOX_TEMPORAL_TLS_CERT") if cert else None,
        client_private_key=_read_tls_file(key, "SANDBOX_TEMPORAL_TLS_KEY") if key else None,
        domain=settings.temporal_tls_server_name or None,
    )


def metrics_runtime(settings: Settings) -> TemporalRuntime | None:
    """A Temporal runtime serving Prometheus metrics on ``SANDBOX_METRICS_ADDRESS`` (None when unset).

    The SDK's own metrics and the runtime's (:mod:`activities.metrics`) are served there together.

    Raises:
        SandboxConfigError: the address is malformed or cannot be bound.
    """
    address = settings.metrics_bind_address()
    if address is None:
        return None
    prometheus = PrometheusConfig(
        bind_address=address,
        durations_as_seconds=True,
        histogram_bucket_overrides={"sandbox_archive_size_bytes": list(ARCHIVE_SIZE_BUCKETS)},
    )
    try:
        return TemporalRuntime(telemetry=TelemetryConfig(metrics=prometheus))
    except Exception as err:  # the core raises a plain RuntimeError for a port in use
        raise SandboxConfigError(f"cannot serve metrics on SANDBOX_METRICS_ADDRESS={address}: {err}") from err


async def connect(settings: Settings, *, runtime: TemporalRuntime | None = None) -> Client:
    """The Temporal client every part of the runtime uses: credentials, encrypting converter, tracing.

    Credentials come from the ``SANDBOX_TEMPORAL_TLS_*`` settings (:func:`temporal_tls`) and
    ``SANDBOX_TEMPORAL_API_KEY`` (sent as ``authorization: Bearer``); the converter is
    :func:`sandbox.payload_codec.data_converter`, which only reads the payload keys (the worker side
    makes them first: :func:`run_worker`, ``sandboxctl up``). ``runtime`` is the Temporal runtime to
    use (the worker's serves metrics, :func:`metrics_runtime`); the SDK's default when omitted.

    Raises:
        SandboxConfigError: the credentials are misconfigured, or there are no payload keys
            (``SANDBOX_PAYLOAD_KEYS`` unset and no keys file in the data dir).
    """
    interceptors: list[Interceptor] = [LeaseTracingInterceptor()]
    tls = temporal_tls(settings)
    converter = data_converter(settings)
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key is not None else None
    # Says which credentials are in use, never what they are.
    log.info(
        "connecting to Temporal at %s, namespace %s: tls=%s, client certificate=%s, api key=%s, payload encryption=%s",
        settings.temporal_address,
        settings.temporal_namespace,
        "off" if tls is False else "on",
        "no" if tls is False or tls.client_cert is None else "yes",
        "set" if api_key else "unset",
        "on" if converter.payload_codec is not None else "OFF",
    )
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=converter,
        interceptors=interceptors,
        tls=tls,
        api_key=api_key,
        runtime=runtime,
    )


def build_activities(
    settings: Settings,
    db: Database,
    providers: ProviderRegistry,
    *,
    events: SessionEventActivities | None = None,
    metrics: SandboxMetrics | None = None,
) -> list[Callable[..., Any]]:
    """Every activity the worker registers, one per :class:`~workflows.activity_names.ActivityName` member.

    ``events`` is the session-event activity to register (a new one when omitted); ``metrics`` is
    where box operations are measured (nowhere when omitted).
    """
    artifacts = artifact_store(settings)
    log.info("artifact store: %r", artifacts)
    boxes = BoxActivities(providers, artifacts, metrics=metrics)
    projection = ProjectionActivities(LeaseRepository(db), HolderHeartbeats(db), store_id=db.store_id)
    snapshots = SnapshotActivities(
        providers,
        SnapshotLedger(db),
        artifacts,
        native_ttl_seconds=settings.native_snapshot_ttl_seconds,
        metrics=metrics,
    )
    orphans = OrphanActivities(providers, LeaseRepository(db))
    planes = PlaneActivities(providers, settings)
    return [
        boxes.provision,
        boxes.terminate,
        boxes.discard,
        boxes.exec,
        boxes.check,
        projection.project,
        projection.load_seed,
        projection.read_holder_beats,
        snapshots.capture,
        snapshots.publish,
        snapshots.claim_gc,
        snapshots.delete_objects,
        snapshots.settle_gc,
        orphans.scan,
        orphans.terminate,
        *planes.activities(),
        *(events or SessionEventActivities(settings)).activities(),
        *RecordingActivities(providers, RecordingStore(db), artifacts).activities(),
        *ComputerUseActivities(providers, settings, planes).activities(),
    ]


def build_worker(
    client: Client,
    settings: Settings,
    db: Database,
    providers: ProviderRegistry,
    *,
    events: SessionEventActivities | None = None,
    metrics: SandboxMetrics | None = None,
    **overrides: Any,
) -> Worker:
    """A worker for the lease workflow and its activities on the configured task queue.

    ``events`` is the session-event activity to register (a new one when omitted); the caller that
    passes it closes it after the worker stops. ``metrics`` is where box operations are measured.
    """
    options: dict[str, Any] = {
        "task_queue": settings.task_queue,
        "workflows": list(WORKFLOWS),
        "activities": build_activities(settings, db, providers, events=events, metrics=metrics),
        "graceful_shutdown_timeout": timedelta(seconds=10),
    }
    options.update(overrides)
    return Worker(client, **options)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when no event is given)."""
    settings.check()
    configure_tracing(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.payload_encryption:
        ensure_payload_keys(settings)  # the worker side makes the keys its clients then read (connect never does)
    runtime = metrics_runtime(settings)
    db = Database.for_settings(settings)
    await db.migrate()
    client = await connect(settings, runtime=runtime)
    await ensure_schedules(client, settings)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    providers = ProviderRegistry(settings)
    events = SessionEventActivities(settings)
    metrics = SandboxMetrics(runtime.metric_meter) if runtime is not None else None
    worker = build_worker(client, settings, db, providers, events=events, metrics=metrics)
    census: asyncio.Task[None] | None = None
    if runtime is not None:
        gauges = CensusGauges(runtime.metric_meter, db)
        census = asyncio.create_task(gauges.run(settings.metrics_census_seconds, stop))
        log.info("serving metrics on http://%s/metrics", settings.metrics_address)
    log.info("worker running on task queue %s at %s", settings.task_queue, settings.temporal_address)
    try:
        async with worker:
            await stop.wait()
    finally:
        if census is not None:
            census.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await census
        await events.aclose()
        await providers.aclose()
        await db.dispose()
        flush_tracing()
    log.info("worker stopped")


def main() -> None:
    """Entry point of ``python -m worker``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(Settings()))


if __name__ == "__main__":
    main()
