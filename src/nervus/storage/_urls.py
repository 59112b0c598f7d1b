"""Opening a store from its URL (``NERVUS_STORE``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nervus.core._urls import SchemeRegistry

if TYPE_CHECKING:
    from nervus.storage._contract import EventStore

_SCHEMES: SchemeRegistry[EventStore] = SchemeRegistry(
    "store",
    {
        "sqlite": "nervus.storage.sqlite:SqliteEventStore.from_url",
        "postgresql": "nervus.storage.postgres:PostgresEventStore.from_url",
    },
)


def store_from_url(url: str, *, key: str = "NERVUS_STORE") -> EventStore:
    """Build (not connect) the event store a URL names; ``key`` names the setting in errors."""
    return _SCHEMES.build(url, key)


def store_schemes() -> list[str]:
    return _SCHEMES.schemes()
