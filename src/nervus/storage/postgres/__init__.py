"""The event store on PostgreSQL (``pip install 'nervus[postgres]'``)."""

from nervus.storage.postgres._settings import PostgresStoreSettings
from nervus.storage.postgres._store import PostgresEventStore

__all__ = ["PostgresEventStore", "PostgresStoreSettings"]
