"""The core: envelope, typed events, ids and clocks. Knows no broker and no database."""

from nervus.core._clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from nervus.core._envelope import Envelope
from nervus.core._event import (
    REGISTRY,
    Command,
    Event,
    Message,
    TypeRegistry,
    channel_of,
    channel_of_type,
    type_name,
)
from nervus.core._ids import new_id, uuid7, uuid7_time_ms

__all__ = [
    "REGISTRY",
    "SYSTEM_CLOCK",
    "Clock",
    "Command",
    "Envelope",
    "Event",
    "ManualClock",
    "Message",
    "SystemClock",
    "TypeRegistry",
    "channel_of",
    "channel_of_type",
    "new_id",
    "type_name",
    "uuid7",
    "uuid7_time_ms",
]
