"""A plane test harness: local boxes (bubblewrap when available) plus the plane activities, no Temporal."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from activities.models import DisplayStackRequest, TearDownPlanesRequest, TerminalServerRequest
from activities.planes import PlaneActivities
from providers.base import BoxSpec, Envelope
from providers.local import LocalBoxSession, LocalProvider
from providers.registry import ProviderRegistry
from sandbox.edge import DESKTOP_TOKEN_PORT, TERMINAL_TOKEN_PORT
from sandbox.settings import Settings
from sandbox.stream_token import StreamTokenKey, derive_lease_key, root_secret_for
from workflows.models import BoxEnvelope

ROOT_SECRET = "plane-tests-root-secret"


@dataclass
class Box:
    """One local box of a lease."""

    lease_id: str
    epoch: int
    session: LocalBoxSession
    envelope: BoxEnvelope

    @property
    def edge_dir(self) -> Path:
        """The box's edge state directory on the host."""
        return self.session.path / "tmp" / ".sandbox-edge"

    def desktop_request(self, **overrides: object) -> DisplayStackRequest:
        fields: dict[str, object] = {
            "backend": "local",
            "envelope": self.envelope,
            "lease_id": self.lease_id,
            "epoch": self.epoch,
        }
        fields.update(overrides)
        return DisplayStackRequest.model_validate(fields)

    def terminal_request(self) -> TerminalServerRequest:
        return TerminalServerRequest(backend="local", envelope=self.envelope, lease_id=self.lease_id, epoch=self.epoch)

    def ref(self) -> TearDownPlanesRequest:
        return TearDownPlanesRequest(backend="local", envelope=self.envelope)

    async def sh(self, script: str, *, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
        """Run a shell snippet in the box; (exit code, stdout + stderr)."""
        result = await self.session.exec(["bash", "-c", script], env=env, timeout=timeout)
        return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")


class PlaneHarness:
    """Creates boxes and mints tokens against the activities' root secret."""

    def __init__(self, settings: Settings, registry: ProviderRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.activities = PlaneActivities(registry, settings)
        self.root = root_secret_for(settings)

    @property
    def provider(self) -> LocalProvider:
        provider = self.registry.get("local")
        assert isinstance(provider, LocalProvider)
        return provider

    async def box(self, group: str | None = None, *, epoch: int = 1) -> Box:
        group = group or uuid.uuid4().hex[:8]
        lease_id = f"lease/ws-planes/{group}"
        spec = BoxSpec(lease_id=lease_id, workspace_id="ws-planes", group_id=group, epoch=epoch)
        session = await self.provider.create(spec, f"{lease_id}#{epoch}#{uuid.uuid4().hex}")
        assert isinstance(session, LocalBoxSession)
        envelope = BoxEnvelope(**session.serialize_state().model_dump())
        return Box(lease_id, epoch, session, envelope)

    def mint(
        self,
        lease_id: str,
        epoch: int,
        *,
        plane: str = "desktop",
        now: float | None = None,
        ttl: int = 120,
        root: bytes | None = None,
    ) -> str:
        """A stream token for (lease, epoch), as the client mints it."""
        key = StreamTokenKey(derive_lease_key(root or self.root, lease_id, epoch))
        fields = {
            "workspace_id": str(uuid.uuid4()),
            "session_id": str(uuid.uuid4()),
            "viewer_id": str(uuid.uuid4()),
            "lease_epoch": epoch,
            "port": DESKTOP_TOKEN_PORT if plane == "desktop" else TERMINAL_TOKEN_PORT,
        }
        return key.mint_for(fields, now=now, ttl_seconds=ttl)


@contextlib.asynccontextmanager
async def plane_harness(data_dir: Path) -> AsyncIterator[PlaneHarness]:
    """A harness whose boxes and processes are gone when the block ends."""
    settings = Settings(data_dir=data_dir, stream_token_secret=ROOT_SECRET)
    registry = ProviderRegistry(settings)
    harness = PlaneHarness(settings, registry)
    try:
        yield harness
    finally:
        provider = harness.provider
        for owned in await provider.list_owned():
            with contextlib.suppress(Exception):
                await provider.terminate(Envelope(backend_id=provider.backend_id, instance_id=owned.instance_id))
        await registry.aclose()
