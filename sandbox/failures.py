"""Typed errors across the Temporal boundary: the one encoder and the one decoder.

Every :class:`~sandbox.errors.SandboxError` that leaves an activity or a workflow, and every one
a client receives, goes through this module:

| ``SandboxError`` part          | ``ApplicationError`` part                       |
|--------------------------------|-------------------------------------------------|
| ``error_type`` (the class)     | ``type``                                        |
| ``message``                    | ``message`` (encrypted with the failure's attributes) |
| ``retryable`` (per instance)   | ``non_retryable`` (its negation)                |
| ``attributes()`` (``stage``, ``path``, ``code``, ...) | ``details``: exactly one JSON dict |

:func:`to_application_error` encodes (activity boundary, workflow failures); :func:`from_application_error`
decodes (client side); :func:`application_error_in` finds the ``ApplicationError`` behind a
Temporal client or activity error. An ``ApplicationError`` without details (from a history
recorded before details were sent, or from a foreign caller) decodes to its class with the class
defaults, retryability included; an unknown ``type`` decodes to a plain ``SandboxError``.

An exception must never be (transitively) its own cause: Temporal's failure converter follows
``__cause__`` (else ``__context__``) and recurses on a cycle until ``RecursionError``.
:func:`cut_cause_cycles` breaks such a cycle at the boundary.

An activity failure must also stay small: the server keeps at most 4 KiB of an activity's last
failure and replaces a bigger one with "Failure exceeds size limit.", which (with the payload
codec on) loses the message the user needs. :func:`compact_cause` keeps a cause chain to a few
links of a few frames each: the frames where it was raised.

Every failure the worker (or a client) builds is bounded as well, whatever raised it:
:class:`BoundedFailureConverter` cuts each message and stack trace to :data:`FAILURE_TEXT_KEPT`
characters and a chain to :data:`FAILURE_LINKS_KEPT` links. A failure is sent inside the message
that answers a workflow task (an update's rejection, a workflow's failure), and one over the
server's payload limit (2 MiB) fails that task again and again: pydantic alone makes a 7 MB
message out of a 40 KB update input that lists 20,000 bad elements.

On the calling side, :func:`call_workflow` runs one Temporal client call and raises what
:func:`translate` makes of a failure (the table is in :mod:`client.lease_client`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Final, TypeVar

from temporalio.api.failure.v1 import Failure
from temporalio.client import RPCError, RPCTimeoutOrCancelledError
from temporalio.converter import DefaultFailureConverter, PayloadConverter
from temporalio.exceptions import ApplicationError, TemporalError
from temporalio.service import RPCStatusCode

from sandbox.errors import InvalidRequest, LeaseNotFound, OutcomeUnknown, SandboxError, error_from_type

__all__ = [
    "BoundedFailureConverter",
    "EncryptedBoundedFailureConverter",
    "application_error_in",
    "call_workflow",
    "compact_cause",
    "cut_cause_cycles",
    "from_application_error",
    "to_application_error",
    "translate",
]

T = TypeVar("T")


def to_application_error(err: SandboxError) -> ApplicationError:
    """The ``ApplicationError`` that carries ``err`` (type, message, retryable, attributes) across Temporal."""
    return ApplicationError(err.message, err.attributes(), type=err.error_type, non_retryable=not err.retryable)


def from_application_error(app: ApplicationError) -> SandboxError:
    """The typed error an ``ApplicationError`` carries (the inverse of :func:`to_application_error`).

    Without a details dict the error keeps its class defaults, ``retryable`` included (that is how
    errors decoded before details were sent).
    """
    details = app.details[0] if app.details and isinstance(app.details[0], Mapping) else None
    if details is None:
        return error_from_type(app.type, app.message)
    return error_from_type(app.type, app.message, details, retryable=not app.non_retryable)


def application_error_in(err: BaseException | None) -> ApplicationError | None:
    """The first ``ApplicationError`` in ``err``'s cause chain (``err`` itself included), or None.

    A failed update's or workflow's error has it as its cause; an ``ActivityError`` one level
    further down. The walk stops at a cycle.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ApplicationError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def cut_cause_cycles(err: BaseException) -> BaseException:
    """Break every cycle in the chain Temporal follows from ``err`` (``__cause__``, else ``__context__``).

    The link that closes a cycle is dropped, so the failure keeps every distinct exception once.
    Returns ``err``, for ``raise ... from cut_cause_cycles(err)``.
    """
    seen = {id(err)}
    current = err
    while True:
        following_cause = current.__cause__ is not None
        nxt = current.__cause__ if following_cause else (None if current.__suppress_context__ else current.__context__)
        if nxt is None:
            return err
        if id(nxt) in seen:
            if following_cause:
                current.__cause__ = None
            current.__context__ = None
            return err
        seen.add(id(nxt))
        current = nxt


