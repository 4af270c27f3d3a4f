"""Migration scripts, one per revision (``0001_leases``, ``0002_...``)."""
