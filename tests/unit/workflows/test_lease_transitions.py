"""The lease's one table of liveness edges: what the recorded leases did, and nothing else is allowed."""

from __future__ import annotations

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

from sandbox.payload_codec import PayloadKeys, data_converter_for
from tests.conftest import REPO
from workflows.activity_names import ActivityName
from workflows.lease import LIVENESS_EDGES, IllegalTransition, LeaseWorkflow
from workflows.models.boxes import ProjectionInput
from workflows.models.lease import LeaseInput, LeaseSpec, LeaseState

REPLAY = REPO / "tests" / "replay"
KEYS = PayloadKeys.from_json((REPLAY / "payload-keys.json").read_text())


def _table_edges() -> set[tuple[str, str]]:
    return {(a, b) for a, targets in LIVENESS_EDGES.items() for b in targets}


async def _recorded_edges() -> set[tuple[str, str]]:
    """Every liveness change the recorded leases projected to the store."""
    converter = data_converter_for(KEYS)
    edges: set[tuple[str, str]] = set()
    for path in sorted((REPLAY / "histories").glob("lease_*.json")):
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        for event in history.events:
            if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                continue
            scheduled = event.activity_task_scheduled_event_attributes
            if scheduled.activity_type.name != ActivityName.PROJECT_LEASE:
                continue
            [projection] = await converter.decode(scheduled.input.payloads, [ProjectionInput])
            edges |= {(e.from_liveness, e.to_liveness) for e in projection.events}
    return edges


def test_the_edges_are_the_lifecycle() -> None:
    assert _table_edges() == {
        ("cold", "warming"),
        ("warming", "warm"),
        ("warming", "cold"),
        ("warm", "draining"),
        ("warm", "cold"),
        ("draining", "warm"),
        ("draining", "cold"),
    }


async def test_the_recorded_leases_took_every_edge_and_no_other() -> None:
    """The table is what the code did before it was written down: not one edge more or less."""
    assert await _recorded_edges() == _table_edges()


@pytest.mark.parametrize(
    ("start", "to"), [("cold", "warm"), ("cold", "draining"), ("warming", "draining"), ("cold", "cold")]
)
def test_any_other_transition_is_refused_before_anything_changes(start: str, to: str) -> None:
    lease = LeaseWorkflow(LeaseInput(spec=LeaseSpec(workspace_id="ws", group_id="g")))
    lease.s = LeaseState(liveness=start, epoch=3, version=7)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition, match=f"{start} -> {to}"):
        lease._transition(to, "a bug", bump=True)  # type: ignore[arg-type]
    assert (lease.s.liveness, lease.s.epoch, lease.s.version, lease.s.transitions) == (start, 3, 7, [])
