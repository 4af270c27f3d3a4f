"""What the runtime needs a Temporal server configured with: its search attributes and one update limit.

Every place that starts a server (``sandboxctl up``, the test fixtures, the bench stack) passes
:func:`dev_server_flags` to ``temporal server start-dev``; a production cluster sets the same
dynamic config value (:data:`DYNAMIC_CONFIG`) and registers the search attributes itself (README,
"Pointing the worker at a Temporal cluster").
"""

from __future__ import annotations

from typing import Final

from workflows.models.lease import MAX_UPDATE_INPUT_BYTES
from workflows.search_attributes import search_attribute_flags

UPDATE_ADMISSION_LIMIT_BYTES: Final = 3 * MAX_UPDATE_INPUT_BYTES
"""The server refuses an update (``RESOURCE_EXHAUSTED``) once the updates of one lease it has taken in
and not yet handed to the worker would pass this size (each update's request proto, in bytes).

Why the server and not the lease: the worker answers an update it refuses with a rejection that
carries the whole request (Temporal's protocol, built by the SDK's core, not by our code), and a
workflow task whose message is over the server's payload limit (``limit.blobSize.error``, 2 MiB)
fails (PAYLOADS_TOO_LARGE) again and again until the server gives the update up: no validator can
refuse such an update in time. Refused at admission, it never reaches the lease.

1.5 MiB: an update up to it still reaches the lease's validators (which refuse anything over
:data:`~workflows.models.lease.MAX_UPDATE_INPUT_BYTES` with an ``InvalidRequest`` naming that limit),
and its rejection still fits under the 2 MiB with its failure, which
:class:`~sandbox.failures.BoundedFailureConverter` keeps under 0.4 MiB. An update is counted only
until the lease accepts or refuses it (milliseconds), so this bounds a burst, not the updates running:
three of our client's biggest updates arriving at once pass.
"""

DYNAMIC_CONFIG: Final = {"history.maxInFlightUpdatePayloads": UPDATE_ADMISSION_LIMIT_BYTES}
"""Dynamic config the runtime needs on any Temporal server (``KEY: value``)."""


def dynamic_config_flags() -> list[str]:
    """``--dynamic-config-value KEY=VALUE`` flags for ``temporal server start-dev`` (:data:`DYNAMIC_CONFIG`)."""
    flags: list[str] = []
    for key, value in DYNAMIC_CONFIG.items():
        flags += ["--dynamic-config-value", f"{key}={value}"]
    return flags


def dev_server_flags() -> list[str]:
    """Every flag the runtime needs on ``temporal server start-dev``: search attributes and dynamic config."""
    return [*search_attribute_flags(), *dynamic_config_flags()]
