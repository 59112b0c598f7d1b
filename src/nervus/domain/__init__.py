"""Domain logic on event sourcing: aggregates, repositories, decoding stored events."""

from nervus.domain._aggregate import Aggregate, evolve
from nervus.domain._decoding import EventDecoder
from nervus.domain._repository import CommandResult, Decision, Loaded, Repository

__all__ = [
    "Aggregate",
    "CommandResult",
    "Decision",
    "EventDecoder",
    "Loaded",
    "Repository",
    "evolve",
]
