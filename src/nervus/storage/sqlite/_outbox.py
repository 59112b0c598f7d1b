"""The outbox and the inbox in the embedded store's file.

``nervus_outbox`` is a rowid table: the rowid is the enqueue order, and a partial
index over the unsent rows makes the relay's read one short range scan however
many sent rows are kept. ``nervus_inbox`` is keyed by (group, message id).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import msgspec

from nervus.storage._contract import OutboxMessage

DDL = """
CREATE TABLE IF NOT EXISTS nervus_outbox (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    key TEXT,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    sent REAL
);
CREATE INDEX IF NOT EXISTS nervus_outbox_unsent ON nervus_outbox (id) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS nervus_outbox_sent ON nervus_outbox (sent) WHERE sent IS NOT NULL;
CREATE TABLE IF NOT EXISTS nervus_outbox_dead (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    key TEXT,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    failed REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nervus_inbox (
    grp TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled REAL NOT NULL,
    PRIMARY KEY (grp, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nervus_inbox_age ON nervus_inbox (handled);
"""

_encode = msgspec.json.Encoder().encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode


def create_tables(conn: sqlite3.Connection) -> None:
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)


def enqueue(
    conn: sqlite3.Connection,
    channel: str,
    key: str | None,
    headers: dict[str, str],
    body: bytes,
    now: float,
) -> None:
    conn.execute(
        "INSERT INTO nervus_outbox (channel, key, headers, body, created) VALUES (?, ?, ?, ?, ?)",
        (channel, key, _encode(headers), body, now),
    )


def record_handled(conn: sqlite3.Connection, group: str, message_id: str, now: float) -> bool:
    inserted = conn.execute(
        "INSERT INTO nervus_inbox (grp, message_id, handled) VALUES (?, ?, ?) "
        "ON CONFLICT (grp, message_id) DO NOTHING",
        (group, message_id, now),
    ).rowcount
    return inserted == 1


def batch(conn: sqlite3.Connection, limit: int) -> list[OutboxMessage]:
    return [
        OutboxMessage(id_, channel, key, _decode_headers(headers), bytes(body), created)
        for id_, channel, key, headers, body, created in conn.execute(
            "SELECT id, channel, key, headers, body, created FROM nervus_outbox "
            "WHERE sent IS NULL ORDER BY id LIMIT ?",
            (limit,),
        )
    ]


def mark_sent(ids: Sequence[int], at: float, conn: sqlite3.Connection) -> None:
    conn.executemany("UPDATE nervus_outbox SET sent = ? WHERE id = ?", [(at, i) for i in ids])


def purge(sent_before: float, conn: sqlite3.Connection) -> int:
    return conn.execute(
        "DELETE FROM nervus_outbox WHERE sent IS NOT NULL AND sent < ?", (sent_before,)
    ).rowcount


def counts(conn: sqlite3.Connection) -> tuple[int, int]:
    pending = conn.execute("SELECT count(*) FROM nervus_outbox WHERE sent IS NULL").fetchone()[0]
    sent = conn.execute("SELECT count(*) FROM nervus_outbox WHERE sent IS NOT NULL").fetchone()[0]
    return int(pending), int(sent)


def handled(conn: sqlite3.Connection, group: str, message_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM nervus_inbox WHERE grp = ? AND message_id = ?", (group, message_id)
    ).fetchone()
    return row is not None


def purge_inbox(before: float, conn: sqlite3.Connection) -> int:
    return conn.execute("DELETE FROM nervus_inbox WHERE handled < ?", (before,)).rowcount


def reject(message: OutboxMessage, reason: str, at: float, conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO nervus_outbox_dead VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message.id,
            message.channel,
            message.key,
            _encode(message.headers),
            message.body,
            message.created,
            at,
            reason,
        ),
    )
    conn.execute("DELETE FROM nervus_outbox WHERE id = ?", (message.id,))


def dead_letters(conn: sqlite3.Connection, limit: int) -> list[tuple[OutboxMessage, str]]:
    return [
        (OutboxMessage(i, c, k, _decode_headers(h), bytes(b), created), reason)
        for i, c, k, h, b, created, reason in conn.execute(
            "SELECT id, channel, key, headers, body, created, reason FROM nervus_outbox_dead "
            "ORDER BY failed DESC, id DESC LIMIT ?",
            (limit,),
        )
    ]
