"""Runtime settings, read from environment variables prefixed ``SANDBOX_``.

One :class:`Settings` object configures the worker, the CLI and the client. Secrets are
``SecretStr`` so they never appear in a ``repr`` or a log line. ``Settings.check()`` refuses
contradictory timer values at boot, as upstream does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandbox.errors import SandboxConfigError

if TYPE_CHECKING:
    from sandbox.box_limits import BoxLimits


class Settings(BaseSettings):
    """All configuration of the sandbox runtime (environment prefix ``SANDBOX_``)."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore")

    data_dir: Path = Field(default=Path(".sandbox"), description="State of the embedded stack and local boxes.")

    # Temporal
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "sandbox-runtime"

    # NATS (who may connect and with what: sandbox/nats_auth.py; signed control: sandbox/control_auth.py)
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: Literal["on", "off"] = Field(
        default="on", description="on: every connection authenticates; off: trusted network only (warns)."
    )
    nats_creds: Path | None = Field(
        default=None, description="The runtime's NATS credential: a .creds file or an nkey seed file."
    )
    nats_events_creds: Path | None = Field(
        default=None, description="Credential of read-only event consumers (default: the runtime's)."
    )
    nats_tls_ca: Path | None = Field(default=None, description="CA bundle that signed the NATS server's certificate.")
    nats_tls_cert: Path | None = Field(default=None, description="Client certificate for NATS (with _KEY).")
    nats_tls_key: Path | None = Field(default=None, description="Client key for NATS (with _CERT).")
    control_key_file: Path | None = Field(
        default=None,
        description="Ed25519 key signing control requests (default <data_dir>/secrets/control-signing.key; "
        "share it between workers: agents pin its public half at enrollment).",
    )

    # Store: None means SQLite under the data dir.
    database_url: str | None = None

    # Artifact store (workspace archives, recordings): unset = files under <data_dir>/artifacts;
    # s3://bucket[/prefix] = an S3-compatible object store every host can read (store/s3_artifacts.py).
    artifacts_url: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._:+/-]*)?$",
        description="Where workspace archives and recordings go: unset = the data dir; s3://bucket[/prefix].",
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL (MinIO, Ceph, R2, ...); unset = AWS. http:// allows plain HTTP."
    )
    s3_region: str | None = Field(default=None, description="S3 region; unset = AWS_REGION or us-east-1.")
    s3_access_key_id: str | None = Field(default=None, description="S3 access key id; unset = the AWS_* environment.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key (with _ACCESS_KEY_ID).")
    s3_secret_access_key_file: Path | None = Field(
        default=None, description="File holding the S3 secret key (instead of SANDBOX_S3_SECRET_ACCESS_KEY)."
    )

    # Providers
    default_backend: str = "local"

    # Local boxes (the security model: README "Security model", providers/local.py)
    local_isolation: Literal["bubblewrap", "none"] = Field(
        default="bubblewrap", description="bubblewrap, or none: no isolation at all (unsafe; every create warns)."
    )
    local_egress: Literal["proxy", "none"] = Field(
        default="proxy", description="proxy: only through the egress proxy's allowlist; none: no network."
    )
    local_egress_allow: str = Field(
        default="", description="Destinations boxes may reach through the proxy (host patterns, optional ports)."
    )
    local_pids_max: int = Field(default=512, ge=0, description="Processes and threads per box (0: no limit).")
    local_memory_max: str = Field(default="2G", description="Memory per box, e.g. 512M, 2G (0: no limit).")
    local_cpu_max: float = Field(default=2.0, ge=0, description="CPUs per box, e.g. 0.5 (0: no limit).")
    local_disk_max: str = Field(default="10G", description="Workspace+home+/tmp per box, e.g. 10G (0: no limit).")
    local_box_uid: int = Field(default=61000, ge=1, description="Host uid (and gid) box users map to.")
    local_warm_boxes: int = Field(default=1, ge=0, description="Boxes a worker keeps made ahead (0: none).")

    # Lease timers (seconds; finite, and > 0 unless 0 means "none"; workflows/models/lease.py
    # LeaseTimers.violations checks the same bounds on what a lease receives)
    holder_ttl_seconds: float = Field(default=90.0, gt=0, allow_inf_nan=False)
    warming_ttl_seconds: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    idle_grace_seconds: float = Field(default=900.0, ge=0, allow_inf_nan=False)
    probe_timeout_seconds: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    exec_timeout_seconds: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    activity_heartbeat_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    continue_as_new_after_transitions: int = Field(default=500, ge=10)
    continue_as_new_after_updates: int = Field(default=1000, ge=1)

    # Workspace snapshots and rotation
    snapshots_enabled: bool = True
    snapshot_interval_seconds: float = Field(default=900.0, ge=0, allow_inf_nan=False)
    native_snapshot_ttl_seconds: int | None = Field(
        default=30 * 24 * 3600,
        description="How long a provider keeps a native workspace snapshot nobody deletes (bounds leaks).",
    )
    capture_timeout_seconds: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    teardown_retry_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    rotation_lead_seconds: float = Field(default=3600.0, ge=0, allow_inf_nan=False)
    hard_lifetime_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    # Maintenance schedules (snapshot GC, orphan sweep)
    maintenance_schedules_enabled: bool = True
    snapshot_gc_interval_seconds: float = 300.0
    snapshot_candidate_ttl_seconds: float = 3600.0
    orphan_sweep_interval_seconds: float = 900.0
    orphan_grace_seconds: float = 900.0
    orphan_recheck_delay_seconds: float = 30.0
    orphan_sweep_backends: str = Field(
        default="",
        description="Comma-separated backends the orphan sweep lists; empty means local plus the default backend.",
    )

    # Observability
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str | None = None
    otel_protocol: Literal["grpc", "http/protobuf"] = "grpc"
    metrics_address: str | None = Field(
        default=None,
        description="host:port where the worker serves Prometheus metrics (GET /metrics); unset means off.",
    )
    metrics_census_seconds: float = Field(
        default=15.0, gt=0, description="How often the worker counts leases, holders and recordings for its gauges."
    )

    # Viewer planes (policy for new leases)
    desktop_enabled: bool = True
    terminal_enabled: bool = True
    stream_token_ttl_seconds: int = 120

    # Computer use (screenshots and desktop input driven in the box's display)
    computer_use_enabled: bool = True
    computer_use_read_only: bool = False

    # Desktop recordings (ffmpeg x11grab in the box, finalized into the artifact store)
    recording_codec: Literal["h264-mp4", "vp9-webm"] = "h264-mp4"
    recording_framerate: int = Field(default=15, ge=1, le=60)
    recording_max_seconds: int = Field(default=600, ge=1, le=14_400)
    recording_max_bytes: int = Field(default=268_435_456, ge=1)
    recording_poll_seconds: float = Field(default=5.0, gt=0, description="How often a recording checks ffmpeg.")
    recording_stop_wait_seconds: float = Field(default=8.0, gt=0, description="Bounded wait for ffmpeg's trailer.")

    # Stream tokens (root secret; per-lease keys are derived from it)
    stream_token_secret: SecretStr | None = None

    # Selfhosted machines (agents reached over NATS)
    selfhosted_relay_url: str | None = Field(
        default=None, description="Relay viewers dial for machine streams (wss://host[:port]/path); unset = default."
    )
    selfhosted_rpc_timeout_seconds: float = Field(default=30.0, gt=0, description="Deadline of one control op.")
    selfhosted_probe_timeout_seconds: float = Field(default=5.0, gt=0, description="Deadline of a liveness ping.")
    selfhosted_agent_id: str | None = Field(
        default=None, description="Agent a selfhosted lease binds to when its spec names none."
    )

    # Temporal credentials and history encryption (README "Pointing the worker at a Temporal cluster")
    temporal_tls: bool | None = Field(
        default=None,
        description="TLS to Temporal: unset = on when a TLS file or an API key is set; false forces it off.",
    )
    temporal_tls_cert: Path | None = Field(default=None, description="Client certificate (PEM) for mTLS.")
    temporal_tls_key: Path | None = Field(default=None, description="Private key (PEM) of the client certificate.")
    temporal_tls_ca: Path | None = Field(
        default=None, description="CA (PEM) the server certificate must chain to; unset = the system roots."
    )
    temporal_tls_server_name: str | None = Field(
        default=None, description="Name the server certificate is checked against (and SNI) instead of the host."
    )
    temporal_api_key: SecretStr | None = Field(
        default=None, description="API key sent as `authorization: Bearer` (Temporal Cloud); implies TLS."
    )
    payload_encryption: bool = Field(
        default=True, description="Encrypt every payload the runtime writes to Temporal (sandbox/payload_codec.py)."
    )
    payload_keys: SecretStr | None = Field(
        default=None,
        description='Payload keys as JSON {"current": id, "keys": {id: base64 of 32 bytes}}; '
        "unset = <data_dir>/secrets/payload-keys.json, made by the worker (sandboxctl up) on first start.",
    )

    def __init__(self, **values: Any) -> None:
        """Read the settings from ``values`` and the ``SANDBOX_*`` environment.

        Raises:
            SandboxConfigError: a value is malformed or out of its bounds; the message names each
                offending ``SANDBOX_*`` variable and what it must be.
        """
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SandboxConfigError(settings_problems(exc)) from None

    def resolved_database_url(self) -> str:
        """The SQLAlchemy async URL: the configured one, or SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'sandbox.db').resolve()}"

    def control_key_path(self) -> Path:
        """The deployment's control-signing key file."""
        return self.control_key_file or self.data_dir / "secrets" / "control-signing.key"

    def local_limits(self) -> BoxLimits:
        """The per-box limits of local boxes.

        Raises:
            SandboxConfigError: a size is malformed or a limit is too small to run anything.
        """
        from sandbox.box_limits import BoxLimits, parse_size

        return BoxLimits(
            pids_max=self.local_pids_max or None,
            memory_max=parse_size(self.local_memory_max, setting="SANDBOX_LOCAL_MEMORY_MAX"),
            cpu_max=self.local_cpu_max or None,
            disk_max=parse_size(self.local_disk_max, setting="SANDBOX_LOCAL_DISK_MAX"),
        )

    def runtime_endpoint_urls(self) -> list[str | None]:
        """The runtime's own service endpoints: boxes' egress always refuses them."""
        return [
            self.temporal_address,
            self.nats_url,
            self.resolved_database_url(),
            self.otel_endpoint,
            self.s3_endpoint if self.artifacts_url else None,
        ]

    def payload_keys_file(self) -> Path:
        """Where the payload keys live when ``SANDBOX_PAYLOAD_KEYS`` is unset (0600, made by the worker side)."""
        return self.data_dir.resolve() / "secrets" / "payload-keys.json"

    def boxes_dir(self) -> Path:
        """Where the local provider keeps one directory per box."""
        return (self.data_dir / "boxes").resolve()

    def check(self) -> Settings:
        """Refuse contradictory values (boot invariants); returns self for chaining."""
        if self.holder_ttl_seconds <= 0 or self.warming_ttl_seconds <= 0:
            raise SandboxConfigError("SANDBOX_HOLDER_TTL_SECONDS and SANDBOX_WARMING_TTL_SECONDS must be > 0")
        if self.idle_grace_seconds < 0:
            raise SandboxConfigError("SANDBOX_IDLE_GRACE_SECONDS must be >= 0")
        if self.probe_timeout_seconds >= self.warming_ttl_seconds:
            raise SandboxConfigError(
                "SANDBOX_PROBE_TIMEOUT_SECONDS must be smaller than SANDBOX_WARMING_TTL_SECONDS, "
                "or a slow probe would outlive the warming window"
            )
        if self.continue_as_new_after_transitions < 10:
            raise SandboxConfigError("SANDBOX_CONTINUE_AS_NEW_AFTER_TRANSITIONS must be >= 10")
        if self.metrics_address is not None:
            self.metrics_bind_address()
        if self.s3_secret_access_key is not None and self.s3_secret_access_key_file is not None:
            raise SandboxConfigError("set SANDBOX_S3_SECRET_ACCESS_KEY or SANDBOX_S3_SECRET_ACCESS_KEY_FILE, not both")
        return self

    def metrics_bind_address(self) -> str | None:
        """``SANDBOX_METRICS_ADDRESS`` checked as ``host:port`` (None when metrics are off).

        Raises:
            SandboxConfigError: it is not ``host:port`` with a port from 1 to 65535.
        """
        if self.metrics_address is None:
            return None
        host, sep, port = self.metrics_address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SandboxConfigError(
                f"SANDBOX_METRICS_ADDRESS must be host:port (e.g. 127.0.0.1:9464), got {self.metrics_address!r}"
            )
        return self.metrics_address


def settings_problems(exc: ValidationError) -> str:
    """One line naming each ``SANDBOX_*`` variable ``exc`` refused, what it must be and what it got."""
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        got = err.get("input")
        shown = f" (got {got!r:.60})" if isinstance(got, str | int | float) else ""
        problems.append(f"SANDBOX_{field.upper()}: {err['msg']}{shown}")
    return "invalid settings: " + "; ".join(problems)