CAUSE_LINKS_KEPT: Final = 3
FRAMES_KEPT: Final = 2


def compact_cause(err: BaseException) -> BaseException:
    """``err`` made fit to be an activity failure's cause: no cycle, at most :data:`CAUSE_LINKS_KEPT`
    links, and each link's traceback cut to its innermost :data:`FRAMES_KEPT` frames.

    Returns ``err``, for ``raise to_application_error(...) from compact_cause(err)``.
    """
    cut_cause_cycles(err)
    current: BaseException | None = err
    for _ in range(CAUSE_LINKS_KEPT):
        if current is None:
            return err
        current.__traceback__ = _innermost_frames(current.__traceback__, FRAMES_KEPT)
        last = current
        current = (
            current.__cause__
            if current.__cause__ is not None
            else (None if current.__suppress_context__ else current.__context__)
        )
    last.__cause__ = None
    last.__suppress_context__ = True
    return err


def _innermost_frames(tb: TracebackType | None, keep: int) -> TracebackType | None:
    frames: list[TracebackType] = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames[-keep] if len(frames) > keep else (frames[0] if frames else None)


FAILURE_TEXT_KEPT: Final = 4 * 1024
"""The most characters of one failure's message, and of its stack trace, that leave the process.

With :data:`FAILURE_LINKS_KEPT` links, a failure is at most 8 x 2 x 4 Ki characters, under 0.4 MiB
even when every one is a control character that JSON writes as six (``\\u0000``)."""
FAILURE_LINKS_KEPT: Final = 8
"""The most links of a failure's cause chain that leave the process."""


def _bounded_message(text: str) -> str:
    if len(text) <= FAILURE_TEXT_KEPT:
        return text
    return f"{text[:FAILURE_TEXT_KEPT]}... ({len(text) - FAILURE_TEXT_KEPT} more characters cut)"


def _bounded_stack_trace(text: str) -> str:
    # The innermost frames, where it was raised, come last: they are the ones kept.
    if len(text) <= FAILURE_TEXT_KEPT:
        return text
    return f"({len(text) - FAILURE_TEXT_KEPT} characters cut) ...{text[-FAILURE_TEXT_KEPT:]}"


class BoundedFailureConverter(DefaultFailureConverter):
    """Temporal's default failure converter with every failure it builds bounded in size.

    Each link's message keeps its first :data:`FAILURE_TEXT_KEPT` characters and its stack trace its
    last (each says how much was cut), and the chain its first :data:`FAILURE_LINKS_KEPT` links, so a
    failure stays far below the server's 2 MiB payload limit whatever an exception says. Decoding is
    Temporal's own.
    """

    def __init__(self, *, encode_common_attributes: bool = False) -> None:
        """``encode_common_attributes``: move each link's message and stack trace into its encoded
        attributes (which the payload codec encrypts), after they are bounded."""
        # The base class never encodes here: this class does, once each link is bounded.
        super().__init__(encode_common_attributes=False)
        self._encode_bounded = encode_common_attributes

    def to_failure(self, exception: BaseException, payload_converter: PayloadConverter, failure: Failure) -> None:
        """See :meth:`temporalio.converter.FailureConverter.to_failure`; the base class builds each
        cause through this method, so every link is bounded (and encoded) before its parent."""
        super().to_failure(exception, payload_converter, failure)
        link = failure
        for _ in range(FAILURE_LINKS_KEPT - 1):
            if not link.HasField("cause"):
                break
            link = link.cause
        link.ClearField("cause")
        failure.message = _bounded_message(failure.message)
        failure.stack_trace = _bounded_stack_trace(failure.stack_trace)
        if self._encode_bounded:
            failure.encoded_attributes.CopyFrom(
                payload_converter.to_payloads([{"message": failure.message, "stack_trace": failure.stack_trace}])[0]
            )
            failure.message = "Encoded failure"
            failure.stack_trace = ""


