"""Event stores: streams with optimistic concurrency, a global log, snapshots and
checkpoints, on SQLite (embedded) and PostgreSQL. The contract is in ``_contract``."""

from nervus.storage._contract import (
    ANY,
    NO_STREAM,
    AppendResult,
    EventStore,
    OutboxMessage,
    RecordedEvent,
    Snapshot,
    StoreTransaction,
)
from nervus.storage._urls import store_from_url, store_schemes

__all__ = [
    "ANY",
    "NO_STREAM",
    "AppendResult",
    "EventStore",
    "OutboxMessage",
    "RecordedEvent",
    "Snapshot",
    "StoreTransaction",
    "store_from_url",
    "store_schemes",
]
