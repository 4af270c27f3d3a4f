"""The activities' one session cache: a box is resumed once, reused, and forgotten when it is gone."""

from __future__ import annotations

from typing import Any, cast

from activities.box_sessions import BoxSessions
from providers.registry import ProviderRegistry
from sandbox.box import Envelope


class _Provider:
    def __init__(self) -> None:
        self.resumed: list[Envelope] = []

    async def resume(self, envelope: Envelope) -> Any:
        self.resumed.append(envelope)
        return object()


class _Registry:
    def __init__(self) -> None:
        self.providers: dict[str, _Provider] = {"local": _Provider(), "docker": _Provider()}

    def get(self, backend: str) -> _Provider:
        return self.providers[backend]


def _sessions() -> tuple[BoxSessions, _Registry]:
    registry = _Registry()
    return BoxSessions(cast(ProviderRegistry, registry)), registry


BOX = Envelope(backend_id="unix_local", instance_id="box-1", state={"k": "v"})


async def test_a_box_is_resumed_once_from_its_envelope() -> None:
    sessions, registry = _sessions()
    first = await sessions.get("local", BOX)
    assert await sessions.get("local", BOX) is first
    assert registry.providers["local"].resumed == [
        Envelope(backend_id="unix_local", instance_id="box-1", state={"k": "v"})
    ]


async def test_the_same_instance_of_another_backend_is_another_session() -> None:
    sessions, registry = _sessions()
    assert await sessions.get("local", BOX) is not await sessions.get("docker", BOX)
    assert len(registry.providers["docker"].resumed) == 1


async def test_forget_makes_the_next_get_resume_again() -> None:
    sessions, registry = _sessions()
    first = await sessions.get("local", BOX)
    sessions.forget("local", "box-1")
    sessions.forget("local", "never-seen")  # unknown boxes are ignored
    assert await sessions.get("local", BOX) is not first
    assert len(registry.providers["local"].resumed) == 2


async def test_a_kept_session_is_used_without_a_resume() -> None:
    sessions, registry = _sessions()
    provisioned: Any = object()
    sessions.keep("local", "box-1", provisioned)
    assert await sessions.get("local", BOX) is provisioned
    assert registry.providers["local"].resumed == []