class EncryptedBoundedFailureConverter(BoundedFailureConverter):
    """:class:`BoundedFailureConverter` that moves messages and stack traces into the encoded
    attributes, as ``DefaultFailureConverterWithEncodedAttributes`` does, so the codec encrypts them."""

    def __init__(self) -> None:
        """A bounded failure converter with encoded attributes."""
        super().__init__(encode_common_attributes=True)


_OUTCOME_UNKNOWN = "the lease did not answer in time (is a worker running?); the call may or may not have taken effect"


def translate(err: BaseException) -> SandboxError | asyncio.CancelledError:
    """Map a Temporal client exception to the runtime's typed error (the table in :mod:`client.lease_client`).

    Cancellation is recognised from the calling task, so call this where the Temporal call was awaited.
    """
    if isinstance(err, SandboxError):
        return err
    app = application_error_in(err)
    if app is not None:
        return _malformed_request(app) or from_application_error(app)
    rpc = err if isinstance(err, RPCError) else err.__cause__
    if isinstance(err, RPCTimeoutOrCancelledError) or (
        isinstance(rpc, RPCError) and rpc.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)
    ):
        # The SDK turns the cancellation of the awaiting task into an RPC "timeout or cancelled" error.
        task = asyncio.current_task()
        if isinstance(err.__cause__, asyncio.CancelledError) or (task is not None and task.cancelling()):
            return asyncio.CancelledError()
        return OutcomeUnknown(_OUTCOME_UNKNOWN)
    if isinstance(err, RPCError) and err.status == RPCStatusCode.NOT_FOUND:
        return LeaseNotFound("no such lease; acquire it first (sandboxctl lease acquire WORKSPACE GROUP)")
    # A failed update or workflow says little itself ("Workflow update failed"): its cause says what.
    cause = err.__cause__
    return SandboxError(f"{err}: {cause}" if isinstance(cause, TemporalError) else str(err) or type(err).__name__)


def _malformed_request(app: ApplicationError) -> InvalidRequest | None:
    """``InvalidRequest`` naming the fields when the workflow could not even decode a request.

    The SDK rejects such an update before any validator runs, as ``RuntimeError: Failed decoding
    arguments`` caused by pydantic's ``ValidationError`` (a foreign caller's ``"epoch": "1"``). Only
    the field paths and pydantic's messages are kept: its ``input_value=...`` could echo a secret.
    """
    cause = app.__cause__
    if app.type != "RuntimeError" or not isinstance(cause, ApplicationError) or cause.type != "ValidationError":
        return None
    lines = [line for line in cause.message.splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    problems = [
        f"{field.strip()}: {message.split(' [', 1)[0].strip()}"
        for field, message in zip(lines[1::2], lines[2::2], strict=False)
    ]
    what = lines[0].split(" for ", 1)[-1] if lines else "the request"
    return InvalidRequest(f"malformed {what}: {'; '.join(problems) or 'it could not be decoded'}")


async def call_workflow(fn: Callable[[], Awaitable[T]]) -> T:
    """Run one Temporal client call (update, query, signal) and raise the runtime's typed errors.

    The SDK turns the cancellation of the calling task into ``WorkflowUpdateRPCTimeoutOrCancelledError``;
    that is given back as ``CancelledError`` so ``task.cancel()`` and ``asyncio.timeout`` keep working (a
    loop catching ``SandboxError`` would otherwise swallow its own cancellation). A real RPC timeout is
    ``OutcomeUnknown``: the update may or may not have run. See the table in :mod:`client.lease_client`.
    """
    try:
        return await fn()
    except TemporalError as err:
        raise translate(err) from err
