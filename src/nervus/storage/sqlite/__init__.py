"""The embedded event store on SQLite (no extra needed)."""

from nervus.storage.sqlite._store import SqliteEventStore, SqliteStoreSettings

__all__ = ["SqliteEventStore", "SqliteStoreSettings"]
