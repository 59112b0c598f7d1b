"""The embedded event store: streams in one SQLite file, shared by the processes of a
machine (the embedded log's file by default).

Appends run on the group-committing writer (``nervus.sql``): appends made while a
transaction commits go together into the next one, each with its own version check
and its own result. SQLite lets one transaction write at a time, so the rowid
(the position) follows commit order and a reader never finds an event appearing
below a position it has already read. Reads run at once on the event loop's thread,
on a reading connection of their own (a WAL reader never waits for a writer);
subscribers are woken at once by this process's appends and within
``poll_interval`` by other processes' (``PRAGMA data_version``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from nervus.core import Envelope
from nervus.core._urls import parse_options
from nervus.errors import (
    ConcurrencyError,
    ConfigurationError,
    EventIdConflict,
    StoreError,
    StoreUnavailable,
)
from nervus.sql._sqlite import Checkpointer, Connection, Errors, Writer
from nervus.sql._watch import Changes
from nervus.storage._contract import (
    AppendResult,
    EventStore,
    OutboxMessage,
    RecordedEvent,
    Snapshot,
    StoreTransaction,
)
from nervus.storage._rows import COLUMNS, recorded_events
from nervus.storage.sqlite import _outbox as outbox
from nervus.storage.sqlite._schema import INSERT, create_schema
from nervus.storage.sqlite._transaction import SqliteTransactions

_ERRORS = Errors(StoreUnavailable, StoreError)
# an append's one look before writing: the stream's version, and where the first
# event's id is stored, if it is (then the append is a repeat or a conflict)
_LOOKUP = (
    "SELECT (SELECT max(version) FROM nervus_events WHERE stream_id = ?), "
    "(SELECT position FROM nervus_events WHERE id = ?)"
)
_IDLE_WAIT = 1.0  # s a subscriber waits for a change before looking anyway


class SqliteStoreSettings(msgspec.Struct, kw_only=True):
    """Options of ``sqlite:///path.db?...`` as a store URL.

    ``synchronous``: ``full`` (an append survives power loss), ``normal`` (it
    survives a process crash) or ``off``. ``busy_timeout``: how long a write waits
    for another process's lock. ``poll_interval``: how often a waiting subscriber
    checks for other processes' commits. ``checkpoint_interval``: how often the WAL is
    copied into the database file (off the write path). ``commit_on_loop``: a lone
    write, when the event loop has nothing else to run, commits on the loop's thread
    instead of the writer's (a thread round trip costs more than the transaction's
    own work; the loop is held for that commit's fsync); ``false`` keeps every
    commit on the writer thread.
    """

    path: str
    synchronous: Literal["full", "normal", "off"] = "full"
    busy_timeout: float = 30.0
    poll_interval: float = 0.004
    checkpoint_interval: float = 0.5
    commit_on_loop: bool = True

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.path:
            problems.append(
                "the database path is empty; write sqlite:///relative.db or sqlite:////abs.db"
            )
        for name in ("busy_timeout", "poll_interval", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        return problems


class SqliteEventStore(EventStore):
    """Streams, the global log, snapshots and checkpoints in one SQLite file."""

    def __init__(self, settings: SqliteStoreSettings) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.path = os.path.abspath(settings.path)
        self.url = f"sqlite:///{settings.path}"
        sync, busy = settings.synchronous, settings.busy_timeout
        self._reader = Connection(
            self.path, name="store-reader", synchronous=sync, busy_timeout=busy, errors=_ERRORS
        )
        self._transactions = SqliteTransactions(
            Connection(
                self.path,
                name="store-transactions",
                synchronous=sync,
                busy_timeout=busy,
                errors=_ERRORS,
                waits=False,
            ),
            busy_timeout=busy,
            append=_append,
            rows=_rows,
            errors=_ERRORS,
            commit_on_loop=settings.commit_on_loop,
        )
        self._checkpointer = Checkpointer(
            self.path, interval=settings.checkpoint_interval, busy_timeout=busy, errors=_ERRORS
        )
        self._changes = Changes(self.path, poll_interval=settings.poll_interval, busy_timeout=busy)
        self._writer = Writer(
            self.path,
            synchronous=sync,
            busy_timeout=busy,
            on_commit=self._changes.notify,
            errors=_ERRORS,
            on_loop=settings.commit_on_loop,
        )
        self._connected = False
        self._closed = False
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_STORE") -> SqliteEventStore:
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigurationError(
                [
                    f"{key}={url!r}: a sqlite URL names a file: sqlite:///relative.db "
                    "or sqlite:////absolute/path.db"
                ]
            )
        return cls(parse_options(url, SqliteStoreSettings, key=key, path=parts.path[1:]))

    async def connect(self) -> None:
        async with self._connecting:  # callers racing to connect: one opens, the others wait
            await self._connect()

    async def _connect(self) -> None:
        if self._connected:
            return
        if self._closed:
            raise StoreError(f"the store {self.url} is closed")
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        await self._writer.open()
        try:
            await self._writer.submit(create_schema)
            await self._writer.submit(outbox.create_tables)
            await self._reader.open()
            await self._transactions.open()
            await self._checkpointer.start()
        except BaseException:
            await self._writer.close()
            raise
        self._connected = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._changes.close()
        await self._writer.close()  # lets queued appends commit
        await self._checkpointer.stop()
        await self._transactions.close()
        await self._reader.close()
        self._connected = False

    def _check(self) -> None:
        if not self._connected:
            raise StoreError(
                f"the store {self.url} is "
                + ("closed" if self._closed else "not connected: call connect() first")
            )

    # -- appending ----------------------------------------------------------------

    async def append(
        self, stream_id: str, events: Sequence[Envelope], expected_version: int | None
    ) -> AppendResult:
        self._check()
        if not events:
            raise ValueError(f"append to stream {stream_id!r} got no events")
        if expected_version is not None and expected_version < 0:
            raise ValueError(f"expected_version={expected_version} must be 0 or more, or ANY")
        rows = _rows(stream_id, events)
        result = await self._writer.submit(
            functools.partial(_append, stream_id=stream_id, rows=rows, expected=expected_version)
        )
        if isinstance(result, StoreError):
            raise result
        return result

    # -- reading ------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        self._check()
        if backwards:
            start = from_version if from_version is not None else 2**62
            sql = (
                f"SELECT {COLUMNS} FROM nervus_events WHERE stream_id = ? AND version <= ? "
                "ORDER BY version DESC LIMIT ?"
            )
        else:
            start = from_version if from_version is not None else 1
            sql = (
                f"SELECT {COLUMNS} FROM nervus_events WHERE stream_id = ? AND version >= ? "
                "ORDER BY version LIMIT ?"
            )
        return await self._reader.read(_select, sql, (stream_id, start, _limit(limit)))

    async def stream_version(self, stream_id: str) -> int:
        self._check()
        return await self._reader.read(_stream_version, stream_id)

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self._check()
        sql = f"SELECT {COLUMNS} FROM nervus_events WHERE position > ? ORDER BY position LIMIT ?"
        return await self._reader.read(_select, sql, (after, _limit(limit)))

    async def head(self) -> int:
        self._check()
        return await self._reader.read(_head)

    async def subscribe(
        self, after: int = 0, *, batch: int = 1000
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        self._check()
        # No reading ahead while the subscriber handles a batch (the PostgreSQL store
        # does): reads run on the event loop's thread, so there is nothing to overlap
        # (on a thread, giving up the GIL at every row, they made both sides slower).
        while not self._closed:
            seen = self._changes.version
            events = await self.read_all(after, batch)
            if events:
                after = events[-1].position
                yield events
            else:
                await self._changes.wait(seen, _IDLE_WAIT)

    # -- snapshots and checkpoints ------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check()
        await self._writer.submit(functools.partial(_save_snapshot, snapshot), durable=False)

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        self._check()
        return await self._reader.read(_load_snapshot, stream_id)

    async def save_checkpoint(self, name: str, position: int) -> None:
        self._check()
        await self._writer.submit(functools.partial(_save_checkpoint, name, position))

    async def load_checkpoint(self, name: str) -> int:
        self._check()
        return await self._reader.read(_load_checkpoint, name)

    async def list_checkpoints(self, prefix: str = "") -> dict[str, int]:
        self._check()
        return await self._reader.read(_list_checkpoints, prefix)

    # -- the outbox and the inbox ----------------------------------------------------

    async def outbox_batch(self, limit: int = 500) -> list[OutboxMessage]:
        self._check()
        return await self._reader.read(outbox.batch, _limit(limit))

    async def outbox_sent(self, ids: Sequence[int], *, at: float) -> None:
        self._check()
        if ids:
            await self._writer.submit(functools.partial(outbox.mark_sent, list(ids), at))

    async def outbox_purge(self, sent_before: float) -> int:
        self._check()
        return await self._writer.submit(functools.partial(outbox.purge, sent_before))

    async def outbox_counts(self) -> tuple[int, int]:
        self._check()
        return await self._reader.read(outbox.counts)

    async def outbox_reject(self, message: OutboxMessage, reason: str, *, at: float) -> None:
        self._check()
        await self._writer.submit(functools.partial(outbox.reject, message, reason, at))

    async def outbox_dead_letters(self, limit: int = 100) -> list[tuple[OutboxMessage, str]]:
        self._check()
        return await self._reader.read(outbox.dead_letters, _limit(limit))

    async def handled(self, group: str, message_id: str) -> bool:
        self._check()
        return await self._reader.read(outbox.handled, group, message_id)

    async def inbox_purge(self, before: float) -> int:
        self._check()
        return await self._writer.submit(functools.partial(outbox.purge_inbox, before))

    async def wait_for_change(self, seen: int, timeout: float) -> None:
        await self._changes.wait(seen, timeout)

    @property
    def change_count(self) -> int:
        return self._changes.version

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTransaction]:
        self._check()
        async with self._transactions.transaction(self._changes.notify) as tx:
            yield tx


# -- what runs on the connections' threads --------------------------------------


def _rows(stream_id: str, events: Sequence[Envelope]) -> list[tuple[object, ...]]:
    """The rows of an append, their versions still 0 (set in the transaction)."""
    return [
        (
            stream_id,
            0,
            e.id,
            e.type,
            e.source,
            e.time,
            e.subject,
            e.datacontenttype,
            e.dataschema,
            e.correlationid,
            e.causationid,
            e.traceparent,
            e.tracestate,
            e.data,
        )
        for e in events
    ]


def _limit(limit: int | None) -> int:
    if limit is None:
        return -1  # SQLite: no limit
    if limit < 1:
        raise ValueError(f"limit={limit} must be 1 or more")
    return limit


def _append(
    conn: sqlite3.Connection,
    *,
    stream_id: str,
    rows: list[tuple[object, ...]],
    expected: int | None,
) -> AppendResult | StoreError:
    """Append in the writer's transaction. A refusal decided before writing is
    returned, not raised, so the other appends of the transaction stand; a failure
    while inserting is raised (the writer then commits the others without it)."""
    if expected == 0 and len(rows) == 1:
        # A new stream's one event needs no look first: the unique (stream, version)
        # and id refuse it if the stream exists or the id is stored, and then the
        # look below tells which (a refused INSERT leaves the transaction as it was).
        with contextlib.suppress(sqlite3.IntegrityError):
            first = conn.execute(INSERT, (stream_id, 1, *rows[0][2:])).lastrowid
            assert first is not None  # set by every INSERT into a rowid table
            return AppendResult(stream_id, 1, first)
    version, stored_at = conn.execute(_LOOKUP, (stream_id, rows[0][2])).fetchone()
    if stored_at is not None:
        stored = conn.execute(
            "SELECT stream_id, version, position FROM nervus_events WHERE position = ?",
            (stored_at,),
        ).fetchone()
        return _already_appended(conn, stream_id, rows, stored)
    actual = int(version or 0)
    if expected is not None and expected != actual:
        return ConcurrencyError(stream_id, expected, actual)
    try:
        if len(rows) == 1:
            position: int | None = conn.execute(
                INSERT, (stream_id, actual + 1, *rows[0][2:])
            ).lastrowid
        else:
            versioned = [(row[0], actual + n, *row[2:]) for n, row in enumerate(rows, start=1)]
            conn.executemany(INSERT, versioned)
            position = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    except sqlite3.IntegrityError as exc:
        raise _id_conflict(conn, stream_id, rows) from exc
    assert position is not None  # set by every INSERT into a rowid table
    return AppendResult(stream_id, actual + len(rows), position)


def _already_appended(
    conn: sqlite3.Connection,
    stream_id: str,
    rows: list[tuple[object, ...]],
    first: tuple[str, int, int],
) -> AppendResult | StoreError:
    """The first event's id is stored: a repeated append is a no-op, anything else a
    conflict naming the id."""
    stored_stream, version, _ = first
    if stored_stream == stream_id:
        stored = conn.execute(
            "SELECT id, version, position FROM nervus_events WHERE stream_id = ? "
            "AND version >= ? ORDER BY version LIMIT ?",
            (stream_id, version, len(rows)),
        ).fetchall()
        if [r[0] for r in stored] == [row[2] for row in rows]:
            return AppendResult(stream_id, stored[-1][1], stored[-1][2])
    return _id_conflict(conn, stream_id, rows)


def _id_conflict(
    conn: sqlite3.Connection, stream_id: str, rows: list[tuple[object, ...]]
) -> EventIdConflict:
    for row in rows:
        found = conn.execute(
            "SELECT stream_id, version FROM nervus_events WHERE id = ?", (row[2],)
        ).fetchone()
        if found is not None:
            return EventIdConflict(
                stream_id, str(row[2]), f"stream {found[0]!r} version {found[1]}"
            )
    return EventIdConflict(stream_id, str(rows[0][2]), "an event appended in the same call")


def _stream_version(conn: sqlite3.Connection, stream_id: str) -> int:
    row = conn.execute(
        "SELECT max(version) FROM nervus_events WHERE stream_id = ?", (stream_id,)
    ).fetchone()
    return int(row[0] or 0)


def _head(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT max(position) FROM nervus_events").fetchone()[0] or 0)


def _select(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[RecordedEvent]:
    return recorded_events(conn.execute(sql, params))


def _save_snapshot(snapshot: Snapshot, conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO nervus_snapshots (stream_id, version, type, data) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
        "type = excluded.type, data = excluded.data "
        "WHERE excluded.version > nervus_snapshots.version",
        (snapshot.stream_id, snapshot.version, snapshot.type, snapshot.data),
    )


def _load_snapshot(conn: sqlite3.Connection, stream_id: str) -> Snapshot | None:
    row = conn.execute(
        "SELECT version, type, data FROM nervus_snapshots WHERE stream_id = ?", (stream_id,)
    ).fetchone()
    return None if row is None else Snapshot(stream_id, row[0], row[1], bytes(row[2]))


def _save_checkpoint(name: str, position: int, conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO nervus_checkpoints (name, position) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (name, position),
    )


def _load_checkpoint(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT position FROM nervus_checkpoints WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def _list_checkpoints(conn: sqlite3.Connection, prefix: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT name, position FROM nervus_checkpoints WHERE substr(name, 1, ?) = ? ORDER BY name",
        (len(prefix), prefix),
    ).fetchall()
    return {name: int(position) for name, position in rows}
