"""RoutingSession over mock agents: pointer re-reads, per-route caching, fence retries, no replays."""

from __future__ import annotations

from typing import Any

import pytest

from providers.selfhosted import MockAgentResponder, SelfhostedSession
from sandbox.box import BoxSession
from sandbox.control_protocol import FsWriteOp
from sandbox.errors import (
    MutationOutcomeUnknown,
    RouteUnresolvable,
    RoutingError,
    SelfhostedControlError,
    StaleEpoch,
    Unsupported,
)
from sandbox.routing import ActivePointer, RoutingSession, is_fence_error, make_backend_resolver, parse_sandbox_id


async def no_sleep(_delay: float) -> None:
    return None


class Machines:
    """Two mock agents and a ``session(...)`` factory like SelfhostedProvider's."""

    def __init__(self) -> None:
        self.agents = {"a": MockAgentResponder(hostname="A"), "b": MockAgentResponder(hostname="B")}
        self.built: list[tuple[str, int]] = []

    def session(self, workspace_id: str, agent_id: str, epoch: int = 0, *, working_dir: str = "") -> BoxSession:
        self.built.append((agent_id, epoch))
        return SelfhostedSession(
            self.agents[agent_id],
            workspace_id=workspace_id,
            agent_id=agent_id,
            epoch=epoch,
            working_dir=working_dir,
            sleep=no_sleep,
        )

    def writes(self, agent: str) -> int:
        return sum(isinstance(req.op, FsWriteOp) for _s, req in self.agents[agent].requests)


class Pointers:
    """A pointer store whose reads can be scripted (to stage a swap between two reads)."""

    def __init__(self, pointer: ActivePointer) -> None:
        self.pointer = pointer
        self.script: list[ActivePointer] = []
        self.reads = 0

    async def read(self) -> ActivePointer:
        self.reads += 1
        if self.script:
            self.pointer = self.script.pop(0)
        return self.pointer


def routed(machines: Machines, pointers: Pointers, events: list[Any] | None = None) -> RoutingSession:
    resolve = make_backend_resolver(workspace_id="ws1", selfhosted=machines)
    return RoutingSession(
        pointers.read,
        resolve,
        session_id="s1",
        on_event=(lambda e, p: events.append((e, p.route))) if events is not None else None,
    )


def on(agent: str, epoch: int) -> ActivePointer:
    return ActivePointer(active_sandbox_id=f"selfhosted:{agent}", active_epoch=epoch)


async def test_every_op_rereads_the_pointer_and_resolves_once_per_route() -> None:
    machines, pointers = Machines(), Pointers(on("a", 1))
    events: list[Any] = []
    session = routed(machines, pointers, events)
    assert (await session.exec(["hostname"])).stdout == b"A\n"
    assert (await session.exec(["hostname"])).stdout == b"A\n"
    pointers.pointer = on("b", 2)
    assert (await session.exec(["hostname"])).stdout == b"B\n"
    assert machines.built == [("a", 1), ("b", 2)]
    assert pointers.reads == 6  # before and after each op
    assert [e for e, _r in events] == ["resolved", "epoch-changed"]


async def test_a_fenced_read_is_retried_on_the_new_route() -> None:
    machines = Machines()
    machines.agents["a"].files["f"] = b"current"
    machines.agents["a"].newest_epoch = 3
    pointers = Pointers(on("a", 1))
    events: list[Any] = []
    pointers.script = [on("a", 1), on("a", 3), on("a", 3)]
    session = routed(machines, pointers, events)
    assert await session.read_file("f") == b"current"
    assert ("fenced-retry", (1, "selfhosted:a")) in events
    assert machines.built == [("a", 1), ("a", 3)]


async def test_reads_give_up_after_max_fence_retries() -> None:
    machines = Machines()
    machines.agents["a"].newest_epoch = 9
    session = routed(machines, Pointers(on("a", 1)))
    with pytest.raises(SelfhostedControlError) as err:
        await session.path_exists("f")
    assert err.value.fenced
    assert len(machines.agents["a"].requests) == 4  # one try plus three retries


