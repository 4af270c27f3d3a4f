"""The labels (tags, metadata) the cloud providers put on every box they create, and how ``list_owned`` reads them.

Every box records its owner: ``sandbox.lease_id`` (the lease it serves), ``sandbox.key`` (the
idempotency key it was created under, so a retried create adopts it), ``sandbox.epoch`` (the
lease epoch, for the orphan sweep) and, where the service can filter on it,
``sandbox.managed_by=sandbox-runtime``. Whatever a service calls them (Modal tags, E2B and
Runloop metadata, Daytona and Blaxel labels, Vercel tags), the names are these.

:func:`owned_box` builds the :class:`~sandbox.box.OwnedBox` the orphan sweep reads: the lease id
from ``sandbox.lease_id``, and the labels with every ``sandbox.<name>`` also under its bare
``<name>`` (the sweep reads ``epoch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Final

from sandbox.box import OwnedBox

__all__ = ["EPOCH", "KEY", "LEASE_ID", "MANAGED_BY", "MANAGED_BY_US", "iso_seconds", "owned_box", "with_bare_names"]

LEASE_ID: Final = "sandbox.lease_id"
KEY: Final = "sandbox.key"
EPOCH: Final = "sandbox.epoch"
MANAGED_BY: Final = "sandbox.managed_by"
#: The value of ``sandbox.managed_by`` on every box this runtime creates.
MANAGED_BY_US: Final = "sandbox-runtime"
_PREFIX: Final = "sandbox."


def with_bare_names(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels, plus each ``sandbox.<name>`` under its bare ``<name>`` (``epoch``, ``lease_id``, ...)."""
    out = dict(labels)
    for key, value in labels.items():
        if key.startswith(_PREFIX):
            out.setdefault(key.removeprefix(_PREFIX), value)
    return out


def owned_box(instance_id: str, labels: Mapping[str, str], *, created_at: float | None) -> OwnedBox:
    """The :class:`OwnedBox` of a box with these labels (lease id from ``sandbox.lease_id``)."""
    return OwnedBox(
        instance_id=instance_id, lease_id=labels.get(LEASE_ID), created_at=created_at, labels=with_bare_names(labels)
    )


def iso_seconds(value: object) -> float | None:
    """Unix seconds of an ISO 8601 creation time as services answer it (``...Z`` allowed); None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
