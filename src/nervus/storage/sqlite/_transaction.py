"""Transactions of the embedded store that span the caller's awaits.

The group-committing writer runs whole operations on its thread; a transaction
whose statements come one by one from async code (a projection's handlers, a
service's own writes) needs a connection of its own, held from ``BEGIN IMMEDIATE``
to ``COMMIT``. SQLite writes one transaction at a time, so meanwhile every other
write to the file waits (up to ``busy_timeout``): keep them short.

The statements run on the event loop's thread, at once. Each takes microseconds,
and a hop to another thread per statement would hold the write lock, and every
other writer, for as long as the busy event loop takes to come back to the
transaction. ``BEGIN IMMEDIATE`` is tried there too, giving up at once if another
connection writes: then it waits on the connection's thread. ``COMMIT`` runs there
when it needs no fsync (``synchronous`` other than ``full``), or when the event
loop has nothing else to run (``commit_on_loop``); otherwise on the connection's
thread, so the loop goes on while the fsync waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from nervus.core import Envelope
from nervus.errors import StoreError
from nervus.sql._sqlite import Connection, Errors, is_busy, loop_is_idle, retry_busy
from nervus.storage._contract import AppendResult, StoreTransaction
from nervus.storage.sqlite import _outbox as outbox


class SqliteTransactions:
    """One connection (and thread) for transactions, used by one at a time."""

    def __init__(
        self,
        connection: Connection,
        *,
        busy_timeout: float,
        append: Callable[..., AppendResult | StoreError],
        rows: Callable[[str, Sequence[Envelope]], list[tuple[object, ...]]],
        errors: Errors,
        commit_on_loop: bool = True,
    ) -> None:
        self._errors = errors
        self._conn = connection  # opened without a busy handler (``waits=False``)
        self._busy_timeout = busy_timeout
        self._commit_on_loop = commit_on_loop
        self._append = append
        self._rows = rows
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        await self._conn.open()

    async def close(self) -> None:
        async with self._lock:  # a running transaction ends first
            await self._conn.close()

    @asynccontextmanager
    async def transaction(self, on_commit: Callable[[], None]) -> AsyncIterator[StoreTransaction]:
        async with self._lock:
            try:
                await self._begin()
            except sqlite3.Error as exc:
                raise self._errors.convert(exc, self._conn.path) from exc
            tx = SqliteTransaction(self._conn, self._append, self._rows)
            try:
                yield tx
            except BaseException:
                _rollback(self._conn.raw)
                raise
            await self._commit()
            if tx.changed:
                on_commit()

    async def _begin(self) -> None:
        try:
            self._conn.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            await self._conn.run(retry_busy, "BEGIN IMMEDIATE", self._busy_timeout)

    async def _commit(self) -> None:
        conn = self._conn
        try:
            if conn.synchronous != "FULL" or (
                self._commit_on_loop and loop_is_idle(asyncio.get_running_loop())
            ):
                _commit(conn.raw)
            else:
                await conn.run(_commit)
        except BaseException:
            _rollback(conn.raw)  # a commit that failed leaves the transaction open
            raise


class SqliteTransaction(StoreTransaction):
    dialect = "sqlite"
    namespace = ""

    def __init__(
        self,
        conn: Connection,
        append: Callable[..., AppendResult | StoreError],
        rows: Callable[[str, Sequence[Envelope]], list[tuple[object, ...]]],
    ) -> None:
        self._conn = conn
        self._append_fn = append
        self._rows = rows
        self.changed = False  # appended or enqueued: waiting readers look again

    @property
    def connection(self) -> sqlite3.Connection:
        """The transaction's sqlite3 connection (autocommit mode, the transaction begun
        explicitly), for statements in its own style on the event loop's thread while
        the transaction is open. Never commit, roll back or close it."""
        return self._conn.raw

    async def append(
        self, stream_id: str, events: Sequence[Envelope], expected_version: int | None
    ) -> AppendResult:
        if not events:
            raise ValueError(f"append to stream {stream_id!r} got no events")
        rows = self._rows(stream_id, events)
        if expected_version is not None and expected_version < 0:
            raise ValueError(f"expected_version={expected_version} must be 0 or more, or ANY")
        result = _in_savepoint(self._conn.raw, self._append_fn, stream_id, rows, expected_version)
        if isinstance(result, StoreError):
            raise result
        self.changed = True
        return result

    async def execute(self, sql: str, *params: object) -> int:
        return _execute(self._conn.raw, sql, params)

    async def fetch(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        return _fetch(self._conn.raw, sql, params)

    async def load_checkpoint(self, name: str) -> int:
        rows = await self.fetch("SELECT position FROM nervus_checkpoints WHERE name = ?", name)
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    async def move_checkpoint(self, name: str, expected: int, position: int) -> bool:
        return _move_checkpoint(self._conn.raw, name, expected, position)

    async def enqueue(
        self, channel: str, key: str | None, headers: dict[str, str], body: bytes
    ) -> None:
        outbox.enqueue(self._conn.raw, channel, key, headers, body, time.time())
        self.changed = True

    async def record_handled(self, group: str, message_id: str) -> bool:
        return outbox.record_handled(self._conn.raw, group, message_id, time.time())


def _in_savepoint(
    conn: sqlite3.Connection,
    append: Callable[..., AppendResult | StoreError],
    stream_id: str,
    rows: list[tuple[object, ...]],
    expected: int | None,
) -> AppendResult | StoreError:
    conn.execute("SAVEPOINT nervus_append")
    try:
        result = append(conn, stream_id=stream_id, rows=rows, expected=expected)
    except BaseException:
        conn.execute("ROLLBACK TO nervus_append")
        conn.execute("RELEASE nervus_append")
        raise
    conn.execute("RELEASE nervus_append")
    return result


def _execute(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> int:
    return conn.execute(sql, params).rowcount


def _fetch(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> list[tuple[object, ...]]:
    return conn.execute(sql, params).fetchall()


def _move_checkpoint(conn: sqlite3.Connection, name: str, expected: int, position: int) -> bool:
    conn.execute(
        "INSERT INTO nervus_checkpoints (name, position) VALUES (?, 0) "
        "ON CONFLICT (name) DO NOTHING",
        (name,),
    )
    moved = conn.execute(
        "UPDATE nervus_checkpoints SET position = ? WHERE name = ? AND position = ?",
        (position, name, expected),
    ).rowcount
    return moved == 1


def _commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
