"""Stateful fakes of the cloud services the providers talk to, for tests and benchmarks.

No test machine reaches Modal, E2B, Daytona, Runloop, Blaxel, Vercel, Cloudflare or a Docker
engine, so each provider is exercised against a fake at its SDK's boundary that keeps boxes,
files and snapshots and returns the service's real error shapes. Boxes of every fake really run
commands: they are local bubblewrap boxes of one :class:`~tests.fakes.machine.FakeMachine`.
Fault injection and latency go through :class:`~tests.fakes.faults.FaultPlan`.
"""
