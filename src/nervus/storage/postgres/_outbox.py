"""The outbox and the inbox in the PostgreSQL store's schema.

The outbox's ids come from an identity column: enqueue order, not commit order,
so the relay reads what is unsent (a partial index keeps that a short scan), never
what lies past a position, and a row committed late is published late rather than
skipped. After a transaction that enqueued commits, a relay of the same process is
woken at once, and those of other processes by a ``NOTIFY`` on the schema's channel
sent outside the transaction, at most every ``wake_interval`` for all the commits
meanwhile (a ``NOTIFY`` in the transaction would make commits wait for each other
on the server's notification lock).

The relay's reads and marks run on a connection of their own (``RelayConnection``):
they never queue behind the transactions that hold the pool's connections, which
is when the outbox fills fastest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from nervus.storage._contract import OutboxMessage

DDL = """
CREATE TABLE IF NOT EXISTS {s}.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel text NOT NULL,
    key text,
    headers bytea NOT NULL,
    body bytea NOT NULL,
    created double precision NOT NULL,
    sent double precision
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON {s}.outbox (id) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS outbox_sent ON {s}.outbox (sent) WHERE sent IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.outbox_dead (
    id bigint PRIMARY KEY,
    channel text NOT NULL,
    key text,
    headers bytea NOT NULL,
    body bytea NOT NULL,
    created double precision NOT NULL,
    failed double precision NOT NULL,
    reason text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.inbox (
    grp text NOT NULL,
    message_id text NOT NULL,
    handled double precision NOT NULL,
    PRIMARY KEY (grp, message_id)
);
CREATE INDEX IF NOT EXISTS inbox_age ON {s}.inbox (handled);
"""

# The layout Debezium's outbox event router reads (``id``, ``aggregatetype``,
# ``aggregateid``, ``type``, ``payload``), plus the CloudEvents headers as JSON (route
# them to message headers with ``table.fields.additional.placement``). nervus's relay
# reads the same table in ``seq`` order; a team that publishes it with Debezium
# instead runs its services with ``NERVUS_RELAY=0``.
DEBEZIUM_DDL = """
CREATE TABLE IF NOT EXISTS {s}.outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL,
    aggregatetype text NOT NULL,
    aggregateid text,
    type text NOT NULL,
    payload bytea NOT NULL,
    headers jsonb NOT NULL,
    created double precision NOT NULL,
    sent double precision
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON {s}.outbox (seq) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS outbox_sent ON {s}.outbox (sent) WHERE sent IS NOT NULL;
"""

encode_headers = msgspec.json.Encoder().encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


LAYOUTS = ("nervus", "debezium")


class OutboxSql:
    """The statements of one schema, for the outbox ``layout`` (``nervus`` or
    ``debezium``)."""

    def __init__(self, schema: str, layout: str = "nervus") -> None:
        s = schema
        self.layout = layout
        self.ddl = DDL.format(s=s)
        self.layout_check = (
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'outbox' AND column_name = 'aggregatetype'"
        )
        self.enqueue = (
            f"INSERT INTO {s}.outbox (channel, key, headers, body, created) "
            "VALUES ($1, $2, $3, $4, $5)"
        )
        self.record = (
            f"INSERT INTO {s}.inbox (grp, message_id, handled) VALUES ($1, $2, $3) "
            "ON CONFLICT (grp, message_id) DO NOTHING"
        )
        self.batch = (
            f"SELECT id, channel, key, headers, body, created FROM {s}.outbox "
            "WHERE sent IS NULL ORDER BY id LIMIT $1"
        )
        self.sent = f"UPDATE {s}.outbox SET sent = $2 WHERE id = ANY($1::bigint[])"
        self.purge = f"DELETE FROM {s}.outbox WHERE sent IS NOT NULL AND sent < $1"
        self.counts = (
            "SELECT count(*) FILTER (WHERE sent IS NULL), "
            f"count(*) FILTER (WHERE sent IS NOT NULL) FROM {s}.outbox"
        )
        self.reject = (
            f"WITH gone AS (DELETE FROM {s}.outbox WHERE id = $1 RETURNING id) "
            f"INSERT INTO {s}.outbox_dead SELECT $1, $2, $3, $4, $5, $6, $7, $8 "
            "ON CONFLICT (id) DO NOTHING"
        )
        self.dead = (
            f"SELECT id, channel, key, headers, body, created, reason FROM {s}.outbox_dead "
            "ORDER BY failed DESC, id DESC LIMIT $1"
        )
        self.handled = f"SELECT 1 FROM {s}.inbox WHERE grp = $1 AND message_id = $2"
        self.purge_inbox = f"DELETE FROM {s}.inbox WHERE handled < $1"
        if layout == "debezium":
            self._debezium(s)

    def _debezium(self, s: str) -> None:
        # the nervus layout's tables, the outbox's replaced (created first, so the
        # nervus DDL's "IF NOT EXISTS" leaves it)
        self.ddl = DEBEZIUM_DDL.format(s=s) + self.ddl
        self.enqueue = (
            f"INSERT INTO {s}.outbox (id, aggregatetype, aggregateid, type, payload, headers, "
            "created) VALUES ($6, $1, $2, $7, $4, convert_from($3, 'UTF8')::jsonb, $5)"
        )
        self.batch = (
            "SELECT seq, aggregatetype, aggregateid, convert_to(headers::text, 'UTF8'), "
            f"payload, created FROM {s}.outbox WHERE sent IS NULL ORDER BY seq LIMIT $1"
        )
        self.sent = f"UPDATE {s}.outbox SET sent = $2 WHERE seq = ANY($1::bigint[])"
        self.reject = (
            f"WITH gone AS (DELETE FROM {s}.outbox WHERE seq = $1 RETURNING seq) "
            f"INSERT INTO {s}.outbox_dead SELECT $1, $2, $3, $4, $5, $6, $7, $8 "
            "ON CONFLICT (id) DO NOTHING"
        )

    def enqueue_args(
        self, channel: str, key: str | None, headers: dict[str, str], body: bytes, now: float
    ) -> tuple[object, ...]:
        """The parameters of ``enqueue`` for a message."""
        encoded = encode_headers(headers)
        if self.layout == "debezium":
            return (
                channel,
                key,
                encoded,
                body,
                now,
                headers.get("ce_id", ""),
                headers.get("ce_type", ""),
            )
        return (channel, key, encoded, body, now)


def messages(rows: Sequence[Any]) -> list[OutboxMessage]:
    return [OutboxMessage(r[0], r[1], r[2], _decode_headers(r[3]), r[4], r[5]) for r in rows]


def count(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class RelayConnection:
    """One connection for the outbox relay's statements, opened on first use, opened
    again after it broke; one statement at a time."""

    def __init__(self, dsn: str, connect_timeout: float) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self._lock:
            conn = self._conn
            try:
                if conn is None or conn.is_closed():
                    conn = self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
                rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
                return rows
            except asyncpg.PostgresError:
                raise  # refused by the server: the connection is fine
            except BaseException:
                self._conn = None  # broken or interrupted: the next call connects again
                if conn is not None:
                    conn.terminate()
                raise

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
