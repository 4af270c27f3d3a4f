"""The scheduler-facing client of the sandbox runtime."""

from client.lease_client import LeaseClient, ViewerCell, timers_from_settings, translate, validate_lease_ids

__all__ = ["LeaseClient", "ViewerCell", "timers_from_settings", "translate", "validate_lease_ids"]
