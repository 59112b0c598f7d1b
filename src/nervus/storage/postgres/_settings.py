"""Typed settings of the PostgreSQL event store, read from ``postgresql://...?option=value``.

A URL carries nervus's options (``PostgresStoreSettings``), removed before
connecting, and the driver's (``sslmode``, ``application_name`` and other server
settings), passed on unchanged.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from nervus.core._urls import parse_options, redact
from nervus.errors import ConfigurationError

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*\Z")
_MAX_SCHEMA = 48  # "nervus_events." + schema must fit PostgreSQL's 63-byte channel names


class PostgresStoreSettings(msgspec.Struct, kw_only=True):
    """nervus options of a store URL; ``validate()`` lists every problem at once.

    ``schema`` holds the store's tables (created on first connect; lower-case
    letters, digits and ``_``); the embedded log's PostgreSQL twin may share it.
    ``pool_size`` is the most connections the store opens for reads and
    transactions (appends have one of their own, and so have the outbox relay and a
    subscriber's listening connection). ``poll_interval`` is how
    often an idle subscriber looks without being notified (a safety net: appends
    wake subscribers through LISTEN/NOTIFY). ``connect_timeout`` bounds
    ``connect()`` and every later connection attempt. ``outbox_layout=debezium`` lays
    the outbox table out as Debezium's outbox event router reads it (``id``,
    ``aggregatetype`` = the channel, ``aggregateid`` = the key, ``type``, ``payload``,
    plus ``headers``), for teams that publish it with Debezium CDC.
    ``wake_interval`` is the least time between two ``NOTIFY`` by which a process
    wakes the outbox relays of other processes after its commits (a relay in the
    same process is woken at once); every ``NOTIFY`` takes the server's one
    notification lock as it commits, so one covers the commits of the interval.
    """

    schema: str = "nervus"
    outbox_layout: Literal["nervus", "debezium"] = "nervus"
    pool_size: int = 4
    poll_interval: float = 1.0
    connect_timeout: float = 10.0
    wake_interval: float = 0.01

    @property
    def notify_channel(self) -> str:
        return f"nervus_events.{self.schema}"

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not _IDENTIFIER.match(self.schema) or len(self.schema) > _MAX_SCHEMA:
            problems.append(
                f"schema={self.schema!r} must be 1 to {_MAX_SCHEMA} characters of lower-case "
                "letters, digits and '_', not starting with a digit"
            )
        if not 1 <= self.pool_size <= 100:
            problems.append(f"pool_size={self.pool_size} must be between 1 and 100")
        for name in ("poll_interval", "connect_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not 0 <= self.wake_interval <= 1:
            problems.append(f"wake_interval={self.wake_interval} must be between 0 and 1 (s)")
        return problems


def split_store_url(url: str, key: str) -> tuple[str, PostgresStoreSettings]:
    """The driver's connection URL (nervus options removed) and the nervus settings."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError([f"{key}={redact(url)!r}: expected a postgresql:// URL"])
    if not parts.hostname and not parts.path.strip("/"):
        raise ConfigurationError(
            [
                f"{key}={redact(url)!r}: names no server or database; "
                "write postgresql://user:password@host:5432/dbname"
            ]
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = set(PostgresStoreSettings.__struct_fields__)
    nervus = [(k, v) for k, v in query if k in ours]
    driver = [(k, v) for k, v in query if k not in ours]
    settings = parse_options(
        urlunsplit(parts._replace(query=urlencode(nervus))), PostgresStoreSettings, key=key
    )
    return urlunsplit(parts._replace(query=urlencode(driver))), settings
