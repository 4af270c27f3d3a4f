"""The selfhosted agent: the daemon a user runs on their own machine (``sandboxctl agent run``)."""

from daemons.agent.consent import AgentConsent
from daemons.agent.daemon import AgentConfig, AgentDaemon
from daemons.agent.operations import AgentOperations, DisplayAccess

__all__ = ["AgentConfig", "AgentConsent", "AgentDaemon", "AgentOperations", "DisplayAccess"]
