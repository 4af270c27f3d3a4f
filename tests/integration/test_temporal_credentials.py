"""Temporal credentials for real: mTLS through a TLS-terminating proxy, and the API key on the wire.

The dev server speaks plain gRPC, so Debian's HAProxy terminates TLS in front of it with ``verify
required`` (a client certificate chaining to the client CA) and ALPN ``h2`` (stunnel cannot stand
in: it negotiates no ALPN, and the SDK's gRPC client then refuses the connection, H2NotNegotiated).
Certificates are made here with ``cryptography``. Each refusal has its positive control: the same
proxy admits the right client.
The API key is checked on a small gRPC server (``grpclib``, TLS with our CA) that records the
metadata of ``GetSystemInfo``, the first call ``Client.connect`` makes.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from sandbox.errors import SandboxConfigError
from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, free_port, running_runtime, wait_for_port
from worker import connect, temporal_tls

SERVER_NAME = "temporal.sandbox.test"


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A throwaway CA writing PEM files into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = directory / f"{name}-ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool) -> Issued:
        """A leaf certificate for a server (SAN: SERVER_NAME, 127.0.0.1) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}"
        issued = Issued(cert=stem.with_suffix(".pem"), key=stem.with_suffix(".key"))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        issued.key.chmod(0o600)
        return issued


@dataclass(frozen=True)
class Pki:
    server_ca: Authority
    client_ca: Authority
    rogue_ca: Authority
    server: Issued
    client: Issued
    rogue_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = (Authority(directory, name) for name in ("server", "client", "rogue"))
    return Pki(
        server_ca=server_ca,
        client_ca=client_ca,
        rogue_ca=rogue_ca,
        server=server_ca.issue("frontend", server=True),
        client=client_ca.issue("worker", server=False),
        rogue_client=rogue_ca.issue("worker", server=False),
    )


# --------------------------------------------------------------------------- the TLS proxy


