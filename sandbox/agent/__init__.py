"""The selfhosted agent: the daemon a user runs on their own machine (``sandboxctl agent run``)."""

from sandbox.agent.consent import AgentConsent
from sandbox.agent.daemon import AgentConfig, AgentDaemon
from sandbox.agent.operations import AgentOperations, DisplayAccess

__all__ = ["AgentConfig", "AgentConsent", "AgentDaemon", "AgentOperations", "DisplayAccess"]
