"""The tables of the embedded log, all in one SQLite file.

``nervus_log`` appends rows in commit order (its rowid) and indexes them by
``(chan, part, off)``, so appending touches the end of two b-trees and reading a
partition from an offset is one index range scan (measured faster to write than a
table clustered on ``(chan, part, off)``, whose rows of ~600 bytes split pages
in eight places per batch); offsets are dense per partition
and ``nervus_partitions.head`` (the next offset) never goes back, even when
retention deletes every message of a partition. Timestamps never decrease within a
partition (``last_ts``), so a time maps to an offset by bisection.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS nervus_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_channels (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    partitions INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nervus_partitions (
    chan INTEGER NOT NULL,
    part INTEGER NOT NULL,
    head INTEGER NOT NULL DEFAULT 0,
    last_ts REAL NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chan, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_log (
    seq INTEGER PRIMARY KEY,
    chan INTEGER NOT NULL,
    part INTEGER NOT NULL,
    off INTEGER NOT NULL,
    ts REAL NOT NULL,
    key TEXT,
    headers BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS nervus_log_position ON nervus_log (chan, part, off);
CREATE TABLE IF NOT EXISTS nervus_offsets (
    grp TEXT NOT NULL,
    chan INTEGER NOT NULL,
    part INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    PRIMARY KEY (grp, chan, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_groups (
    grp TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_members (
    grp TEXT NOT NULL,
    member TEXT NOT NULL,
    channels TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_owners (
    grp TEXT NOT NULL,
    chan INTEGER NOT NULL,
    part INTEGER NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (grp, chan, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nervus_retries (
    grp TEXT NOT NULL,
    chan INTEGER NOT NULL,
    part INTEGER NOT NULL,
    off INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    due REAL NOT NULL,
    PRIMARY KEY (grp, chan, part, off)
) WITHOUT ROWID;
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables if missing (inside the caller's write transaction) and check
    the file was not written by an incompatible version."""
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)
    row = conn.execute("SELECT value FROM nervus_meta WHERE name = 'schema_version'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO nervus_meta (name, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
    elif int(row[0]) != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"the file has nervus schema version {row[0]}, this nervus reads version "
            f"{SCHEMA_VERSION}; use a matching nervus version or a new file"
        )
