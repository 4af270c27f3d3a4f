"""The static capability descriptor of every sandbox backend, and the registry that holds them.

A :class:`CapabilityDescriptor` says what a backend can do before any box exists: its tier, the
operating systems it serves, how terminal and desktop reach a viewer, how ports are exposed, how
workspaces are snapshotted, and how long a box may live. The table is the upstream one
(``reference/upstream-runtime-contracts.md`` §1.1), written out here as data. Models use snake_case
attributes and serialise to the upstream camelCase JSON (``model_dump(by_alias=True)``), so a
TypeScript caller reads the same document the upstream produced.

The registry checks its invariants at import (:func:`assert_descriptor_registry_invariants`): a
contradictory descriptor stops the process at boot instead of surfacing as a confusing failure when
a viewer first asks for a desktop.

``local`` is the one backend whose SDK id differs from its name (``unix_local``); the two are kept
apart and mapped in both directions without ever falling back to a default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeGuard, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel

from sandbox.errors import SandboxConfigError, UnknownBackend

__all__ = [
    "BROWSER_CONTROL_PORT",
    "CAPABILITY_DESCRIPTORS",
    "CAPABILITY_UNAVAILABLE_REASONS",
    "DESKTOP_STREAM_PORT",
    "NEVER_SENT_DETAIL_KEY",
    "SANDBOX_BACKENDS",
    "SANDBOX_CAPABILITY_NAMES",
    "SANDBOX_OS",
    "SELFHOSTED_RECONNECT_WINDOW_MS",
    "STREAM_TOKEN_DEFAULT_TTL_SECONDS",
    "TERMINAL_STREAM_PORT",
    "BackendCapabilities",
    "CapabilityDescriptor",
    "CapabilityUnavailableReason",
    "DesktopStreamCapability",
    "DesktopTransport",
    "FileSystemCapability",
    "GitCapability",
    "Lifetime",
    "OsSupport",
    "PortExposure",
    "PortExposureKind",
    "RecordingCapability",
    "SandboxBackend",
    "SandboxOs",
    "SnapshotKind",
    "SnapshotSupport",
    "TerminalCapability",
    "TerminalTransport",
    "Tier",
    "assert_descriptor_registry_invariants",
    "backend_supports_os",
    "descriptor_invariant_violations",
    "desktop_capable_backend",
    "get_descriptor",
    "is_sandbox_backend",
    "sandbox_backend_for_sdk_backend_id",
    "sdk_backend_id_for_sandbox_backend",
    "select_backend",
]

# --- enumerations -------------------------------------------------------------------------------

SandboxBackend = Literal[
    "docker",
    "modal",
    "local",
    "none",
    "daytona",
    "runloop",
    "e2b",
    "blaxel",
    "cloudflare",
    "vercel",
    "selfhosted",
    "opensandbox",
]
#: Every backend name, in the upstream enum order (new members are only ever appended).
SANDBOX_BACKENDS: Final[tuple[SandboxBackend, ...]] = get_args(SandboxBackend)

SandboxOs = Literal["linux", "macos", "windows"]
SANDBOX_OS: Final[tuple[SandboxOs, ...]] = get_args(SandboxOs)

#: The capability cells of a descriptor, under their upstream names.
SANDBOX_CAPABILITY_NAMES: Final = ("FileSystem", "Terminal", "Git", "DesktopStream", "Recording")

Tier = Literal["desktop", "headless", "dev", "none"]
TerminalTransport = Literal["sse-events", "pty-ws", "relay-pty"]
DesktopTransport = Literal["vnc-ws", "rdp-ws", "webrtc"]
PortExposureKind = Literal["provider-tunnel", "preview-url", "local-port", "none"]
SnapshotKind = Literal["native-fs", "native-dir", "native-snapshot-id", "tar-only", "none"]


class CapabilityUnavailableReason(StrEnum):
    """Why a capability cell is unavailable, in the upstream order.

    The base negotiator never produces ``NOT_PROVISIONED``; the ``AGENT_*``, ``CONSENT_REQUIRED`` and
    ``DISPLAY_UNAVAILABLE`` reasons come only from the selfhosted overlay.
    """

    BACKEND_UNSUPPORTED = "backend_unsupported"
    OS_UNSUPPORTED = "os_unsupported"
    NOT_PROVISIONED = "not_provisioned"
    DISABLED_BY_POLICY = "disabled_by_policy"
    LEASE_COLD = "lease_cold"
    TIER_HEADLESS = "tier_headless"
    AGENT_OFFLINE = "agent_offline"
    AGENT_RECONNECTING = "agent_reconnecting"
    CONSENT_REQUIRED = "consent_required"
    DISPLAY_UNAVAILABLE = "display_unavailable"


CAPABILITY_UNAVAILABLE_REASONS: Final[tuple[str, ...]] = tuple(r.value for r in CapabilityUnavailableReason)


# --- constants ----------------------------------------------------------------------------------

DESKTOP_STREAM_PORT: Final = 6080
"""websockify / noVNC inside the box."""
TERMINAL_STREAM_PORT: Final = 7681
"""ttyd inside the box."""
BROWSER_CONTROL_PORT: Final = 7682
"""browserd inside the box."""
STREAM_TOKEN_DEFAULT_TTL_SECONDS: Final = 120
SELFHOSTED_RECONNECT_WINDOW_MS: Final = 30_000
"""A selfhosted agent seen this recently is *reconnecting* rather than offline."""
NEVER_SENT_DETAIL_KEY: Final = "_never_sent"
"""Control-error detail key (value ``"1"``) marking a request the agent never received."""

_HOUR_MS: Final = 3_600_000

# --- models -------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _tuple_as_list(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


# Tuples keep the shared registry immutable; they serialise as the JSON arrays upstream emits.
WireTuple = Annotated[tuple[_T, ...], PlainSerializer(_tuple_as_list)]


def _with_null_transport(data: dict[str, Any], info: SerializationInfo) -> dict[str, Any]:
    """Put back a null ``transport`` that ``exclude_none`` dropped: upstream always writes the key."""
    excluded = info.exclude or ()
    if "transport" in data or "transport" in excluded or not info.exclude_none or "available" not in data:
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = value
        if key == "available":
            out["transport"] = None
    return out


class _DescriptorModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
    )


class OsSupport(_DescriptorModel):
    """The operating systems a backend serves, and the one it uses when none is asked for."""

    supported: WireTuple[SandboxOs]
    default: SandboxOs = "linux"


class FileSystemCapability(_DescriptorModel):
    """Whether the workspace file system can be read (and written)."""

    available: bool
    read_only: bool


class TerminalCapability(_DescriptorModel):
    """Whether a terminal exists, how it reaches a viewer, and whether it is a real PTY."""

    available: bool
    transport: TerminalTransport | None
    pty: bool

    @model_serializer(mode="wrap")
    def _keep_null_transport(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_null_transport(handler(self), info)


class GitCapability(_DescriptorModel):
    """Whether git operations work in the workspace."""

    available: bool


class DesktopStreamCapability(_DescriptorModel):
    """Whether the backend can serve the desktop pixel plane, and over which transport."""

    available: bool
    transport: DesktopTransport | None

    @model_serializer(mode="wrap")
    def _keep_null_transport(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _with_null_transport(handler(self), info)


class RecordingCapability(_DescriptorModel):
    """Whether the desktop can be recorded (always equal to desktop availability)."""

    available: bool


class BackendCapabilities(_DescriptorModel):
    """The five static capability cells, under their upstream PascalCase names."""

    file_system: FileSystemCapability = Field(alias="FileSystem")
    terminal: TerminalCapability = Field(alias="Terminal")
    git: GitCapability = Field(alias="Git")
    desktop_stream: DesktopStreamCapability = Field(alias="DesktopStream")
    recording: RecordingCapability = Field(alias="Recording")


_OPTIONAL_LIFETIME_KEYS: Final = frozenset(
    {"hard_lifetime_ms", "hardLifetimeMs", "idle_kill_disable_hint", "idleKillDisableHint"}
)


class Lifetime(_DescriptorModel):
    """How long a box lives and how it can be paused or resumed."""

    hard_lifetime_ms: int | None = Field(default=None, gt=0)
    requires_snapshot_rollover: bool
    has_idle_killer: bool
    supports_suspend_resume: bool
    resume_is_lock_free: bool
    idle_kill_disable_hint: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_optionals(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Upstream leaves these keys out when unset rather than writing null.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (k in _OPTIONAL_LIFETIME_KEYS and v is None)}


class SnapshotSupport(_DescriptorModel):
    """How a workspace is captured, and whether a portable tar is available as a fallback."""

    kind: SnapshotKind
    has_tar_fallback: bool


class PortExposure(_DescriptorModel):
    """How a port inside the box is reached, and whether ports can be opened after creation."""

    kind: PortExposureKind
    supports_on_demand_ports: bool


class CapabilityDescriptor(_DescriptorModel):
    """The static capabilities of one backend (upstream ``CapabilityDescriptor``)."""

    backend: SandboxBackend
    backend_id: str = Field(min_length=1, description="The SDK client id; differs from backend only for local.")
    tier: Tier
    os: OsSupport
    capabilities: BackendCapabilities
    lifetime: Lifetime
    snapshot: SnapshotSupport
    port_exposure: PortExposure
    workspace_root: str
    native_bucket_mount: bool
    persistable: bool
    supports_run_as: bool


# --- the registry -------------------------------------------------------------------------------

_LINUX_ONLY: Final = OsSupport(supported=("linux",), default="linux")
_FS_RW: Final = FileSystemCapability(available=True, read_only=False)
_GIT: Final = GitCapability(available=True)
_NO_DESKTOP: Final = DesktopStreamCapability(available=False, transport=None)


def _capabilities(
    *, terminal: TerminalTransport | None, pty: bool, desktop: DesktopTransport | None
) -> BackendCapabilities:
    """Cells of a backend with a writable file system and git (every backend but ``none``)."""
    return BackendCapabilities(
        file_system=_FS_RW,
        terminal=TerminalCapability(available=terminal is not None, transport=terminal, pty=pty),
        git=_GIT,
        desktop_stream=DesktopStreamCapability(available=True, transport=desktop) if desktop else _NO_DESKTOP,
        recording=RecordingCapability(available=desktop is not None),
    )


def _lifetime(
    *,
    hard_lifetime_ms: int | None = None,
    rollover: bool = False,
    idle_killer: bool = False,
    suspend: bool = False,
    lock_free: bool = False,
) -> Lifetime:
    return Lifetime(
        hard_lifetime_ms=hard_lifetime_ms,
        requires_snapshot_rollover=rollover,
        has_idle_killer=idle_killer,
        supports_suspend_resume=suspend,
        resume_is_lock_free=lock_free,
    )


# Written in the upstream table order (reference §1.1); the enum order is SANDBOX_BACKENDS.
_DESCRIPTORS: Final[tuple[CapabilityDescriptor, ...]] = (
    CapabilityDescriptor(
        backend="modal",
        backend_id="modal",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop="vnc-ws"),
        lifetime=_lifetime(
            hard_lifetime_ms=24 * _HOUR_MS, rollover=True, idle_killer=True, suspend=True, lock_free=True
        ),
        snapshot=SnapshotSupport(kind="native-fs", has_tar_fallback=True),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=True,
        persistable=True,
        supports_run_as=True,
    ),
    CapabilityDescriptor(
        backend="daytona",
        backend_id="daytona",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop="vnc-ws"),
        lifetime=_lifetime(idle_killer=True, suspend=True),
        snapshot=SnapshotSupport(kind="native-snapshot-id", has_tar_fallback=True),
        port_exposure=PortExposure(kind="preview-url", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=True,
    ),
    CapabilityDescriptor(
        backend="runloop",
        backend_id="runloop",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=False, desktop="vnc-ws"),
        lifetime=_lifetime(idle_killer=True, suspend=True),
        snapshot=SnapshotSupport(kind="native-snapshot-id", has_tar_fallback=True),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="e2b",
        backend_id="e2b",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=False, desktop="vnc-ws"),
        lifetime=_lifetime(idle_killer=True, suspend=True),
        snapshot=SnapshotSupport(kind="native-snapshot-id", has_tar_fallback=True),
        port_exposure=PortExposure(kind="preview-url", supports_on_demand_ports=False),
        workspace_root="/home/user",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="blaxel",
        backend_id="blaxel",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=False, desktop="vnc-ws"),
        lifetime=_lifetime(idle_killer=True),
        snapshot=SnapshotSupport(kind="tar-only", has_tar_fallback=True),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=True),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="cloudflare",
        backend_id="cloudflare",
        tier="headless",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop=None),
        lifetime=_lifetime(idle_killer=True),
        snapshot=SnapshotSupport(kind="tar-only", has_tar_fallback=True),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=True,
    ),
    CapabilityDescriptor(
        backend="vercel",
        backend_id="vercel",
        tier="headless",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=False, desktop=None),
        lifetime=_lifetime(hard_lifetime_ms=5 * _HOUR_MS, rollover=True, idle_killer=True, suspend=True),
        snapshot=SnapshotSupport(kind="tar-only", has_tar_fallback=True),
        port_exposure=PortExposure(kind="preview-url", supports_on_demand_ports=False),
        workspace_root="/vercel/sandbox",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="docker",
        backend_id="docker",
        tier="dev",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop=None),
        lifetime=_lifetime(lock_free=True),
        snapshot=SnapshotSupport(kind="native-dir", has_tar_fallback=True),
        port_exposure=PortExposure(kind="local-port", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=True,
    ),
    CapabilityDescriptor(
        backend="local",
        backend_id="unix_local",
        tier="dev",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop=None),
        lifetime=_lifetime(lock_free=True),
        snapshot=SnapshotSupport(kind="native-dir", has_tar_fallback=True),
        port_exposure=PortExposure(kind="local-port", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=False,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="none",
        backend_id="none",
        tier="none",
        os=_LINUX_ONLY,
        capabilities=BackendCapabilities(
            file_system=FileSystemCapability(available=False, read_only=True),
            terminal=TerminalCapability(available=False, transport=None, pty=False),
            git=GitCapability(available=False),
            desktop_stream=_NO_DESKTOP,
            recording=RecordingCapability(available=False),
        ),
        lifetime=_lifetime(lock_free=True),
        snapshot=SnapshotSupport(kind="none", has_tar_fallback=False),
        port_exposure=PortExposure(kind="none", supports_on_demand_ports=False),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=False,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="selfhosted",
        backend_id="selfhosted",
        tier="desktop",
        os=OsSupport(supported=("linux", "macos", "windows"), default="linux"),
        # The desktop is proclaimed; whether the machine really has a display is decided live by
        # the selfhosted overlay, not by this static table.
        capabilities=_capabilities(terminal="relay-pty", pty=True, desktop="vnc-ws"),
        lifetime=_lifetime(lock_free=True),
        snapshot=SnapshotSupport(kind="none", has_tar_fallback=False),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=True),
        workspace_root="/",
        native_bucket_mount=False,
        persistable=False,
        supports_run_as=False,
    ),
    CapabilityDescriptor(
        backend="opensandbox",
        backend_id="opensandbox",
        tier="desktop",
        os=_LINUX_ONLY,
        capabilities=_capabilities(terminal="sse-events", pty=True, desktop="vnc-ws"),
        lifetime=_lifetime(lock_free=True),
        snapshot=SnapshotSupport(kind="tar-only", has_tar_fallback=True),
        port_exposure=PortExposure(kind="provider-tunnel", supports_on_demand_ports=True),
        workspace_root="/workspace",
        native_bucket_mount=False,
        persistable=True,
        supports_run_as=False,
    ),
)

#: Every backend's descriptor, keyed by backend name (read-only).
CAPABILITY_DESCRIPTORS: Final[Mapping[str, CapabilityDescriptor]] = MappingProxyType(
    {d.backend: d for d in _DESCRIPTORS}
)


# --- invariants ---------------------------------------------------------------------------------

_DescriptorCheck = tuple[str, Callable[[CapabilityDescriptor], bool]]

# Each rule is a (description, predicate that holds for a valid descriptor) pair. The first five are
# the upstream invariants; the last is ours (upstream gets it from its type system).
_DESCRIPTOR_RULES: Final[tuple[_DescriptorCheck, ...]] = (
    (
        "DesktopStream.available requires portExposure.kind != 'none'",
        lambda d: not d.capabilities.desktop_stream.available or d.port_exposure.kind != "none",
    ),
    (
        "DesktopStream.available requires a non-null DesktopStream.transport",
        lambda d: not d.capabilities.desktop_stream.available or d.capabilities.desktop_stream.transport is not None,
    ),
    (
        "Recording.available must equal DesktopStream.available",
        lambda d: d.capabilities.recording.available == d.capabilities.desktop_stream.available,
    ),
    (
        "persistable requires snapshot.kind != 'none'",
        lambda d: not d.persistable or d.snapshot.kind != "none",
    ),
    (
        "nativeBucketMount must not be set for the dev or none tier",
        lambda d: not (d.native_bucket_mount and d.tier in ("dev", "none")),
    ),
    (
        "os.default must be one of os.supported",
        lambda d: d.os.default in d.os.supported,
    ),
)


def descriptor_invariant_violations(key: str, descriptor: CapabilityDescriptor) -> list[str]:
    """Describe every invariant the descriptor registered under ``key`` breaks (empty when sound).

    Args:
        key: The registry key the descriptor is stored under; it must equal ``descriptor.backend``.
        descriptor: The descriptor to check.

    Returns:
        One human-readable line per broken rule, prefixed with the key.
    """
    problems: list[str] = []
    if descriptor.backend != key:
        problems.append(f"{key}: descriptor.backend is {descriptor.backend!r}, must equal its registry key")
    problems.extend(f"{key}: {text}" for text, holds in _DESCRIPTOR_RULES if not holds(descriptor))
    return problems


def assert_descriptor_registry_invariants(
    registry: Mapping[str, CapabilityDescriptor] = CAPABILITY_DESCRIPTORS,
) -> None:
    """Check the descriptor registry and raise if any descriptor contradicts itself.

    Beyond the per-descriptor rules (see :func:`descriptor_invariant_violations`) the registry must
    hold exactly the known backends and no two backends may share an SDK backend id, since the id is
    mapped back to a backend when a box is resumed.

    Raises:
        SandboxConfigError: listing every violation found.
    """
    problems: list[str] = []
    missing = [b for b in SANDBOX_BACKENDS if b not in registry]
    unknown = [k for k in registry if k not in SANDBOX_BACKENDS]
    if missing:
        problems.append(f"registry lacks descriptors for {', '.join(missing)}")
    if unknown:
        problems.append(f"registry has descriptors for unknown backends {', '.join(map(repr, unknown))}")
    owners: dict[str, str] = {}
    for key, descriptor in registry.items():
        problems.extend(descriptor_invariant_violations(key, descriptor))
        first = owners.setdefault(descriptor.backend_id, key)
        if first != key:
            problems.append(f"{key}: backendId {descriptor.backend_id!r} is already used by {first}")
    if problems:
        raise SandboxConfigError("capability descriptor registry is inconsistent: " + "; ".join(problems))


assert_descriptor_registry_invariants()


# --- lookups ------------------------------------------------------------------------------------


def is_sandbox_backend(name: object) -> TypeGuard[SandboxBackend]:
    """Whether ``name`` is exactly one of the backend names (case-sensitive, SDK ids excluded)."""
    return isinstance(name, str) and name in CAPABILITY_DESCRIPTORS


def select_backend(backend: str) -> CapabilityDescriptor:
    """Return the descriptor of a backend, refusing anything that is not a registry key.

    Only the backend names of :data:`SANDBOX_BACKENDS` are accepted: SDK ids (``unix_local``),
    other spellings (``Modal``) and names that happen to be attributes of JavaScript objects
    (``constructor``, ``__proto__``) are all unknown; there is no default descriptor.

    Raises:
        UnknownBackend: the name is not a known backend.
    """
    if not is_sandbox_backend(backend):
        raise UnknownBackend(str(backend), known=list(SANDBOX_BACKENDS))
    return CAPABILITY_DESCRIPTORS[backend]


get_descriptor = select_backend


def backend_supports_os(descriptor: CapabilityDescriptor, os: str) -> bool:
    """Whether the descriptor lists ``os`` (exact, case-sensitive) among its supported systems."""
    return os in descriptor.os.supported


def sdk_backend_id_for_sandbox_backend(backend: str) -> str:
    """The SDK client id of a backend (``local`` → ``unix_local``; the others map to themselves).

    Raises:
        UnknownBackend: the name is not a known backend.
    """
    return select_backend(backend).backend_id


def sandbox_backend_for_sdk_backend_id(backend_id: str) -> SandboxBackend | None:
    """Map an SDK backend id (or a backend name) back to the backend name, or ``None`` if unknown.

    A backend name is accepted as is first, then the descriptors are scanned for a matching SDK id.
    An unknown id yields ``None``; it never falls back to a default backend.
    """
    if is_sandbox_backend(backend_id):
        return backend_id
    for descriptor in CAPABILITY_DESCRIPTORS.values():
        if descriptor.backend_id == backend_id:
            return descriptor.backend
    return None


def desktop_capable_backend(backend: str) -> bool:
    """Whether a backend can serve the desktop plane at all, by its static descriptor.

    Accepts either the backend name (``local``) or its SDK id (``unix_local``). Unknown names are
    simply not desktop capable. Runtime policy (desktop toggle, stream-token secret, liveness) is
    layered on by capability negotiation.
    """
    name = sandbox_backend_for_sdk_backend_id(backend)
    return name is not None and CAPABILITY_DESCRIPTORS[name].capabilities.desktop_stream.available
