"""nervus: typed event-driven microservices on a durable log."""

from nervus.core import Command, Envelope, Event, new_id, uuid7

__all__ = ["Command", "Envelope", "Event", "new_id", "uuid7"]
