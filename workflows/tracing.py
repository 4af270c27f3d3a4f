"""Traces that follow each request: the lease handles a caller's update inside the caller's trace.

Temporal's :class:`~temporalio.contrib.opentelemetry.TracingInterceptor` parents everything a
workflow does to the span that *started* the workflow, and only links an update's handling to its
caller. A lease lives for days and serves many callers, so every ``exec`` and ``drain`` ended up in
the trace of the lease's first ``acquire``. :class:`LeaseTracingInterceptor` keeps the SDK's spans
and changes one thing: an update that arrives with a caller's trace context is handled as a child
of that context, so its ``HandleUpdate`` span, the activities it schedules and the box operation
inside them land in the caller's trace::

    client  StartWorkflowUpdate:exec            (the caller's trace)
    lease     HandleUpdate:exec                 sandbox.lease_id, sandbox.epoch, sandbox.holder_kind
    lease       StartActivity:exec_in_box
    worker        RunActivity:exec_in_box
    worker          sandbox.box.exec            sandbox.backend, sandbox.argv0, sandbox.exit_code

The lease's own background work (warming, periodic captures, teardown) stays in the trace that
started the lease workflow. No span carries an env value, a token or command output: the request
fields copied onto spans are ids, epochs and kinds (:data:`REQUEST_ATTRIBUTES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import opentelemetry.trace
import temporalio.api.common.v1
import temporalio.worker
import temporalio.workflow
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor
from temporalio.contrib.opentelemetry._context import attached_context

__all__ = ["REQUEST_ATTRIBUTES", "LeaseTracingInterceptor", "LeaseTracingWorkflowInboundInterceptor"]

REQUEST_ATTRIBUTES: Final = {
    "epoch": "sandbox.epoch",
    "expected_epoch": "sandbox.epoch",
    "kind": "sandbox.holder_kind",
}
"""Update-request fields copied onto the ``HandleUpdate`` span, and the attribute each becomes."""


class _Headers:
    """Somewhere for the SDK's span helper to write the new span's context (as it does to a command)."""

    def __init__(self) -> None:
        self.headers: Mapping[str, temporalio.api.common.v1.Payload] = {}


def _request_attributes(args: Any) -> dict[str, str | int]:
    request = args[0] if args else None
    out: dict[str, str | int] = {"sandbox.lease_id": temporalio.workflow.info().workflow_id}
    for field, attribute in REQUEST_ATTRIBUTES.items():
        value = getattr(request, field, None)
        if isinstance(value, str | int) and not isinstance(value, bool):
            out[attribute] = value
    return out


class LeaseTracingWorkflowInboundInterceptor(TracingWorkflowInboundInterceptor):
    """The SDK's workflow tracing, with each update handled in its caller's trace."""

    def _carrier(self, headers: Mapping[str, temporalio.api.common.v1.Payload]) -> dict[str, str] | None:
        header = headers.get(self.header_key)
        if not header:
            return None
        carrier: dict[str, str] = self.payload_converter.from_payloads([header])[0]
        return carrier

    async def handle_update_handler(self, input: temporalio.worker.HandleUpdateInput) -> Any:
        """Run the update as a child of the caller's span (the SDK's default when there is none)."""
        caller = self._carrier(input.headers)
        if caller is None:
            return await super().handle_update_handler(input)
        context = self._set_on_context(self.text_map_propagator.extract(caller))
        with attached_context(context):
            made = _Headers()
            # Not replay-safe to keep a span open in a workflow: the SDK ends it at once, and it is
            # skipped on replay (then the activities hang off the caller's span directly).
            self._completed_span(
                f"HandleUpdate:{input.update}",
                add_to_outbound=made,
                kind=opentelemetry.trace.SpanKind.SERVER,
                additional_attributes=_request_attributes(input.args),
            )
            handled = self._carrier(made.headers)
            inner = self._set_on_context(self.text_map_propagator.extract(handled)) if handled else None
            with attached_context(inner):
                return await self.next.handle_update_handler(input)


class LeaseTracingInterceptor(TracingInterceptor):
    """:class:`TracingInterceptor` whose workflow side is :class:`LeaseTracingWorkflowInboundInterceptor`."""

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[TracingWorkflowInboundInterceptor]:
        """The SDK's externs, with the lease's inbound interceptor."""
        super().workflow_interceptor_class(input)
        return LeaseTracingWorkflowInboundInterceptor
