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
:mod:`sandbox.errors`; this module only applies it at the activity boundary.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from temporalio.exceptions import ApplicationError

from sandbox.errors import AgentOffline, SandboxError, SelfhostedControlError

P = ParamSpec("P")
R = TypeVar("R")


def to_application_error(err: SandboxError) -> ApplicationError:
    """The ``ApplicationError`` that carries ``err`` across the Temporal boundary."""
    return ApplicationError(err.message, type=err.error_type, non_retryable=not err.retryable)


def maps_provider_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate an async activity so typed sandbox errors leave it as typed ``ApplicationError``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SelfhostedControlError as err:
            if err.agent_offline or err.reason in ("agent_offline", "agent_reconnecting"):
                offline = AgentOffline(err.message, reason=err.reason or "agent_offline")
                raise to_application_error(offline) from err
            raise to_application_error(err) from err
        except SandboxError as err:
            raise to_application_error(err) from err

    return wrapper
