"""Who may talk on NATS, and how each client of the runtime proves who it is.

NATS's own mechanisms do the enforcing; nothing here is a scheme of ours.

- :class:`NatsAuth` is one client's identity and TLS: an nkey seed, or a NATS ``.creds`` file
  (decentralised JWT, for an existing cluster), plus optional TLS files. :meth:`NatsAuth.for_role`
  reads it from the settings; every NATS client of the runtime connects with
  ``nats.connect(url, **auth.connect_options())``.
- :class:`NatsAuthority` is the embedded server's side (``sandboxctl up``): one nkey per role in
  ``<data_dir>/secrets/nats/`` (0600), and a generated ``nats-auth.conf`` listing every identity
  with the subjects it may use:

  ======== ============================================== ==========================================
  role     publish                                        subscribe
  ======== ============================================== ==========================================
  runtime  ``agent.*.*.rpc``, ``session.*.*.events``      ``_INBOX.>`` (its replies)
  events   nothing                                        ``session.*.*.events``
  agent    only replies to requests it received           its own ``agent.<ws>.<id>.rpc``, in the
                                                          queue group of the same name only
  ======== ============================================== ==========================================

  Enrolling or revoking a machine rewrites the file and signals the server to reload it
  (SIGHUP): a revoked agent's connection is closed at once, NATS keeps running.

Unauthenticated connections are refused by the server. ``SANDBOX_NATS_AUTH=off`` is the explicit
opt-out for a trusted network; it warns on every use. Requests and replies are signed whatever
this setting says (:mod:`sandbox.control_auth`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import SecretStr

from sandbox.control_auth import AgentCredential, new_nkey_user_seed, nkey_public_key
from sandbox.control_protocol import agent_subject
from sandbox.errors import SandboxConfigError
from sandbox.secret_files import load_or_create_secret, write_private_file

if TYPE_CHECKING:
    from sandbox.settings import Settings

__all__ = ["AgentNatsUser", "NatsAuth", "NatsAuthority", "NatsRole"]

_log = logging.getLogger(__name__)

NatsRole = Literal["runtime", "events"]
_JWT_MARKER: Final = "-----BEGIN NATS USER JWT-----"
_USER_NKEY: Final = re.compile(r"U[A-Z2-7]{55}")
# A reply may come long after its request (an exec runs for hours); the server forgets the
# permission to answer once the one reply is sent, so a long window costs nothing.
_RESPONSE_WINDOW: Final = "24h"
_warned_off = False


@dataclass(frozen=True)
class NatsAuth:
    """One NATS client's credentials and TLS (all optional; nothing set = anonymous, plain TCP)."""

    nkey_seed: SecretStr | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_file(
        cls, path: Path, *, tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None
    ) -> NatsAuth:
        """A ``.creds`` file (JWT + seed) or a file holding one nkey seed.

        Raises:
            SandboxConfigError: unreadable, or neither form.
        """
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise SandboxConfigError(f"cannot read the NATS credential {path}: {err.strerror}") from None
        if _JWT_MARKER in text:
            return cls(creds_file=Path(path), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        nkey_public_key(text)  # refuses a file that is no seed, naming no secret
        return cls(nkey_seed=SecretStr(text.strip()), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)

    @classmethod
    def for_role(cls, settings: Settings, role: NatsRole = "runtime") -> NatsAuth:
        """The identity ``role`` connects with, from the settings.

        ``SANDBOX_NATS_CREDS`` (and ``SANDBOX_NATS_EVENTS_CREDS`` for event readers) name an
        existing cluster's credentials; otherwise the embedded stack's role key in the data dir.

        Raises:
            SandboxConfigError: auth is on and no credential exists (the message says how to get one).
        """
        tls_ca, tls_cert, tls_key = settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
        if settings.nats_auth == "off":
            global _warned_off
            if not _warned_off:
                _log.warning(
                    "SANDBOX_NATS_AUTH=off: connecting to NATS without credentials; anyone who can reach "
                    "the server can read session events (control messages stay signed)"
                )
                _warned_off = True
            return cls(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        chosen = settings.nats_events_creds if role == "events" else None
        path = chosen or settings.nats_creds
        if path is None:
            authority = NatsAuthority(settings.data_dir)
            path = authority.role_seed_path(role)
            if role == "events" and not path.exists():
                path = authority.role_seed_path("runtime")
        if not Path(path).exists():
            raise SandboxConfigError(
                f"no NATS credential at {path}: start the embedded stack once with `sandboxctl up` (it makes "
                "one), set SANDBOX_NATS_CREDS to your cluster's credentials file, or, on a trusted network "
                "only, SANDBOX_NATS_AUTH=off"
            )
        return cls.from_file(Path(path), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)

    @classmethod
    def for_agent(cls, settings: Settings, credential: AgentCredential) -> NatsAuth:
        """An enrolled agent's identity (its credential's nkey) with the settings' TLS; none when auth is off."""
        seed = None if settings.nats_auth == "off" else credential.nats_seed
        return cls(
            nkey_seed=seed, tls_ca=settings.nats_tls_ca, tls_cert=settings.nats_tls_cert, tls_key=settings.nats_tls_key
        )

    @classmethod
    def best_effort(cls, settings: Settings, role: NatsRole) -> NatsAuth:
        """:meth:`for_role`, or no identity when there is none, for optional feeds (events): never raises.

        Without a credential the server refuses the connection, and the caller's feed reports
        that it has no events, which is the truth.
        """
        try:
            return cls.for_role(settings, role)
        except SandboxConfigError as err:
            _log.warning("%s", err.message)
            return cls()

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (identity and TLS).

        Raises:
            SandboxConfigError: a TLS file cannot be loaded.
        """
        options: dict[str, Any] = {}
        if self.nkey_seed is not None:
            options["nkeys_seed_str"] = self.nkey_seed.get_secret_value()
        if self.creds_file is not None:
            options["user_credentials"] = str(self.creds_file)
        if self.tls_ca or self.tls_cert:
            if bool(self.tls_cert) != bool(self.tls_key):
                raise SandboxConfigError("SANDBOX_NATS_TLS_CERT and SANDBOX_NATS_TLS_KEY go together")
            try:
                context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
                if self.tls_cert and self.tls_key:
                    context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except (OSError, ssl.SSLError) as err:
                raise SandboxConfigError(f"cannot load the NATS TLS files: {err}") from None
            options["tls"] = context
        return options

    @property
    def anonymous(self) -> bool:
        """No identity at all (``SANDBOX_NATS_AUTH=off``)."""
        return self.nkey_seed is None and self.creds_file is None


@dataclass(frozen=True)
class AgentNatsUser:
    """An enrolled agent as the server config lists it."""

    workspace_id: str
    agent_id: str
    nats_public_key: str


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


class NatsAuthority:
    """The embedded nats-server's identities and generated config under one data dir."""

    def __init__(self, data_dir: Path, *, config_path: Path | None = None, pid_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.secrets = self.data_dir / "secrets" / "nats"
        self.config_path = config_path or self.data_dir / "nats-auth.conf"
        self.pid_path = pid_path or self.data_dir / "nats.pid"

    @property
    def embedded(self) -> bool:
        """Whether ``sandboxctl up`` runs (or ran) a server of ours for this data dir."""
        return self.config_path.exists()

    def role_seed_path(self, role: NatsRole) -> Path:
        """Where ``role``'s nkey seed lives."""
        return self.secrets / f"{role}.nk"

    def ensure_roles(self) -> None:
        """Create the runtime and events keys on first use (0600)."""
        for role in ("runtime", "events"):
            load_or_create_secret(self.role_seed_path(role), what=f"NATS {role} key", make=new_nkey_user_seed)

    def role_public_key(self, role: NatsRole) -> str:
        """The public nkey of a role (created first if missing)."""
        self.ensure_roles()
        return nkey_public_key(self.role_seed_path(role).read_bytes())

    def render(self, agents: Iterable[AgentNatsUser]) -> str:
        """The ``authorization`` block: every role and agent with its permissions."""
        users = [
            f"    {{ nkey: {self.role_public_key('runtime')}, permissions: {{ "
            f"publish: {{ allow: {_quoted(['agent.*.*.rpc', 'session.*.*.events'])} }}, "
            f"subscribe: {{ allow: {_quoted(['_INBOX.>'])} }} }} }}",
            f"    {{ nkey: {self.role_public_key('events')}, permissions: {{ "
            f"publish: {{ deny: {_quoted(['>'])} }}, "
            f"subscribe: {{ allow: {_quoted(['session.*.*.events'])} }} }} }}",
        ]
        for agent in sorted(agents, key=lambda a: (a.workspace_id, a.agent_id)):
            subject = agent_subject(agent.workspace_id, agent.agent_id)
            if not _USER_NKEY.fullmatch(agent.nats_public_key):
                # Rendered into the server's config: anything but a user nkey could inject settings.
                raise SandboxConfigError(f"enrollment {agent.workspace_id}/{agent.agent_id} has a malformed NATS key")
            users.append(
                f"    {{ nkey: {agent.nats_public_key}, permissions: {{ "
                f"publish: {{ deny: {_quoted(['>'])} }}, "
                f"subscribe: {{ allow: {_quoted([f'{subject} {subject}'])} }}, "
                f'allow_responses: {{ max: 1, expires: "{_RESPONSE_WINDOW}" }} }} }}'
            )
        body = "\n".join(users)
        header = "# Generated by the sandbox runtime; rewritten on every enroll and revoke.\n"
        return f"{header}authorization {{\n  users = [\n{body}\n  ]\n}}\n"

    def write(self, agents: Iterable[AgentNatsUser]) -> Path:
        """Write the config (mode 0600) and return its path."""
        write_private_file(self.config_path, self.render(agents).encode())
        return self.config_path

    def reload(self) -> bool:
        """Ask the running server to re-read its config; whether one was running to ask."""
        try:
            pid = int(self.pid_path.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            return False
        return True
