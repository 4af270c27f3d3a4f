"""The runtime's own metrics, served by the worker's Prometheus endpoint next to the Temporal SDK's.

``SANDBOX_METRICS_ADDRESS=host:port`` turns the endpoint on (``GET /metrics``): the worker's
Temporal runtime serves it (:func:`worker.metrics_runtime`), so the SDK's metrics
(``temporal_workflow_task_*``, ``temporal_activity_*``, poller and slot gauges) and ours share one
scrape target. Ours are made through the same runtime's meter:

| metric                               | kind      | labels                          |
|--------------------------------------|-----------|---------------------------------|
| ``sandbox_provision_duration_seconds`` | histogram | backend, outcome              |
| ``sandbox_restore_duration_seconds``   | histogram | backend, outcome              |
| ``sandbox_capture_duration_seconds``   | histogram | backend, outcome              |
| ``sandbox_exec_duration_seconds``      | histogram | backend, outcome              |
| ``sandbox_archive_size_bytes``         | histogram | backend                       |
| ``sandbox_operation_failures_total``   | counter   | operation, backend, error_type |
| ``sandbox_leases``                     | gauge     | liveness, backend             |
| ``sandbox_boxes``                      | gauge     | backend                       |
| ``sandbox_lease_holders``              | gauge     | kind                          |
| ``sandbox_recordings``                 | gauge     | state                         |
| ``sandbox_agents``                     | gauge     | liveness                      |

``outcome`` is ``ok`` or the error's type (``BoxNotFound``, ``ExecTimeout``, ...): a dashboard
splits latency by it without a second metric. The gauges come from a census of the store
(:mod:`store.census`) every ``SANDBOX_METRICS_CENSUS_SECONDS``. No label ever holds a command, a
path, an id or a secret: label values come from closed sets, so the series count stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Final

from temporalio.common import MetricMeter

from sandbox.errors import SandboxError
from store.census import Census, Labels, take_census
from store.database import Database

__all__ = ["ARCHIVE_SIZE_BUCKETS", "CENSUS_GAUGES", "METRIC_NAMES", "CensusGauges", "SandboxMetrics"]

log = logging.getLogger(__name__)

ARCHIVE_SIZE_BUCKETS: Final = tuple(float(1 << n) for n in range(10, 36, 2))
"""Bucket bounds of ``sandbox_archive_size_bytes``: 1 KiB to 32 GiB by powers of 4."""

CENSUS_GAUGES: Final = {
    "sandbox_leases": "Leases by liveness and backend, as the projection holds them.",
    "sandbox_boxes": "Leases that have a box, by backend.",
    "sandbox_lease_holders": "Holders of all leases, by kind.",
    "sandbox_recordings": "Desktop recordings by state.",
    "sandbox_agents": "Enrolled self-hosted machines (not revoked) by liveness.",
}

TIMED_OPERATIONS: Final = ("provision", "restore", "capture", "exec")

METRIC_NAMES: Final = frozenset(
    {f"sandbox_{op}_duration_seconds" for op in TIMED_OPERATIONS}
    | {"sandbox_archive_size_bytes", "sandbox_operation_failures_total"}
    | CENSUS_GAUGES.keys()
)
"""Every metric the runtime defines (a histogram's ``_bucket``/``_sum``/``_count`` series derive from it)."""


def _outcome(err: BaseException | None) -> str:
    if err is None:
        return "ok"
    if isinstance(err, SandboxError):
        return err.error_type
    return type(err).__name__


class SandboxMetrics:
    """The histograms and counters activities record into (a no-op meter records nothing)."""

    def __init__(self, meter: MetricMeter | None = None) -> None:
        self._meter = meter or MetricMeter.noop
        m = self._meter
        self._durations = {
            op: m.create_histogram_timedelta(f"sandbox_{op}_duration_seconds", f"Time to {op}, by outcome.", "s")
            for op in TIMED_OPERATIONS
        }
        self._archive = m.create_histogram(
            "sandbox_archive_size_bytes", "Size of each captured workspace archive.", "bytes"
        )
        self._failures = m.create_counter(
            "sandbox_operation_failures_total", "Box operations that failed, by the error's type."
        )

    @contextlib.contextmanager
    def timed(self, operation: str, backend: str) -> Iterator[None]:
        """Record how long the block took and how it ended (and count it as a failure if it raised)."""
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as err:
            failure = err
            raise
        finally:
            outcome = _outcome(failure)
            elapsed = timedelta(seconds=time.monotonic() - started)
            self._durations[operation].record(elapsed, {"backend": backend, "outcome": outcome})
            # A cancelled activity (worker shutdown, lease drained) is not a failure of the box.
            if failure is not None and not isinstance(failure, asyncio.CancelledError):
                self._failures.add(1, {"operation": operation, "backend": backend, "error_type": outcome})

    def archive_size(self, backend: str, size_bytes: int) -> None:
        """Record one captured archive's size."""
        self._archive.record(max(0, size_bytes), {"backend": backend})


class CensusGauges:
    """Gauges set from a census of the store; a label set that disappears is set back to 0."""

    def __init__(self, meter: MetricMeter, db: Database) -> None:
        self._db = db
        self._gauges = {name: meter.create_gauge(name, description) for name, description in CENSUS_GAUGES.items()}
        self._seen: dict[str, set[Labels]] = {name: set() for name in CENSUS_GAUGES}

    async def refresh(self) -> Census:
        """Take one census and publish it."""
        census = await take_census(self._db)
        for name, gauge in self._gauges.items():
            current = census.counts.get(name, {})
            for labels in self._seen[name] - current.keys():
                gauge.set(0, dict(labels))
            for labels, n in current.items():
                gauge.set(n, dict(labels))
            self._seen[name] |= current.keys()
        return census

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh every ``interval`` seconds until ``stop`` is set; a failed census is logged and retried."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # the store may be briefly unreachable; metrics must not stop the worker
                log.warning("metrics census failed; retrying in %.0fs", interval, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
