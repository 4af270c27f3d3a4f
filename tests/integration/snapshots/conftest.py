"""Fixtures for the snapshot tests: a store, an artifact store, the local provider and the activities.

The rig runs each test twice: on the embedded filesystem artifact store and on the S3 store
against the session's S3-protocol server (moto), as a deployment with ``SANDBOX_ARTIFACTS_URL`` has.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import obstore
import pytest
from temporalio.testing import ActivityEnvironment

from activities.boxes import BoxActivities
from activities.snapshots import SnapshotActivities
from providers.local import LocalBoxSession, LocalProvider
from providers.registry import ProviderRegistry
from sandbox.box import Envelope
from sandbox.settings import Settings
from store.artifacts import FilesystemArtifactStore, artifact_store
from store.database import Database
from store.s3_artifacts import S3ArtifactStore
from store.snapshots import SnapshotLedger
from tests.conftest import S3Server, unmount_box_disks
from workflows.models.boxes import CaptureRequest, ProvisionInput, ProvisionResult, PublishRequest
from workflows.models.lease import ArchiveRef


@dataclass
class SnapshotRig:
    """Everything a snapshot test drives, wired the way the worker wires it."""

    settings: Settings
    db: Database
    ledger: SnapshotLedger
    artifacts: FilesystemArtifactStore | S3ArtifactStore
    providers: ProviderRegistry
    boxes: BoxActivities
    snapshots: SnapshotActivities
    workspace_id: str
    group_id: str

    @property
    def lease_id(self) -> str:
        return f"lease/{self.workspace_id}/{self.group_id}"

    async def keys_beside(self, key: str) -> list[str]:
        """The names of the objects stored in the same "directory" as ``key`` (whichever store)."""
        parent = key.rpartition("/")[0]
        if isinstance(self.artifacts, FilesystemArtifactStore):
            return sorted(p.name for p in self.artifacts.path_of(key).parent.iterdir())
        metas = [m async for batch in obstore.list(self.artifacts.object_store, parent + "/") for m in batch]
        return sorted(m["path"].rpartition("/")[2] for m in metas)

    @property
    def local(self) -> LocalProvider:
        provider = self.providers.get("local")
        assert isinstance(provider, LocalProvider)
        return provider

    async def provision(self, epoch: int, restore: list[ArchiveRef] | None = None) -> ProvisionResult:
        inp = ProvisionInput(
            lease_id=self.lease_id,
            workspace_id=self.workspace_id,
            group_id=self.group_id,
            backend="local",
            epoch=epoch,
            idempotency_key=f"{self.lease_id}/epoch-{epoch}",
            restore=restore or [],
        )
        result: ProvisionResult = await ActivityEnvironment().run(self.boxes.provision, inp)
        return result

    async def box(self, result: ProvisionResult) -> LocalBoxSession:
        return await self.local.resume(self.local_envelope(result.envelope))

    def local_envelope(self, envelope: Envelope) -> Any:
        from sandbox.box import Envelope

        return Envelope(**envelope.model_dump())

    async def capture(
        self,
        result: ProvisionResult,
        *,
        epoch: int,
        only_if_changed: bool = False,
        previous_sha256: str | None = None,
        reason: str = "drain",
    ) -> ArchiveRef:
        req = CaptureRequest.model_validate(
            {
                "backend": "local",
                "envelope": result.envelope,
                "lease_id": self.lease_id,
                "workspace_id": self.workspace_id,
                "group_id": self.group_id,
                "epoch": epoch,
                "reason": reason,
                "only_if_changed": only_if_changed,
                "previous_sha256": previous_sha256,
            }
        )
        ref: ArchiveRef = await ActivityEnvironment().run(self.snapshots.capture, req)
        return ref

    async def publish(self, snapshot_id: str) -> list[ArchiveRef]:
        req = PublishRequest(lease_id=self.lease_id, snapshot_id=snapshot_id)
        slots: list[ArchiveRef] = await ActivityEnvironment().run(self.snapshots.publish, req)
        return slots


def _fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in memory (``/dev/shm``) when there is one, else under ``tmp_path``.

    The round trip writes and extracts 100 MB and 10,000 files several times; on a shared disk
    that measures the disk's contention, not the code under test.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(prefix="sandbox-snapshots-", dir=shm) as tmp:
            os.chmod(tmp, 0o711)  # boxes run as another uid that passes through (tests/conftest.py)
            try:
                yield Path(tmp)
            finally:
                unmount_box_disks((tmp + "/",))
    else:
        yield tmp_path


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield from _fast_dir(tmp_path)


@pytest.fixture(params=["filesystem", "s3"])
async def rig(scratch: Path, request: pytest.FixtureRequest) -> AsyncIterator[SnapshotRig]:
    values: dict[str, Any] = {}
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        values = s3.settings_values(s3.new_bucket())
    settings = Settings(data_dir=scratch / "data", **values)
    db = Database.for_settings(settings)
    await db.migrate()
    ledger = SnapshotLedger(db)
    artifacts = artifact_store(settings)
    assert isinstance(artifacts, FilesystemArtifactStore | S3ArtifactStore)
    providers = ProviderRegistry(settings)
    try:
        yield SnapshotRig(
            settings=settings,
            db=db,
            ledger=ledger,
            artifacts=artifacts,
            providers=providers,
            boxes=BoxActivities(providers, artifacts),
            snapshots=SnapshotActivities(providers, ledger, artifacts),
            workspace_id=f"ws-{secrets.token_hex(3)}",
            group_id="g1",
        )
    finally:
        await providers.aclose()
        await db.dispose()


def manifest(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """What a user compares after a restore: path -> (type, mode, size, content hash or link target)."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("symlink", st.st_mode, 0, os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode, 0, "")
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                out[rel] = ("file", st.st_mode, st.st_size, digest.hexdigest())
    return out
