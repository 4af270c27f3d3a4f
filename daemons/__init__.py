"""The runtime's own long-running processes: the self-hosted agent daemon, the stream edges and the
codec server. Each speaks a network protocol or supervises processes; they use ``sandbox/`` and nothing above it."""
