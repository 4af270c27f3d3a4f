"""One list of activity names: the worker registers exactly the members, workflows call only members,
and the names recorded in every history are members (their values never change)."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

from temporalio import activity

from providers.registry import ProviderRegistry
from sandbox.settings import Settings
from store.database import Database
from tests.conftest import REPO
from worker import build_activities
from workflows.activity_names import ActivityName

ROOT = REPO
WORKFLOW_SOURCES = sorted((ROOT / "workflows").glob("*.py"))
HISTORIES = sorted((ROOT / "tests" / "replay" / "histories").glob("*.json"))
ACTIVITY_CALLS = {"execute_activity", "start_activity", "execute_local_activity", "start_local_activity"}


async def test_the_worker_registers_every_activity_name_once_and_nothing_else(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    db = Database.for_settings(settings)
    try:
        registered = Counter(
            activity._Definition.must_from_callable(fn).name
            for fn in build_activities(settings, db, ProviderRegistry(settings))
        )
    finally:
        await db.dispose()
    assert {name for name, count in registered.items() if count > 1} == set()
    assert set(registered) - set(ActivityName) == set(), "registered under a name that is not an ActivityName"
    assert set(ActivityName) - set(registered) == set(), "an ActivityName that no activity registers"


def _activity_arguments(tree: ast.Module) -> list[tuple[int, ast.expr, set[str]]]:
    """Every activity a workflow module names: (line, first argument, names of ActivityName parameters in scope)."""
    found: list[tuple[int, ast.expr, set[str]]] = []
    forwarders: set[str] = set()  # methods that take an ActivityName and run it
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for fn in functions:
        if any(isinstance(a.annotation, ast.Name) and a.annotation.id == "ActivityName" for a in fn.args.args):
            forwarders.add(fn.name)
    for fn in functions:
        params = {
            a.arg for a in fn.args.args if isinstance(a.annotation, ast.Name) and a.annotation.id == "ActivityName"
        }
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr in ACTIVITY_CALLS | forwarders and node.args:
                found.append((node.lineno, node.args[0], params))
    return found


def test_every_activity_a_workflow_calls_is_named_by_a_member() -> None:
    used: set[str] = set()
    for path in WORKFLOW_SOURCES:
        for line, arg, params in _activity_arguments(ast.parse(path.read_text())):
            where = f"{path.name}:{line}"
            if isinstance(arg, ast.Name):
                assert arg.id in params, f"{where}: {arg.id} is not an ActivityName parameter"
                continue
            assert isinstance(arg, ast.Attribute), f"{where}: call an activity by ActivityName.<MEMBER>, not a string"
            assert isinstance(arg.value, ast.Name) and arg.value.id == "ActivityName", where
            assert arg.attr in ActivityName.__members__, f"{where}: ActivityName has no {arg.attr}"
            used.add(arg.attr)
    # Registered for callers outside the workflows (the plane activities' parts, run on their own).
    assert set(ActivityName.__members__) - used == {
        "TEAR_DOWN_DISPLAY_STACK",
        "ENSURE_TERMINAL_SERVER",
        "TEAR_DOWN_TERMINAL_SERVER",
        "EXPOSE_STREAM_PORT",
    }


def test_every_activity_in_a_recorded_history_is_a_member() -> None:
    """The values are in recorded histories: renaming one would make those histories unreplayable."""
    recorded: set[str] = set()
    for path in HISTORIES:
        for event in json.loads(path.read_text())["events"]:
            scheduled = event.get("activityTaskScheduledEventAttributes")
            if scheduled is not None:
                recorded.add(scheduled["activityType"]["name"])
    assert len(recorded) > 20
    assert recorded - set(ActivityName) == set()


def test_a_member_is_named_after_its_value() -> None:
    assert [m.name for m in ActivityName] == [m.value.upper() for m in ActivityName]
