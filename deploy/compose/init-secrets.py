"""Make the secrets of deploy/compose.yaml once, in the mounted secrets directory (the `secrets` service).

Run by compose before anything else, as root in the worker image, with the runtime's own code, so the
files are exactly what the runtime makes for a data dir of its own (``sandboxctl up``)::

    <dir>/worker/                     the workers' data dir (SANDBOX_DATA_DIR), owned by the worker user, 0700
        secrets/payload-keys.json     history encryption keys (sandbox/payload_codec.py)
        secrets/control-signing.key   signs control requests to machines (sandbox/control_auth.py)
        secrets/nats/runtime.nk       the runtime's NATS identity (sandbox/nats_auth.py)
        secrets/nats/events.nk        read-only event consumers' NATS identity
        stream-token.secret           root of the viewers' stream tokens (sandbox/stream_token.py)
    <dir>/nats/nats-auth.conf         nats-server's authorization: every role's public nkey and subjects

A file that exists is kept (a restart or a second `up` changes nothing), so every worker replica
and every client that reads ``<dir>/worker`` as its data dir shares one set. Nothing here is ever
part of an image.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sandbox.control_auth import ControlSigningKey
from sandbox.nats_auth import NatsAuthority
from sandbox.payload_codec import ensure_payload_keys
from sandbox.secret_files import write_private_file
from sandbox.settings import Settings
from sandbox.stream_token import root_secret_for

WORKER_UID = int(os.environ.get("WORKER_UID", "10001"))
NATS_UID = int(os.environ.get("NATS_UID", "10002"))


def chown_tree(root: Path, uid: int) -> None:
    """Give ``root`` and everything under it to ``uid`` (its group too)."""
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)


def main(directory: Path) -> None:
    """Create what is missing under ``directory``, then hand each part to the service that reads it."""
    worker = directory / "worker"
    worker.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings = Settings(data_dir=worker)
    ensure_payload_keys(settings)
    root_secret_for(settings)
    ControlSigningKey.load(settings.control_key_path())
    authority = NatsAuthority(worker, config_path=directory / "nats" / "nats-auth.conf")
    authority.ensure_roles()
    # Written once: the runtime's roles, no enrolled machine (selfhosted agents on this deployment
    # need their users in this file, or a NATS cluster with its own accounts: SANDBOX_NATS_CREDS).
    if not authority.config_path.exists():
        write_private_file(authority.config_path, authority.render([]).encode())
    for part, uid in ((worker, WORKER_UID), (authority.config_path.parent, NATS_UID)):
        part.chmod(0o700)  # compose may have made it (a bind mount's missing source) with its own mode
        chown_tree(part, uid)
    print(f"secrets ready in {directory} (worker data dir {worker}, NATS config {authority.config_path})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/secrets"))
