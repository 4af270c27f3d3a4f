"""Spans for the box operations inside activities, as children of the activity's ``RunActivity`` span.

Attributes name what an operator filters on and nothing secret: ``sandbox.lease_id`` (the lease
workflow's id), ``sandbox.epoch``, ``sandbox.backend``, and for exec ``sandbox.argv0`` and
``sandbox.exit_code``; never an env value, a token, the rest of the argv or any output. The
tree these spans hang in is drawn in :mod:`workflows.tracing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import opentelemetry.trace
from temporalio import activity

__all__ = ["box_operation_span"]

_tracer = opentelemetry.trace.get_tracer("sandbox.activities")


@contextlib.contextmanager
def box_operation_span(
    operation: str, backend: str, *, epoch: int | None = None, **attributes: str | int
) -> Iterator[opentelemetry.trace.Span]:
    """A ``sandbox.box.<operation>`` span around the block; an exception marks it failed with its type."""
    attrs: dict[str, str | int] = {"sandbox.backend": backend, **attributes}
    if activity.in_activity():
        attrs["sandbox.lease_id"] = activity.info().workflow_id or ""
    if epoch is not None:
        attrs["sandbox.epoch"] = epoch
    with _tracer.start_as_current_span(f"sandbox.box.{operation}", attributes=attrs) as span:
        yield span