@pytest.fixture(scope="module")
def tls_address(pki: Pki, temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """HAProxy terminating mTLS (client certificate required, ALPN h2) in front of the session's dev server."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy not found: apt-get install haproxy (scripts/install)")
    upstream = temporal_env.client.service_client.config.target_host
    port = free_port()
    directory = tmp_path_factory.mktemp("haproxy")
    bundle = directory / "frontend.pem"  # haproxy takes the certificate and its key in one file
    bundle.write_bytes(pki.server.cert.read_bytes() + pki.server.key.read_bytes())
    bundle.chmod(0o600)
    config = directory / "haproxy.cfg"
    config.write_text(
        "\n".join(
            [
                "defaults",
                "  mode tcp",
                "  timeout connect 5s",
                "  timeout client 5m",
                "  timeout server 5m",
                "frontend temporal",
                # verify required: a client certificate chaining to the client CA, or no handshake.
                # alpn h2: gRPC clients (tonic, in the SDK's core) refuse a TLS server that does not
                # negotiate HTTP/2, which is why stunnel (no ALPN) cannot front Temporal.
                f"  bind 127.0.0.1:{port} ssl crt {bundle} ca-file {pki.client_ca.pem} verify required alpn h2",
                "  default_backend dev",
                "backend dev",
                f"  server dev {upstream}",
                "",
            ]
        )
    )
    proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def tls_settings(tmp_path: Path, address: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "temporal_address": address,
        "task_queue": f"tls-{uuid.uuid4()}",
        **FAST_TIMERS,
    }
    values.update(overrides)
    return Settings(**values)


async def test_worker_and_client_run_a_lease_through_mtls(pki: Pki, tls_address: str, tmp_path: Path) -> None:
    """Positive control: a client certificate from the client CA is admitted; a worker and a client
    connected through the proxy run a lease, an exec update and the describe query."""
    settings = tls_settings(
        tmp_path,
        tls_address,
        temporal_tls_cert=pki.client.cert,
        temporal_tls_key=pki.client.key,
        temporal_tls_ca=pki.server_ca.pem,
        temporal_tls_server_name=SERVER_NAME,
    )
    client = await connect(settings)
    async with running_runtime(client, settings) as runtime:
        leases = runtime.leases()
        ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
        grant = await leases.acquire(ws, g, kind="turn", holder_id="t1", backend="local")
        out = await leases.exec(ws, g, ["echo", "over mtls"])
        view = await leases.describe(ws, g)
        await leases.release(ws, g, "t1", kind="turn")
    assert (out.exit_code, out.stdout) == (0, "over mtls\n")
    assert view.instance_id == grant.instance_id


def assert_refused_by_the_proxy(reason: str) -> None:
    """The proxy refused the client's certificate (or its absence).

    With TLS 1.3 the server checks the client certificate after the client's side of the handshake
    is done, so the client sees the proxy's alert (CertificateRequired, UnknownCA) or, when the
    hang-up wins the race, a closed connection or broken pipe on its first call.
    """
    assert any(text in reason for text in ("CertificateRequired", "UnknownCA", "connection closed", "broken pipe")), (
        reason
    )


async def _refused(settings: Settings) -> str:
    """The error ``connect`` fails with (the TLS layer's reason is in it)."""
    with pytest.raises(RuntimeError) as caught:
        await asyncio.wait_for(connect(settings), timeout=30)
    return str(caught.value)


async def test_without_a_client_certificate_the_proxy_refuses(pki: Pki, tls_address: str, tmp_path: Path) -> None:
    """Negative: TLS with the right server CA but no client certificate does not get through."""
    settings = tls_settings(
        tmp_path, tls_address, temporal_tls_ca=pki.server_ca.pem, temporal_tls_server_name=SERVER_NAME
    )
    assert_refused_by_the_proxy(await _refused(settings))


async def test_a_client_certificate_from_another_ca_is_refused(pki: Pki, tls_address: str, tmp_path: Path) -> None:
    settings = tls_settings(
        tmp_path,
        tls_address,
        temporal_tls_cert=pki.rogue_client.cert,
        temporal_tls_key=pki.rogue_client.key,
        temporal_tls_ca=pki.server_ca.pem,
        temporal_tls_server_name=SERVER_NAME,
    )
    assert_refused_by_the_proxy(await _refused(settings))


async def test_a_server_certificate_from_another_ca_is_refused(pki: Pki, tls_address: str, tmp_path: Path) -> None:
    """The client checks the server too: trusting only the rogue CA, it will not talk to the proxy."""
    settings = tls_settings(
        tmp_path,
        tls_address,
        temporal_tls_cert=pki.client.cert,
        temporal_tls_key=pki.client.key,
        temporal_tls_ca=pki.rogue_ca.pem,
        temporal_tls_server_name=SERVER_NAME,
    )
    assert "UnknownIssuer" in await _refused(settings)  # the client's own check


async def test_plain_grpc_to_the_tls_port_is_refused(tls_address: str, tmp_path: Path) -> None:
    await _refused(tls_settings(tmp_path, tls_address))


# --------------------------------------------------------------------------- the API key


@dataclass
class MetadataRecorder:
    calls: list[dict[str, str]]


@pytest.fixture
async def grpc_frontend(pki: Pki) -> AsyncIterator[tuple[str, MetadataRecorder]]:
    """A TLS gRPC server answering ``GetSystemInfo`` and recording each call's metadata."""
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server, Stream
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest, GetSystemInfoResponse

    recorder = MetadataRecorder(calls=[])

    async def get_system_info(stream: Stream[GetSystemInfoRequest, GetSystemInfoResponse]) -> None:
        # The request body is not read: the SDK gzips it, which grpclib cannot decode; the metadata is what counts.
        recorder.calls.append({k: str(v) for k, v in (stream.metadata or {}).items()})
        await stream.send_message(GetSystemInfoResponse())

    class Frontend:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo": Handler(
                    get_system_info, Cardinality.UNARY_UNARY, GetSystemInfoRequest, GetSystemInfoResponse
                )
            }

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    context.set_alpn_protocols(["h2"])
    server = Server([Frontend()])
    port = free_port()
    await server.start("127.0.0.1", port, ssl=context)
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.close()
        await server.wait_closed()


