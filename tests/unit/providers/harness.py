"""What a backend's harness gives the provider conformance suite."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sandbox.box import Provider
from tests.fakes.faults import FaultPlan


@dataclass
class ProviderHarness:
    """A provider wired to its fake (or to the real thing for local/selfhosted).

    Attributes:
        provider: The provider under test, built the way production builds it except for its endpoint.
        faults: The fake service's fault plan, or None when the backend has no fake.
        transient_error: Builds the SDK-level error the fake raises for a transient failure
            (a 5xx or gRPC UNAVAILABLE), to inject through ``faults``.
        workspace_root: Where relative paths land inside the box.
        unknown_id: A well-formed instance id that no box has (the suite swaps it into a live
            envelope's JSON in place of the real id to ask for a box that never existed).
        sdk_exec: Runs ``true`` in the box with the given instance id by calling the SDK directly,
            exactly the call the provider's ``exec`` wraps (``bench/bench_providers.py`` times
            our layer against it).
        ports_reachable: Whether a box's exposed port resolves to an endpoint (not for isolated local boxes).
        sdk_create: Creates a box by calling the SDK directly as the provider's ``create`` would
            (same image/options, no lookup for an existing box) and returns its instance id.
    """

    provider: Provider
    faults: FaultPlan | None = None
    transient_error: Callable[[], BaseException] | None = None
    workspace_root: str = "/workspace"
    unknown_id: str | None = None
    sdk_exec: Callable[[str], Awaitable[object]] | None = None
    sdk_create: Callable[[], Awaitable[str]] | None = None
    ports_reachable: bool = True
    """False for boxes with a network namespace of their own (local): their ports are never reachable."""
