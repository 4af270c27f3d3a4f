"""Reading Temporal history protobufs in tests: every payload an event carries, wherever it sits."""

from __future__ import annotations

from typing import Any

from temporalio.api.common.v1 import Payload

_SEARCH_ATTRIBUTES = "temporal.api.common.v1.SearchAttributes"


def payloads_in(message: Any, *, search_attributes: bool = False) -> list[Payload]:
    """Every ``Payload`` message anywhere inside a protobuf message (fields, lists and maps walked).

    Search attributes are left out unless asked for: Temporal indexes them in clear and never passes
    them through a payload codec, so they are not payloads the codec could encrypt.
    """
    if isinstance(message, Payload):
        return [message]
    found: list[Payload] = []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.full_name == _SEARCH_ATTRIBUTES and not search_attributes:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    found += payloads_in(item, search_attributes=search_attributes)
        elif field.is_repeated:
            for item in value:
                found += payloads_in(item, search_attributes=search_attributes)
        else:
            found += payloads_in(value, search_attributes=search_attributes)
    return found
