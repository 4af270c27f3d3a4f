"""The scheduler-facing client of the sandbox runtime."""

from client.lease_client import (
    LeaseClient,
    ViewerCell,
    call_workflow,
    timers_from_settings,
    translate,
    validate_lease_ids,
)

__all__ = ["LeaseClient", "ViewerCell", "call_workflow", "timers_from_settings", "translate", "validate_lease_ids"]
