"""Domain logic on event sourcing: aggregates, repositories, decoding stored events."""

from nervus.domain._aggregate import Aggregate, evolve
from nervus.domain._decoding import EventDecoder
from nervus.domain._projection import (
    Projection,
    ProjectionRunner,
    ProjectionStatus,
    ReadModelTransaction,
    handles,
    projection_statuses,
)
from nervus.domain._repository import CommandResult, Decision, Loaded, Repository

__all__ = [
    "Aggregate",
    "CommandResult",
    "Decision",
    "EventDecoder",
    "Loaded",
    "Projection",
    "ProjectionRunner",
    "ProjectionStatus",
    "ReadModelTransaction",
    "Repository",
    "evolve",
    "handles",
    "projection_statuses",
]
