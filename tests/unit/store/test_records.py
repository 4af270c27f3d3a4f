"""Store boundary records: UTC normalisation, naive datetimes refused, JSON round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from store.models import UtcDateTime
from store.records import HolderRecord, LeaseEventRecord, LeaseRecord

AT = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
SQLITE = make_url("sqlite+aiosqlite://").get_dialect()()
PG = make_url("postgresql+psycopg://").get_dialect()()


def test_offset_datetimes_become_utc() -> None:
    local = datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    h = HolderRecord(kind="turn", holder_id="h", acquired_at=local, last_heartbeat_at=local)
    assert h.acquired_at == AT
    assert h.acquired_at.tzinfo is UTC


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValidationError):
        LeaseEventRecord(
            lease_id="lease/w/g",
            transition_seq=1,
            from_liveness="cold",
            to_liveness="warming",
            epoch=1,
            reason="acquire",
            at=datetime(2026, 1, 2),
        )


def test_lease_record_json_round_trip() -> None:
    record = LeaseRecord(
        lease_id="lease/w/g",
        workspace_id="w",
        group_id="g",
        backend="local",
        liveness="warm",
        epoch=2,
        instance_id="box",
        envelope={"a": [1, {"b": None}]},
        transition_seq=4,
        reason="probe ok",
        updated_at=AT,
        holders=[HolderRecord(kind="viewer", holder_id="v", subject="u", acquired_at=AT, last_heartbeat_at=AT)],
    )
    again = LeaseRecord.model_validate_json(record.model_dump_json())
    assert again == record
    assert again.os == "linux"


def test_column_type_refuses_naive_and_stores_utc() -> None:
    column = UtcDateTime()
    with pytest.raises(ValueError):
        column.process_bind_param(datetime(2026, 1, 2), SQLITE)
    assert column.process_bind_param(AT, SQLITE) == AT.replace(tzinfo=None)
    assert column.process_bind_param(AT, PG) == AT
    assert column.process_result_value(AT.replace(tzinfo=None), SQLITE) == AT
