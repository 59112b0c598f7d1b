"""nervus: typed event-driven microservices on a durable log."""

from nervus.core import Command, Envelope, Event, new_id, uuid7
from nervus.runtime import Context, Service, Settings

__all__ = [
    "Command",
    "Context",
    "Envelope",
    "Event",
    "Service",
    "Settings",
    "new_id",
    "uuid7",
]