async def test_a_fenced_mutation_is_never_replayed() -> None:
    machines = Machines()
    machines.agents["a"].newest_epoch = 3
    pointers = Pointers(on("a", 1))
    pointers.script = [on("a", 1), on("a", 3)]
    session = routed(machines, pointers)
    with pytest.raises(MutationOutcomeUnknown) as err:
        await session.write_file("f", b"x")
    assert err.value.op == "write_file"
    assert machines.writes("a") == 1 and machines.agents["a"].file_bytes("f") is None


async def test_a_write_racing_a_swap_reports_unknown_and_is_not_applied_twice() -> None:
    machines = Machines()
    pointers = Pointers(on("a", 1))
    pointers.script = [on("a", 1), on("b", 2)]  # the swap lands while the write runs
    session = routed(machines, pointers)
    with pytest.raises(MutationOutcomeUnknown, match="superseded route"):
        await session.write_file("f", b"x")
    assert machines.writes("a") == 1 and machines.writes("b") == 0
    assert machines.agents["a"].file_bytes("f") == b"x" and machines.agents["b"].file_bytes("f") is None
    # The next read lands on the new target.
    with pytest.raises(Exception) as missing:
        await session.read_file("f")
    assert type(missing.value).__name__ == "PathNotFound"
    assert machines.built[-1] == ("b", 2)


async def test_a_read_racing_a_swap_is_retried_on_the_new_target() -> None:
    machines = Machines()
    machines.agents["a"].files["f"] = b"old"
    machines.agents["b"].files["f"] = b"new"
    pointers = Pointers(on("a", 1))
    pointers.script = [on("a", 1), on("b", 2), on("b", 2), on("b", 2)]
    assert await routed(machines, pointers).read_file("f") == b"new"


async def test_resolver_errors_and_reentrancy() -> None:
    machines = Machines()
    holder: dict[str, RoutingSession] = {}

    async def itself(_p: ActivePointer) -> BoxSession:
        return holder["s"]

    holder["s"] = RoutingSession(Pointers(on("a", 1)).read, itself)
    with pytest.raises(RoutingError):
        await holder["s"].path_exists("x")

    async def not_enrolled(_agent: str) -> bool:
        return False

    resolve = make_backend_resolver(workspace_id="ws1", selfhosted=machines, is_enrolled=not_enrolled)
    for pointer, code in (
        (ActivePointer(), "home_unavailable_this_turn"),
        (on("a", 1), "offline_enrollment"),
        (ActivePointer(active_sandbox_id="lease:g2", active_epoch=1), "unsupported_backend_context"),
        (ActivePointer(active_sandbox_id="modal:x", active_epoch=1), "unsupported_backend_context"),
    ):
        with pytest.raises(RouteUnresolvable) as err:
            await resolve(pointer)
        assert err.value.code == code


async def test_home_and_lease_targets_resolve_through_their_hooks() -> None:
    machines = Machines()
    home_session = machines.session("ws1", "a", 0)
    lease_session = machines.session("ws1", "b", 0)
    seen: list[str] = []

    async def home(_p: ActivePointer) -> BoxSession:
        return home_session

    async def lease(group: str, _p: ActivePointer) -> BoxSession:
        seen.append(group)
        return lease_session

    resolve = make_backend_resolver(workspace_id="ws1", home=home, lease_session=lease)
    assert await resolve(ActivePointer()) is home_session
    assert await resolve(ActivePointer(active_sandbox_id="lease:g2", active_epoch=4)) is lease_session
    assert seen == ["g2"]


def test_fence_detection() -> None:
    assert is_fence_error(StaleEpoch("x"))
    assert is_fence_error(RuntimeError("operation fenced by epoch 4"))
    assert is_fence_error(RuntimeError("epoch superseded"))
    assert not is_fence_error(RuntimeError("epoch 4 is fine"))
    assert not is_fence_error(SelfhostedControlError("x", code=2))


def test_sandbox_ids() -> None:
    assert parse_sandbox_id("selfhosted:laptop-1").ref == "laptop-1"
    assert parse_sandbox_id("lease:g2").kind == "lease"
    for bad in ("laptop", "selfhosted:", "selfhosted:a.b", "other:x"):
        with pytest.raises(RouteUnresolvable):
            parse_sandbox_id(bad)


def test_a_routed_session_has_no_envelope() -> None:
    with pytest.raises(Unsupported):
        routed(Machines(), Pointers(on("a", 1))).serialize_state()
