"""The three sides of the store benchmark, each doing the same work its own way.

Every side runs the same sequence on a database of its own (a fresh file, or a
fresh PostgreSQL schema) and the worker times each step:

``append_one``   single-event commands on new aggregates, one at a time
``append_many``  the same, ``width`` commands in flight from one process
``seed``         orders of 10 events, written in bulk (not timed)
``cycles``       load an order, decode and fold its 10 events, decide, append one
``fill``         more orders written in bulk until the log holds ``--events`` (not timed)
``read_all``     every event in position order, in pages, decoded into its class

The methods are coroutines on every side so the worker drives them alike; the
raw and eventsourcing sides block inside them (they have no event loop of
their own to share).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg

from benchmarks._store_model import (
    RAW_DECODERS,
    SOURCE,
    Orders,
    RefusedError,
    fold,
    item,
    placed,
    raw_row,
    stream_name,
)
from nervus import Envelope
from nervus.codecs import JSON_CODEC
from nervus.domain import EventDecoder
from nervus.storage import NO_STREAM, EventStore, store_from_url

ORDER_EVENTS = 10  # events of each order a cycle loads
BULK = 1000  # events per untimed bulk write

RAW_INSERT = (
    "INSERT INTO {table} (stream_id, version, id, type, source, time, subject, "
    "content_type, dataschema, correlation_id, causation_id, traceparent, tracestate, data) "
    "VALUES ({marks})"
)
RAW_SELECT_STREAM = (
    "SELECT type, data FROM {table} WHERE stream_id = {p} ORDER BY version LIMIT {p}"
)
RAW_SELECT_ALL = (
    "SELECT position, stream_id, version, id, type, source, time, subject, content_type, "
    "dataschema, correlation_id, causation_id, traceparent, tracestate, data "
    "FROM {table} WHERE position > {p} ORDER BY position LIMIT {p}"
)


class Side:
    """What every side does; ``describe`` says how, for the JSON document."""

    how: str = ""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def append_one(self, start: int, count: int) -> None:
        raise NotImplementedError

    async def prepare(self, width: int) -> None:
        """Before ``append_many`` is timed: what a side sets up once (connections)."""

    async def append_many(self, start: int, count: int, width: int) -> None:
        raise NotImplementedError

    async def seed(self, start: int, count: int) -> None:
        raise NotImplementedError

    async def cycles(self, start: int, count: int) -> None:
        raise NotImplementedError

    async def read_all(self, page: int) -> int:
        raise NotImplementedError


# -- nervus ---------------------------------------------------------------------------


def _envelope(e: Any) -> Envelope:
    return Envelope.new(type=e.__message_type__, source=SOURCE, data=JSON_CODEC.encode(e))


_DECODER = EventDecoder()
_decode = _DECODER.decode  # what a nervus user reads stored events with (upcasting included)


class NervusSide(Side):
    how = (
        "store_from_url(url); a command builds one typed event, encodes it with "
        "JSON_CODEC, wraps it in Envelope.new and calls append(stream, [envelope], "
        "NO_STREAM); 'many' keeps `width` such calls in flight as asyncio tasks (group "
        "commit); a cycle is read_stream + EventDecoder().decode per event (type lookup, "
        "upcasting if needed, JSON decoding), "
        "a fold, then append(..., expected_version=10); reading is subscribe(0, batch=page) "
        "up to the head, each event decoded the same way"
    )

    def __init__(self, url: str) -> None:
        self.store: EventStore = store_from_url(url)

    async def open(self) -> None:
        await self.store.connect()

    async def close(self) -> None:
        await self.store.close()

    async def _place(self, n: int) -> None:
        await self.store.append(stream_name(n), [_envelope(placed(n))], NO_STREAM)

    async def append_one(self, start: int, count: int) -> None:
        for n in range(start, start + count):
            await self._place(n)

    async def append_many(self, start: int, count: int, width: int) -> None:
        numbers = iter(range(start, start + count))

        async def issue() -> None:
            for n in numbers:
                await self._place(n)

        await asyncio.gather(*(issue() for _ in range(width)))

    async def seed(self, start: int, count: int) -> None:
        numbers = iter(range(start, start + count))

        async def write() -> None:
            for n in numbers:
                events = [placed(n), *(item(n, k) for k in range(1, ORDER_EVENTS))]
                await self.store.append(stream_name(n), [_envelope(e) for e in events], NO_STREAM)

        await asyncio.gather(*(write() for _ in range(BULK // ORDER_EVENTS)))

    async def cycles(self, start: int, count: int) -> None:
        store = self.store
        for n in range(start, start + count):
            stream = stream_name(n)
            recorded = await store.read_stream(stream)
            state = fold([_decode(r) for r in recorded])
            new = item(n, len(recorded))
            if not state.may_add(new.quantity):
                raise RefusedError(stream)
            await store.append(stream, [_envelope(new)], recorded[-1].version)

    async def read_all(self, page: int) -> int:
        head = await self.store.head()
        read = 0
        async for events in self.store.subscribe(0, batch=page):
            for r in events:
                _decode(r)
            read += len(events)
            if events[-1].position >= head:
                return read
        return read


# -- raw drivers ----------------------------------------------------------------------


class RawSide(Side):
    """One INSERT + commit per command on a connection of its own; 'many' runs `width`
    threads, each with its own connection (opened before the timing); reading is one
    SELECT per page ordered by position, each payload decoded by msgspec into its class."""

    mark = "?"

    def __init__(self, connect: Callable[[], Any], table: str) -> None:
        self._connect = connect
        self.table = table
        marks = ", ".join([self.mark] * 14)
        self.insert = RAW_INSERT.format(table=table, marks=marks)
        self.select_stream = RAW_SELECT_STREAM.format(table=table, p=self.mark)
        self.select_all = RAW_SELECT_ALL.format(table=table, p=self.mark)
        self.conn: Any = None
        self.connections: list[Any] = []  # one per thread of append_many

    async def open(self) -> None:
        self.conn = self._connect()

    async def close(self) -> None:
        for conn in [self.conn, *self.connections]:
            if conn is not None:
                conn.close()

    def _place(self, conn: Any, n: int) -> None:
        conn.execute(self.insert, raw_row(stream_name(n), 1, placed(n)))
        conn.commit()

    async def append_one(self, start: int, count: int) -> None:
        conn = self.conn
        for n in range(start, start + count):
            self._place(conn, n)

    async def prepare(self, width: int) -> None:
        while len(self.connections) < width:
            self.connections.append(self._connect())

    async def append_many(self, start: int, count: int, width: int) -> None:
        numbers = iter(range(start, start + count))
        lock = threading.Lock()

        def issue(conn: Any) -> None:
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                self._place(conn, n)

        with ThreadPoolExecutor(width) as pool:
            for done in [pool.submit(issue, conn) for conn in self.connections[:width]]:
                done.result()

    async def seed(self, start: int, count: int) -> None:
        rows: list[tuple[Any, ...]] = []
        for n in range(start, start + count):
            stream = stream_name(n)
            rows.append(raw_row(stream, 1, placed(n)))
            rows.extend(raw_row(stream, k + 1, item(n, k)) for k in range(1, ORDER_EVENTS))
            if len(rows) >= BULK:
                self._bulk(rows)
                rows = []
        if rows:
            self._bulk(rows)

    def _bulk(self, rows: list[tuple[Any, ...]]) -> None:
        cursor = self.conn.cursor()
        cursor.executemany(self.insert, rows)
        self.conn.commit()

    async def cycles(self, start: int, count: int) -> None:
        conn = self.conn
        for n in range(start, start + count):
            stream = stream_name(n)
            rows = conn.execute(self.select_stream, (stream, 1000)).fetchall()
            state = fold([RAW_DECODERS[t].decode(d) for t, d in rows])
            new = item(n, len(rows))
            if not state.may_add(new.quantity):
                raise RefusedError(stream)
            conn.execute(self.insert, raw_row(stream, len(rows) + 1, new))
            conn.commit()

    async def read_all(self, page: int) -> int:
        after, read = 0, 0
        while True:
            rows = self.conn.execute(self.select_all, (after, page)).fetchall()
            if not rows:
                return read
            for row in rows:
                RAW_DECODERS[row[4]].decode(row[14])
            read += len(rows)
            after = rows[-1][0]
            self.conn.commit()  # end the read transaction (psycopg opens one)


class RawSqliteSide(RawSide):
    how = (
        "sqlite3, WAL, synchronous=FULL, the default (deferred) transactions: "
        "execute(INSERT) + commit() per command; 'many': `width` threads, each with a "
        "connection of its own; reading: SELECT ... WHERE position > ? ORDER BY position "
        "LIMIT page, msgspec decoding each payload"
    )

    def __init__(self, path: str) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            return conn

        super().__init__(connect, "nervus_events")


class RawPostgresSide(RawSide):
    how = (
        "psycopg 3 (sync, the driver most Python code uses, the one eventsourcing uses): "
        "execute(INSERT) + commit() per command; 'many': `width` threads, each with a "
        "connection of its own; reading: SELECT ... WHERE position > %s ORDER BY position "
        "LIMIT page, msgspec decoding each payload"
    )
    mark = "%s"

    def __init__(self, dsn: str, schema: str) -> None:
        super().__init__(lambda: psycopg.connect(dsn), f"{schema}.events")

    def _bulk(self, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(self.insert, rows)
        self.conn.commit()


# -- eventsourcing --------------------------------------------------------------------


class EventsourcingSide(Side):
    how = (
        "eventsourcing's Application with an Aggregate whose command methods trigger one "
        "event each; app.save(order) per command; 'many' runs `width` threads (its "
        "application is synchronous); a cycle is repository.get + the command + save; "
        "reading is recorder.select_notifications pages (its notification log's own pages "
        "hold 10) decoded by app.mapper.to_domain_event"
    )

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.app: Orders | None = None
        self.ids: dict[int, UUID] = {}

    async def open(self) -> None:
        self.app = Orders(env=self.env)

    async def close(self) -> None:
        if self.app is not None:
            self.app.close()

    def _app(self) -> Orders:
        assert self.app is not None
        return self.app

    async def append_one(self, start: int, count: int) -> None:
        app = self._app()
        for n in range(start, start + count):
            app.place(n)

    async def append_many(self, start: int, count: int, width: int) -> None:
        app = self._app()
        with ThreadPoolExecutor(width) as pool:
            for done in [pool.submit(app.place, n) for n in range(start, start + count)]:
                done.result()

    async def seed(self, start: int, count: int) -> None:
        app = self._app()
        per_save = BULK // ORDER_EVENTS
        for first in range(start, start + count, per_save):
            orders = {
                n: app.new_order(n, ORDER_EVENTS)
                for n in range(first, min(first + per_save, start + count))
            }
            app.save(*orders.values())
            self.ids.update((n, order.id) for n, order in orders.items())

    async def cycles(self, start: int, count: int) -> None:
        app = self._app()
        for n in range(start, start + count):
            app.add_item(self.ids[n], n, ORDER_EVENTS)

    async def read_all(self, page: int) -> int:
        app = self._app()
        recorder, mapper = app.recorder, app.mapper
        start, read = 1, 0
        while True:
            notifications = recorder.select_notifications(start, page)
            if not notifications:
                return read
            for notification in notifications:
                mapper.to_domain_event(notification)
            read += len(notifications)
            start = notifications[-1].id + 1
