"""Selfhosted machine liveness: online, reconnecting or offline, from an enrollment and a probe.

:func:`selfhosted_liveness` follows upstream (``reference/upstream-runtime-contracts.md`` §2.3):

- no enrollment, or a status other than exactly ``active`` (revoked, pending) → offline, with no
  consent and no display;
- ``consented`` means whole-machine exposure *and* screen control allowed by the owner;
- a clean goodbye (``went_offline_at`` set) → offline, even if a probe just answered;
- a probe that answered → online;
- otherwise seen within :data:`~sandbox.descriptors.SELFHOSTED_RECONNECT_WINDOW_MS` (30 s,
  inclusive, a future timestamp counts as recent) → reconnecting, else offline.

Timestamps may be datetimes or the text forms a database or an API hands over (ISO 8601 with or
without milliseconds or offset, date only = UTC midnight, ``2025-06-01 11:59:55+00``); text that
does not parse counts as never seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from sandbox.descriptors import SELFHOSTED_RECONNECT_WINDOW_MS

__all__ = ["AgentState", "EnrollmentView", "SelfhostedLiveness", "parse_moment", "selfhosted_liveness"]

AgentState = Literal["online", "reconnecting", "offline"]
_WINDOW: Final = timedelta(milliseconds=SELFHOSTED_RECONNECT_WINDOW_MS)


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True, frozen=True, extra="ignore"
    )


class EnrollmentView(_Wire):
    """The enrollment fields liveness reads (camelCase or snake_case keys)."""

    status: str
    exposure: str = "workspace"
    allow_screen_control: bool = False
    has_display: bool = False
    last_seen_at: datetime | str | None = None
    went_offline_at: datetime | str | None = None
    went_offline_reason: str | None = None


class SelfhostedLiveness(_Wire):
    """Where the machine stands right now, and what its owner allows."""

    state: AgentState
    consented: bool
    has_display: bool


def parse_moment(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from a datetime or timestamp text; None for absent or unparseable input.

    Naive values (and date-only text) are read as UTC.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        text = value.strip()
        if not text:
            return None
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _view(enrollment: EnrollmentView | Mapping[str, Any] | None) -> EnrollmentView | None:
    if enrollment is None or isinstance(enrollment, EnrollmentView):
        return enrollment
    return EnrollmentView.model_validate(enrollment)


def selfhosted_liveness(
    enrollment: EnrollmentView | Mapping[str, Any] | None,
    probe_responded: bool,
    now: datetime | None = None,
) -> SelfhostedLiveness:
    """Whether an enrolled machine is online, reconnecting or offline (rules in the module docstring).

    ``now`` is read only when the answer depends on it (no probe answer, no clean goodbye).
    """
    view = _view(enrollment)
    if view is None or view.status != "active":
        return SelfhostedLiveness(state="offline", consented=False, has_display=False)
    consented = view.exposure == "whole-machine" and view.allow_screen_control
    facts = {"consented": consented, "has_display": view.has_display}
    if view.went_offline_at:  # any value, even unparseable text: the agent said goodbye
        return SelfhostedLiveness(state="offline", **facts)
    if probe_responded:
        return SelfhostedLiveness(state="online", **facts)
    last_seen = parse_moment(view.last_seen_at)
    if last_seen is None:
        return SelfhostedLiveness(state="offline", **facts)
    at = parse_moment(now) if now is not None else datetime.now(UTC)
    assert at is not None
    state: AgentState = "reconnecting" if at - last_seen <= _WINDOW else "offline"
    return SelfhostedLiveness(state=state, **facts)
