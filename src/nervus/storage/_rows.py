"""Stored rows back into recorded events: the one column order both stores select."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nervus.core import Envelope
from nervus.storage._contract import RecordedEvent

COLUMNS = (
    "position, stream_id, version, id, type, source, time, subject, content_type, "
    "dataschema, correlation_id, causation_id, traceparent, tracestate, data"
)
"""The columns to select, in the order ``recorded_events`` unpacks them."""


def recorded_events(rows: Iterable[Any]) -> list[RecordedEvent]:
    """Rows of ``COLUMNS`` as recorded events; a stored event's partition key is its
    stream id. (Unpacking a row is cheaper than indexing it fifteen times.)"""
    return [
        RecordedEvent(
            stream_id,
            version,
            position,
            Envelope(
                id=event_id,
                type=type_,
                source=source,
                time=time,
                subject=subject,
                datacontenttype=content_type,
                dataschema=dataschema,
                correlationid=correlation,
                causationid=causation,
                partitionkey=stream_id,
                traceparent=traceparent,
                tracestate=tracestate,
                data=data,
            ),
        )
        for (
            position,
            stream_id,
            version,
            event_id,
            type_,
            source,
            time,
            subject,
            content_type,
            dataschema,
            correlation,
            causation,
            traceparent,
            tracestate,
            data,
        ) in rows
    ]
