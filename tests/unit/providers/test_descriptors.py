"""The descriptor registry against the upstream conformance vectors (``descriptors.json``).

Every vector is checked. The ``JS-PROTOTYPE-QUIRK`` vectors record upstream answers that exist only
because the registry is a plain JavaScript object (``constructor``/``__proto__``/``toString`` are
"found" on its prototype); for those we assert the strict answer instead and say why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.control_protocol import UPSTREAM_ERROR_CODES
from sandbox.descriptors import (
    BROWSER_CONTROL_PORT,
    CAPABILITY_DESCRIPTORS,
    DESKTOP_STREAM_PORT,
    NEVER_SENT_DETAIL_KEY,
    SANDBOX_BACKENDS,
    SANDBOX_OS,
    SELFHOSTED_RECONNECT_WINDOW_MS,
    STREAM_TOKEN_DEFAULT_TTL_SECONDS,
    TERMINAL_STREAM_PORT,
    CapabilityDescriptor,
    CapabilityUnavailableReason,
    assert_descriptor_registry_invariants,
    backend_supports_os,
    desktop_capable_backend,
    get_descriptor,
    sandbox_backend_for_sdk_backend_id,
    sdk_backend_id_for_sandbox_backend,
    select_backend,
)
from sandbox.errors import InvalidRequest, SandboxConfigError, UnknownBackend
from tests.upstream_vectors import VECTORS_ENV, vectors_dir

# --- loading the vectors ------------------------------------------------------------------------

QUIRK_PREFIX = "JS-PROTOTYPE-QUIRK"


def load_vectors(name: str) -> tuple[list[dict[str, Any]], str | None]:
    """The vectors of one file, or an explanation of why they could not be read."""
    path = vectors_dir() / name
    if not path.is_file():
        return [], (
            f"upstream conformance vectors missing: {path} does not exist. These tests must not be skipped; "
            f"point {VECTORS_ENV} at the folder holding {name} (shared/reference/upstream-vectors)."
        )
    with path.open(encoding="utf-8") as fh:
        return json.load(fh), None


VECTORS, VECTORS_MISSING = load_vectors("descriptors.json")


def vector_params() -> list[Any]:
    if VECTORS_MISSING:
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(v, id=v["note"]) for v in VECTORS]


def the_vector(fn: str) -> dict[str, Any]:
    if VECTORS_MISSING:
        pytest.fail(VECTORS_MISSING)
    matches = [v for v in VECTORS if v["fn"] == fn]
    assert len(matches) == 1, f"expected one {fn} vector, found {len(matches)}"
    return matches[0]


# --- one checker per upstream function ----------------------------------------------------------


def check_capability_descriptors(vector: dict[str, Any]) -> None:
    got = {key: d.model_dump(by_alias=True, exclude_none=True) for key, d in CAPABILITY_DESCRIPTORS.items()}
    assert got == vector["expect"]["ok"]
    # The same document without exclude_none: absent optionals stay absent, null transports stay null.
    assert {key: d.model_dump(by_alias=True) for key, d in CAPABILITY_DESCRIPTORS.items()} == got


def check_constants(vector: dict[str, Any]) -> None:
    ours = {
        "DESKTOP_STREAM_PORT": DESKTOP_STREAM_PORT,
        "STREAM_TOKEN_DEFAULT_TTL_SECONDS": STREAM_TOKEN_DEFAULT_TTL_SECONDS,
        "SELFHOSTED_RECONNECT_WINDOW_MS": SELFHOSTED_RECONNECT_WINDOW_MS,
        "NEVER_SENT_DETAIL_KEY": NEVER_SENT_DETAIL_KEY,
        "SandboxBackend": list(SANDBOX_BACKENDS),
        "SandboxOs": list(SANDBOX_OS),
        "CapabilityUnavailableReason": [r.value for r in CapabilityUnavailableReason],
        "ErrorCode": {f"ERROR_CODE_{code.value}": code.number for code in UPSTREAM_ERROR_CODES},
    }
    assert ours == vector["expect"]["ok"]


def check_invariants(vector: dict[str, Any]) -> None:
    assert vector["expect"] == {"ok": {"$undefined": True}}
    assert_descriptor_registry_invariants()  # raises SandboxConfigError on a violation


def check_select_backend(vector: dict[str, Any]) -> None:
    (name,) = vector["args"]
    if vector["note"].startswith(QUIRK_PREFIX):
        # Upstream returns an inherited property of its lookup object (Object, {}, a function);
        # there is no such backend, so we refuse it like any other unknown name.
        with pytest.raises(UnknownBackend) as err:
            select_backend(name)
        assert err.value.backend == name
        return
    if "error" in vector["expect"]:
        assert vector["expect"]["error"]["message"] == f'Unknown sandbox backend "{name}"'
        with pytest.raises(UnknownBackend) as err:
            select_backend(name)
        assert err.value.backend == name
        return
    assert select_backend(name).model_dump(by_alias=True, exclude_none=True) == vector["expect"]["ok"]


def check_desktop_capable_backend(vector: dict[str, Any]) -> None:
    (name,) = vector["args"]
    if vector["note"].startswith(QUIRK_PREFIX):
        # Upstream throws a TypeError while reading a prototype property as a descriptor; the name
        # is not a backend, so the strict answer is the one given for every unknown name: False.
        assert vector["expect"]["error"]["class"] == "TypeError"
        assert desktop_capable_backend(name) is False
        return
    assert desktop_capable_backend(name) is vector["expect"]["ok"]


def check_sandbox_backend_for_sdk_backend_id(vector: dict[str, Any]) -> None:
    (backend_id,) = vector["args"]
    if vector["note"].startswith(QUIRK_PREFIX):
        # Upstream happens to answer null here too; we assert it stays unknown, not a default.
        assert sandbox_backend_for_sdk_backend_id(backend_id) is None
        return
    assert sandbox_backend_for_sdk_backend_id(backend_id) == vector["expect"]["ok"]


def check_sdk_backend_id_for_sandbox_backend(vector: dict[str, Any]) -> None:
    (name,) = vector["args"]
    assert sdk_backend_id_for_sandbox_backend(name) == vector["expect"]["ok"]


def check_backend_supports_os(vector: dict[str, Any]) -> None:
    raw_descriptor, os_name = vector["args"]
    # The descriptor arrives as upstream JSON: parsing it is part of the check.
    descriptor = CapabilityDescriptor.model_validate(raw_descriptor)
    assert descriptor == CAPABILITY_DESCRIPTORS[descriptor.backend]
    assert backend_supports_os(descriptor, os_name) is vector["expect"]["ok"]


CHECKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "CAPABILITY_DESCRIPTORS": check_capability_descriptors,
    "CONSTANTS": check_constants,
    "assertDescriptorRegistryInvariants": check_invariants,
    "selectBackend": check_select_backend,
    "desktopCapableBackend": check_desktop_capable_backend,
    "sandboxBackendForSdkBackendId": check_sandbox_backend_for_sdk_backend_id,
    "sdkBackendIdForSandboxBackend": check_sdk_backend_id_for_sandbox_backend,
    "backendSupportsOs": check_backend_supports_os,
}


@pytest.mark.parametrize("vector", vector_params())
def test_upstream_vector(vector: dict[str, Any] | None) -> None:
    if vector is None:
        pytest.fail(VECTORS_MISSING or "no vectors")
    checker = CHECKERS.get(vector["fn"])
    assert checker is not None, f"no checker for upstream function {vector['fn']!r}"
    checker(vector)


def test_vector_file_is_complete() -> None:
    if VECTORS_MISSING:
        pytest.fail(VECTORS_MISSING)
    assert {v["fn"] for v in VECTORS} == set(CHECKERS)
    assert len(VECTORS) == 135
    assert sum(v["note"].startswith(QUIRK_PREFIX) for v in VECTORS) == 12


# --- the registry beyond the vectors ------------------------------------------------------------


def test_port_constants() -> None:
    assert (DESKTOP_STREAM_PORT, TERMINAL_STREAM_PORT, BROWSER_CONTROL_PORT) == (6080, 7681, 7682)


def test_registry_holds_every_backend_once() -> None:
    assert sorted(CAPABILITY_DESCRIPTORS) == sorted(SANDBOX_BACKENDS)
    assert len(SANDBOX_BACKENDS) == 12
    for key, descriptor in CAPABILITY_DESCRIPTORS.items():
        assert descriptor.backend == key
        assert get_descriptor(key) is descriptor


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        CAPABILITY_DESCRIPTORS["modal"] = CAPABILITY_DESCRIPTORS["docker"]  # type: ignore[index]
    with pytest.raises(ValueError, match="frozen"):
        CAPABILITY_DESCRIPTORS["modal"].persistable = False  # type: ignore[misc]


@pytest.mark.parametrize("backend", SANDBOX_BACKENDS)
def test_descriptor_round_trips_through_upstream_json(backend: str) -> None:
    descriptor = CAPABILITY_DESCRIPTORS[backend]
    assert CapabilityDescriptor.model_validate_json(descriptor.model_dump_json()) == descriptor
    # snake_case input is accepted too (populate_by_name), for Python callers.
    assert CapabilityDescriptor.model_validate(descriptor.model_dump(by_alias=False)) == descriptor


def test_descriptor_rejects_unknown_fields() -> None:
    raw = CAPABILITY_DESCRIPTORS["modal"].model_dump(by_alias=True)
    raw["gpu"] = True
    with pytest.raises(ValueError, match="gpu"):
        CapabilityDescriptor.model_validate(raw)


def test_local_is_the_only_backend_whose_sdk_id_differs() -> None:
    differing = {b: sdk_backend_id_for_sandbox_backend(b) for b in SANDBOX_BACKENDS}
    differing = {b: i for b, i in differing.items() if b != i}
    assert differing == {"local": "unix_local"}
    assert desktop_capable_backend("unix_local") is desktop_capable_backend("local") is False


def test_unknown_backend_is_an_invalid_request_naming_the_known_ones() -> None:
    with pytest.raises(InvalidRequest) as err:
        select_backend("unix_local")
    assert isinstance(err.value, UnknownBackend)
    assert "'unix_local'" in err.value.message
    assert "modal" in err.value.message and "opensandbox" in err.value.message
    with pytest.raises(UnknownBackend):
        sdk_backend_id_for_sandbox_backend("unix_local")


@given(st.one_of(st.text(max_size=20), st.sampled_from([*SANDBOX_BACKENDS, "unix_local", "__proto__", "Modal"])))
def test_lookups_are_total_and_consistent(name: str) -> None:
    backend = sandbox_backend_for_sdk_backend_id(name)
    if name in SANDBOX_BACKENDS:
        assert select_backend(name).backend == name
        assert backend == name
    else:
        with pytest.raises(UnknownBackend):
            select_backend(name)
    if backend is None:
        assert desktop_capable_backend(name) is False
    else:
        expected = CAPABILITY_DESCRIPTORS[backend].capabilities.desktop_stream.available
        assert desktop_capable_backend(name) is expected
        assert name in (backend, sdk_backend_id_for_sandbox_backend(backend))


# --- the invariant checker catches a broken descriptor ------------------------------------------


def _with_desktop(d: CapabilityDescriptor, **update: Any) -> CapabilityDescriptor:
    caps = d.capabilities
    return d.model_copy(
        update={
            "capabilities": caps.model_copy(update={"desktop_stream": caps.desktop_stream.model_copy(update=update)})
        }
    )


def _with_recording(d: CapabilityDescriptor, available: bool) -> CapabilityDescriptor:
    caps = d.capabilities
    recording = caps.recording.model_copy(update={"available": available})
    return d.model_copy(update={"capabilities": caps.model_copy(update={"recording": recording})})


BREAKAGES: list[Any] = [
    pytest.param(
        "modal",
        lambda d: d.model_copy(update={"port_exposure": d.port_exposure.model_copy(update={"kind": "none"})}),
        "DesktopStream.available requires portExposure.kind != 'none'",
        id="desktop-without-port-exposure",
    ),
    pytest.param(
        "e2b",
        lambda d: _with_desktop(d, transport=None),
        "DesktopStream.available requires a non-null DesktopStream.transport",
        id="desktop-without-transport",
    ),
    pytest.param(
        "docker",
        lambda d: _with_recording(d, True),
        "Recording.available must equal DesktopStream.available",
        id="recording-without-desktop",
    ),
    pytest.param(
        "blaxel",
        lambda d: _with_recording(d, False),
        "Recording.available must equal DesktopStream.available",
        id="desktop-without-recording",
    ),
    pytest.param(
        "selfhosted",
        lambda d: d.model_copy(update={"persistable": True}),
        "persistable requires snapshot.kind != 'none'",
        id="persistable-without-snapshot",
    ),
    pytest.param(
        "local",
        lambda d: d.model_copy(update={"native_bucket_mount": True}),
        "nativeBucketMount must not be set for the dev or none tier",
        id="bucket-mount-on-dev-tier",
    ),
    pytest.param(
        "none",
        lambda d: d.model_copy(update={"native_bucket_mount": True}),
        "nativeBucketMount must not be set for the dev or none tier",
        id="bucket-mount-on-none-tier",
    ),
    pytest.param(
        "vercel",
        lambda d: d.model_copy(update={"backend": "cloudflare"}),
        "vercel: descriptor.backend is 'cloudflare', must equal its registry key",
        id="backend-differs-from-key",
    ),
    pytest.param(
        "docker",
        lambda d: d.model_copy(update={"backend_id": "unix_local"}),
        "local: backendId 'unix_local' is already used by docker",
        id="duplicate-sdk-id",
    ),
]


@pytest.mark.parametrize(("backend", "breakage", "message"), BREAKAGES)
def test_invariant_checker_rejects_a_broken_descriptor(
    backend: str, breakage: Callable[[CapabilityDescriptor], CapabilityDescriptor], message: str
) -> None:
    original = CAPABILITY_DESCRIPTORS[backend]
    registry = dict(CAPABILITY_DESCRIPTORS)
    registry[backend] = breakage(original)
    assert registry[backend] != original
    with pytest.raises(SandboxConfigError) as err:
        assert_descriptor_registry_invariants(registry)
    assert message in err.value.message
    # The shared registry is untouched and still sound.
    assert CAPABILITY_DESCRIPTORS[backend] is original
    assert_descriptor_registry_invariants()


def test_invariant_checker_rejects_missing_and_unknown_backends() -> None:
    registry = dict(CAPABILITY_DESCRIPTORS)
    del registry["daytona"]
    registry["gcp"] = CAPABILITY_DESCRIPTORS["modal"]
    with pytest.raises(SandboxConfigError) as err:
        assert_descriptor_registry_invariants(registry)
    assert "lacks descriptors for daytona" in err.value.message
    assert "unknown backends 'gcp'" in err.value.message
