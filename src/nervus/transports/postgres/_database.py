"""Server connections used one operation at a time, and the group-committing publisher.

A psycopg connection serialises single statements, not transactions: two
coroutines running transactions on one connection would mix their statements.
``Connection.use()`` hands the connection to one operation at a time, reconnects
after the server or the network dropped it, and turns driver errors into nervus
errors naming the (redacted) URL. ``Reachability``, shared by the connections of
one transport, logs an outage once: a warning when the server is first found gone,
another when it answers again.

``Publisher`` coalesces the publishes of one process: those arriving while a
transaction is running go together into the next one, so concurrent publishes
cost one commit (one WAL flush) together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection

from nervus.errors import TransportError, TransportUnavailable

T = TypeVar("T")
Row = TypeVar("Row")

log = logging.getLogger("nervus.transports.postgres")


async def open_connection(conninfo: str, *, timeout: float) -> AsyncConnection[Any]:
    """An autocommit connection (explicit transactions with ``conn.transaction()``)
    exchanging text in UTF-8, as the binary arrays of ``_arrays`` are built."""
    return await AsyncConnection.connect(
        conninfo, autocommit=True, connect_timeout=max(int(timeout), 1), client_encoding="utf8"
    )


def as_transport_error(exc: BaseException, where: str) -> BaseException:
    """A driver error as a nervus error naming ``where``; other errors unchanged."""
    if isinstance(exc, TransportError) or not isinstance(exc, psycopg.Error):
        return exc
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        error: TransportError = TransportUnavailable(f"PostgreSQL at {where} failed: {exc}")
    else:
        error = TransportError(f"PostgreSQL at {where} refused an operation: {exc}")
    error.__cause__ = exc
    return error


def connection_lost(conn: AsyncConnection[Any], exc: BaseException) -> bool:
    """Whether ``exc`` cost ``conn`` its server connection (rather than failing one
    statement on a connection still usable)."""
    return conn.closed or conn.broken or isinstance(exc, psycopg.InterfaceError)


class Reachability:
    """Whether the server answers, shared by the connections of one transport so
    that an outage is logged once, however many connections and calls fail in it.

    ``lost`` logs a warning naming the URL and the error when the server is first
    found gone; failures while it is down, and failures of connections opened
    before the outage began (found stale once used again), are logged at debug
    level only. ``reached`` logs when a connection succeeds again. Failures before
    the first successful connection are not logged: ``connect()`` raises them.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.outages = 0  # outages so far; a connection remembers the count it opened at
        self.down_since: float | None = None
        self.error = ""  # the error that began the current outage
        self._ever_reached = False

    def lost(self, opened_at: int | None, exc: BaseException) -> None:
        """A connection opened when ``outages`` was ``opened_at`` (None: a connection
        attempt) failed with ``exc``."""
        known = opened_at is not None and opened_at < self.outages
        if self.down_since is not None or known or not self._ever_reached:
            log.debug("PostgreSQL at %s: %s", self.where, exc)
            return
        self.outages += 1
        self.down_since = time.monotonic()
        self.error = str(exc).strip() or type(exc).__name__
        log.warning(
            "PostgreSQL at %s is unreachable (%s); publishing fails with "
            "TransportUnavailable and consumers retry until the server answers again",
            self.where,
            self.error,
        )

    def reached(self) -> int:
        """A connection was opened: returns the outage count for it to remember."""
        self._ever_reached = True
        if self.down_since is not None:
            log.warning(
                "PostgreSQL at %s answers again after an outage of %.1f s",
                self.where,
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        return self.outages


class Connection:
    """One server connection, used by one operation at a time (see ``use``)."""

    def __init__(
        self, conninfo: str, *, where: str, timeout: float, reachability: Reachability
    ) -> None:
        self._conninfo = conninfo
        self.where = where
        self._timeout = timeout
        self._reachability = reachability
        self._opened_at = 0
        self._conn: AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        async with self._lock:
            await self._connected()

    async def _connected(self) -> AsyncConnection[Any]:
        if self._closed:
            raise TransportUnavailable(f"the connection to PostgreSQL at {self.where} is closed")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await open_connection(self._conninfo, timeout=self._timeout)
            except TimeoutError as exc:
                error = TransportUnavailable(
                    f"cannot connect to PostgreSQL at {self.where} within {self._timeout}s"
                )
                self._reachability.lost(None, error)
                raise error from exc
            except psycopg.Error as exc:
                self._reachability.lost(None, exc)
                raise TransportUnavailable(
                    f"cannot connect to PostgreSQL at {self.where}: {exc}"
                ) from exc
            self._conn = conn
            self._opened_at = self._reachability.reached()
        return conn

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection[Any]]:
        """The connection, for this operation alone; driver errors become
        ``TransportError`` (``TransportUnavailable`` when the connection failed)."""
        async with self._lock:
            conn = await self._connected()
            try:
                yield conn
            except psycopg.Error as exc:
                if connection_lost(conn, exc):
                    self._reachability.lost(self._opened_at, exc)
                raise as_transport_error(exc, self.where) from exc

    async def close(self, *, final: bool = True) -> None:
        """Close the server connection; for good unless ``final`` is false (then the
        next ``use`` connects again)."""
        self._closed = self._closed or final
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()


class Publisher:
    """Group commit: runs ``append(conn, publishes)`` over every publish queued while
    the previous transaction ran, in one transaction.

    If that transaction fails for a reason other than the connection, each publish
    of the group is tried again alone, so one bad message fails only its own
    publish. A caller that stops waiting (cancelled) does not undo its write.
    """

    def __init__(
        self,
        conn: Connection,
        append: Callable[[AsyncConnection[Any], list[Any]], Awaitable[None]],
        on_commit: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._append = append
        self._on_commit = on_commit
        self._queue: list[tuple[Any, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0  # committed so far; shows how well publishes coalesce

    async def submit(self, publish: Any) -> None:
        """Write ``publish`` (what ``append`` takes a list of); return once committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((publish, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await asyncio.shield(fut)

    async def drain(self) -> None:
        """Wait for the publishes queued so far."""
        task = self._task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def _run(self) -> None:
        batch: list[tuple[Any, asyncio.Future[None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._write([publish for publish, _ in batch])
                except Exception as exc:
                    if len(batch) == 1 or isinstance(exc, TransportUnavailable):
                        for _, fut in batch:
                            _fail(fut, exc)
                        continue
                    for publish, fut in batch:
                        try:
                            await self._write([publish])
                        except Exception as alone:
                            _fail(fut, alone)
                        else:
                            _done(fut)
                    continue
                for _, fut in batch:
                    _done(fut)
        except BaseException:
            # Cancelled (the event loop is closing): no publish may wait forever.
            stopped = TransportUnavailable(
                f"publishing to PostgreSQL at {self._conn.where} was interrupted; "
                "the messages may or may not have been written"
            )
            for _, fut in batch + self._queue:
                _fail(fut, stopped)
            self._queue = []
            raise
        finally:
            self._task = None

    async def _write(self, publishes: list[Any]) -> None:
        async with self._conn.use() as conn:
            await self._append(conn, publishes)
        self.transactions += 1
        self._on_commit()


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
