"""The event store's tables in SQLite, beside the embedded log's in the same file.

``nervus_events`` is a rowid table: the rowid is the global position, and SQLite
writes one transaction at a time, so positions follow commit order. The stream
index ``(stream_id, version)`` is unique (the concurrency check's last line of
defence) and so is the event id (idempotent appends). The CloudEvents attributes
are columns, not a JSON document: reading them back costs no parsing.
"""

from __future__ import annotations

import sqlite3

DDL = """
CREATE TABLE IF NOT EXISTS nervus_events (
    position INTEGER PRIMARY KEY,
    stream_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    time TEXT NOT NULL,
    subject TEXT,
    content_type TEXT NOT NULL,
    dataschema TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    traceparent TEXT,
    tracestate TEXT,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS nervus_events_stream ON nervus_events (stream_id, version);
CREATE UNIQUE INDEX IF NOT EXISTS nervus_events_id ON nervus_events (id);
CREATE TABLE IF NOT EXISTS nervus_snapshots (
    stream_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_checkpoints (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
"""


INSERT = (
    "INSERT INTO nervus_events (stream_id, version, id, type, source, time, subject, "
    "content_type, dataschema, correlation_id, causation_id, traceparent, tracestate, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables if they are missing (inside the writer's transaction)."""
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)
