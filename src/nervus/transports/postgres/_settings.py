"""Typed settings of the PostgreSQL transport, read from ``postgresql://...?option=value``.

A URL carries two kinds of options: libpq's own (``sslmode``, ``application_name``,
``target_session_attrs`` ...), passed to the server connection unchanged, and
nervus's (``PostgresSettings``), removed before connecting. Anything that is
neither is an error naming both lists. ``connect_timeout`` is read by nervus (it
bounds the whole ``connect()``) and handed to libpq as well, in whole seconds.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from nervus.errors import ConfigurationError
from nervus.transports._urls import parse_options

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*\Z")
_MAX_SCHEMA = 56  # "nervus." + schema must fit PostgreSQL's 63-byte channel names


class PostgresSettings(msgspec.Struct, kw_only=True):
    """nervus options of ``postgresql://user:pass@host:5432/db?...``; ``validate()``
    lists every problem at once.

    ``schema`` holds the log's tables (created on first connect; lower-case letters,
    digits and ``_``). ``partitions`` is the partition count of channels created by
    this transport. ``lease_seconds`` is how long a member keeps its partitions
    without a heartbeat; ``heartbeat_seconds`` how often it renews (at most a third
    of the lease; default a quarter). ``poll_interval`` is how often an idle
    consumer looks for messages without being notified (a safety net: publishes
    wake consumers through LISTEN/NOTIFY). ``commit_interval`` is how long settled
    positions may wait before being committed. ``connect_timeout`` bounds
    ``connect()`` as a whole (opening the connections and creating the tables) and
    every reconnection.
    ``durable_positions`` makes commits of consumer positions and lease renewals
    wait for the server's WAL flush (by default they skip it, so a server crash may
    bring back a few acknowledged messages, never lose a published one).
    """

    schema: str = "nervus"
    partitions: int = 8
    lease_seconds: float = 10.0
    heartbeat_seconds: float | None = None
    poll_interval: float = 1.0
    commit_interval: float = 0.05
    connect_timeout: float = 10.0
    durable_positions: bool = False

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval: the option, or a quarter of the lease."""
        return (
            self.heartbeat_seconds if self.heartbeat_seconds is not None else self.lease_seconds / 4
        )

    @property
    def notify_channel(self) -> str:
        """The LISTEN/NOTIFY channel of this schema's log."""
        return f"nervus.{self.schema}"

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not _IDENTIFIER.match(self.schema) or len(self.schema) > _MAX_SCHEMA:
            problems.append(
                f"schema={self.schema!r} must be 1 to {_MAX_SCHEMA} characters of lower-case "
                "letters, digits and '_', not starting with a digit"
            )
        if not 1 <= self.partitions <= 4096:
            problems.append(f"partitions={self.partitions} must be between 1 and 4096")
        if self.lease_seconds <= 0:
            problems.append(f"lease_seconds={self.lease_seconds} must be positive")
        if self.heartbeat_seconds is not None and not (
            0 < self.heartbeat_seconds <= self.lease_seconds / 3
        ):
            problems.append(
                f"heartbeat_seconds={self.heartbeat_seconds} must be positive and at most a third "
                f"of lease_seconds={self.lease_seconds}, so a member renews before its lease ends"
            )
        if not 0 < self.poll_interval <= 60:
            problems.append(f"poll_interval={self.poll_interval} must be above 0 and at most 60")
        if self.commit_interval < 0:
            problems.append(f"commit_interval={self.commit_interval} must be zero or positive")
        if self.connect_timeout <= 0:
            problems.append(f"connect_timeout={self.connect_timeout} must be positive")
        return problems


def libpq_options() -> frozenset[str]:
    """The connection options libpq accepts in a URL's query string."""
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def split_url(url: str, key: str) -> tuple[str, PostgresSettings]:
    """The libpq connection URL (nervus options removed) and the nervus settings.

    Raises ``ConfigurationError`` naming every unknown option and bad value.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError([f"{key}={redact(url)!r}: expected a postgresql:// URL"])
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = set(PostgresSettings.__struct_fields__)
    libpq = libpq_options()
    nervus = [(k, v) for k, v in query if k in ours]
    server = [(k, v) for k, v in query if k not in ours]
    unknown = [k for k, _ in server if k not in libpq]
    if unknown:
        raise ConfigurationError(
            [
                f"{key}: unknown option {name!r} in {redact(url)!r}; nervus options: "
                f"{', '.join(PostgresSettings.__struct_fields__)}; or any libpq connection "
                "option (sslmode, application_name, ...)"
                for name in unknown
            ]
        )
    settings = parse_options(
        urlunsplit(parts._replace(netloc=_redacted_netloc(url), query=urlencode(nervus))),
        PostgresSettings,
        key=key,
    )
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(server)))
    return conninfo, settings


def _redacted_netloc(url: str) -> str:
    return urlsplit(redact(url)).netloc
