"""The one table mapping sandbox errors to Temporal ``ApplicationError`` types and retryability.

| raised in an activity          | ApplicationError.type | retried by Temporal |
|--------------------------------|-----------------------|---------------------|
| BoxNotFound                    | BoxNotFound           | no (typed proof the box is gone) |
| ProviderUnavailable            | ProviderUnavailable   | yes |
| ProviderQuotaError             | ProviderQuotaError    | yes |
| ProviderAuthError              | ProviderAuthError     | no  |
| ExecTimeout                    | ExecTimeout           | no  |
| SelfhostedControlError, agent  | AgentOffline          | yes (the machine may come back; never NotFound) |
|   offline or reconnecting      |                       |     |
| Unsupported                    | Unsupported           | no  |
| InvalidRequest (and subclasses)| its own error_type    | no  |
| SandboxConfigError             | SandboxConfigError    | no  |
| any other SandboxError         | its own error_type    | per ``retryable`` |
| any other exception            | class name            | yes (Temporal's default) |

The retry decision is the error's ``retryable`` flag, so the table is the class definitions in
:mod:`sandbox.errors`; this module only applies it at the activity boundary. The error's
attributes (``stage``, ``path``, ``code``, ...) travel as the ``ApplicationError``'s details and its
per-instance ``retryable`` as ``non_retryable``: :func:`sandbox.failures.to_application_error` is
the one encoder (and the client's decoder is its inverse).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from sandbox.errors import AgentOffline, SandboxError, SelfhostedControlError
from sandbox.failures import compact_cause, to_application_error

__all__ = ["maps_provider_errors", "to_application_error"]

P = ParamSpec("P")
R = TypeVar("R")


def maps_provider_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate an async activity so typed sandbox errors leave it as typed ``ApplicationError``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SelfhostedControlError as err:
            if err.agent_offline or err.reason in ("agent_offline", "agent_reconnecting"):
                offline = AgentOffline(err.message, reason=err.reason or "agent_offline")
                raise to_application_error(offline) from compact_cause(err)
            raise to_application_error(err) from compact_cause(err)
        except SandboxError as err:
            raise to_application_error(err) from compact_cause(err)

    return wrapper
