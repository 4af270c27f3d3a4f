"""Typed failures raised by workflows, built from the one hierarchy in :mod:`sandbox.errors`.

A workflow raises ``ApplicationError`` whose ``type`` is the error class's ``error_type`` (encoded by
:func:`sandbox.failures.to_application_error`); the client maps it back with
:func:`sandbox.failures.from_application_error`. Raised from a validator, the update is rejected
before anything is written to history. An activity's typed failure that a workflow passes on to its
caller goes through :func:`forwarded`, so its attributes and retryability reach the caller unchanged.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from sandbox import errors
from sandbox.failures import to_application_error


def failure(cls: type[errors.SandboxError], message: str) -> ApplicationError:
    """An ``ApplicationError`` of the given sandbox error class (non-retryable unless the class says so)."""
    return to_application_error(errors.error_from_type(cls.error_type, message))


def forwarded(cause: ApplicationError) -> ApplicationError:
    """A copy of an activity's ``ApplicationError`` to raise to the workflow's caller: same type, message,
    details (the error's attributes) and ``non_retryable``, without the activity's failure chain."""
    return ApplicationError(cause.message, *cause.details, type=cause.type, non_retryable=cause.non_retryable)
