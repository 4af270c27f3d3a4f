"""Typed failures raised by workflows, built from the one hierarchy in :mod:`sandbox.errors`.

A workflow raises ``ApplicationError`` whose ``type`` is the error class's ``error_type``; the
client maps it back with :func:`sandbox.errors.error_from_type`. Raised from a validator, the
update is rejected before anything is written to history.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from sandbox import errors


def failure(cls: type[errors.SandboxError], message: str) -> ApplicationError:
    """An ``ApplicationError`` of the given sandbox error class (non-retryable unless the class says so)."""
    return ApplicationError(message, type=cls.error_type, non_retryable=not cls.default_retryable)