async def test_api_key_is_sent_as_bearer_over_tls_and_never_logged(
    pki: Pki, grpc_frontend: tuple[str, MetadataRecorder], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The key alone turns TLS on (the frontend speaks only TLS) and travels as ``authorization: Bearer``."""
    address, recorder = grpc_frontend
    key = f"key-{uuid.uuid4().hex}"
    settings = tls_settings(
        tmp_path, address, temporal_api_key=key, temporal_tls_ca=pki.server_ca.pem, temporal_tls_server_name=SERVER_NAME
    )
    with caplog.at_level(logging.DEBUG):
        client = await connect(settings)
    assert isinstance(client, Client)
    assert recorder.calls and recorder.calls[0].get("authorization") == f"Bearer {key}"
    # The fake frontend's own HTTP/2 libraries log the header they decode; every other line is ours or the SDK's.
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith(("hpack", "h2", "grpclib"))]
    assert any("api key=set" in line for line in ours), ours  # control: connect does log its credentials' shape
    assert not [line for line in ours if key in line]
    assert key not in repr(settings) and key not in str(settings.model_dump())
    assert key not in repr(temporal_tls(settings))


async def test_without_an_api_key_no_authorization_is_sent(
    pki: Pki, grpc_frontend: tuple[str, MetadataRecorder], tmp_path: Path
) -> None:
    """Control for the check above: the recorder does see calls, and the header comes from the key."""
    address, recorder = grpc_frontend
    settings = tls_settings(tmp_path, address, temporal_tls_ca=pki.server_ca.pem, temporal_tls_server_name=SERVER_NAME)
    await connect(settings)
    assert recorder.calls and "authorization" not in recorder.calls[0]


# --------------------------------------------------------------------------- misconfiguration


def test_tls_is_off_unless_configured(tmp_path: Path) -> None:
    assert temporal_tls(tls_settings(tmp_path, "127.0.0.1:7233")) is False


def test_api_key_implies_tls_unless_told_otherwise(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path, "127.0.0.1:7233", temporal_api_key="k")
    assert temporal_tls(settings) not in (False, None)
    assert temporal_tls(settings.model_copy(update={"temporal_tls": False})) is False


@pytest.mark.parametrize(("given", "missing"), [("cert", "KEY"), ("key", "CERT")])
def test_half_a_client_identity_names_the_missing_setting(pki: Pki, tmp_path: Path, given: str, missing: str) -> None:
    path = pki.client.cert if given == "cert" else pki.client.key
    settings = tls_settings(tmp_path, "127.0.0.1:7233", **{f"temporal_tls_{given}": path})
    with pytest.raises(SandboxConfigError, match=f"without SANDBOX_TEMPORAL_TLS_{missing}"):
        temporal_tls(settings)


def test_unreadable_tls_file_names_the_setting(tmp_path: Path) -> None:
    settings = tls_settings(tmp_path, "127.0.0.1:7233", temporal_tls_ca=tmp_path / "missing.pem")
    with pytest.raises(SandboxConfigError, match=r"SANDBOX_TEMPORAL_TLS_CA=.*missing.pem: cannot read it"):
        temporal_tls(settings)


def test_tls_files_contradicting_tls_false_are_refused(pki: Pki, tmp_path: Path) -> None:
    settings = tls_settings(tmp_path, "127.0.0.1:7233", temporal_tls=False, temporal_tls_ca=pki.server_ca.pem)
    with pytest.raises(SandboxConfigError, match="SANDBOX_TEMPORAL_TLS=false contradicts SANDBOX_TEMPORAL_TLS_CA"):
        temporal_tls(settings)
