"""SQLite connections that run on threads of their own, and the group-committing writer.

Shared by the embedded log (``nervus.transports.sqlite``) and the embedded event
store (``nervus.storage.sqlite``): each passes the ``Errors`` its callers expect.

SQLite work runs on the event loop's thread when it cannot wait long, and on the
thread of its connection when it may: reads (a WAL reader never waits for a
writer), an attempt to begin a write transaction that gives up at once if another
connection writes, and commits that need no fsync run where they are called; a
wait for another process's lock, and an fsync while the event loop has other work
to do, run on the connection's thread. A thread round trip costs more than most
statements (150-200 µs of CPU on a small virtual machine, where a read by primary
key takes a few), and a thread that gives up the GIL at every row competes with
the event loop for it. Writes go through ``Writer``: operations submitted while a
transaction is running are coalesced into the next one, so many concurrent
publishes, offset commits and lease renewals cost one ``BEGIN IMMEDIATE`` ...
``COMMIT`` (one fsync) together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nervus.errors import NervusError

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

log = logging.getLogger("nervus.sql")


class Errors:
    """The error classes a user of these connections raises: ``unavailable`` when the
    database cannot be used now (retryable), ``failed`` for any other SQLite error.
    Both take one message."""

    def __init__(self, unavailable: type[NervusError], failed: type[NervusError]) -> None:
        self.unavailable = unavailable
        self.failed = failed

    def convert(self, exc: BaseException, path: str) -> BaseException:
        """``exc`` as one of these errors naming the database; nervus errors unchanged."""
        if isinstance(exc, NervusError):
            return exc
        if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
            error = self.unavailable(
                f"the SQLite database {path} stayed locked by another process beyond "
                f"busy_timeout ({exc}); raise busy_timeout or reduce the writers"
            )
        elif isinstance(exc, sqlite3.Error):
            error = self.failed(f"SQLite write to {path} failed: {exc}")
        else:
            return exc
        error.__cause__ = exc
        return error


_LOCKED = ("database is locked", "database table is locked", "database schema is locked")


def is_busy(exc: sqlite3.OperationalError) -> bool:
    return any(text in str(exc) for text in _LOCKED)


def loop_is_idle(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` has no callback ready to run besides the current one (only
    asyncio's own loops tell; any other counts as busy)."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def retry_busy(conn: sqlite3.Connection, sql: str, busy_timeout: float) -> None:
    """Execute ``sql``, retrying while another process holds the lock.

    The writer's own short sleeps (0.2-2 ms) replace SQLite's busy handler, whose
    back-off grows to 100 ms and would show up as latency under contention.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.0002
    while True:
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def open_connection(
    path: str, *, writer: bool, synchronous: str, busy_timeout: float
) -> sqlite3.Connection:
    """A connection in WAL mode with nervus's settings. The writer handles "busy"
    itself (``retry_busy``); readers let SQLite wait up to ``busy_timeout``."""
    conn = sqlite3.connect(
        path,
        timeout=0.0 if writer else busy_timeout,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        if writer:
            retry_busy(conn, "PRAGMA journal_mode=WAL", busy_timeout)
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-16000")
        # Checkpoints run on their own connection and thread (``checkpoint``),
        # so a commit never waits for the WAL to be copied into the database.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA journal_size_limit=67108864")  # truncate a grown WAL
    except BaseException:
        conn.close()
        raise
    return conn


class Connection:
    """A SQLite connection with a thread of its own: ``run`` calls a function on it
    there, ``read`` on the caller's thread (the writer has its own, see ``Writer``).

    ``waits=False`` opens it without SQLite's busy handler: a statement that finds
    the database locked fails at once (``retry_busy`` waits on the thread instead).
    """

    def __init__(
        self,
        path: str,
        *,
        name: str,
        synchronous: str,
        busy_timeout: float,
        errors: Errors,
        waits: bool = True,
    ) -> None:
        self.path = path
        self.name = name
        self.synchronous = synchronous.upper()
        self._errors = errors
        self._busy_timeout = busy_timeout
        self._waits = waits
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._on_thread = 0  # calls running or queued on the thread

    async def open(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"nervus-sqlite-{self.name}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        self._conn = open_connection(
            self.path,
            writer=not self._waits,
            synchronous=self.synchronous,
            busy_timeout=self._busy_timeout,
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the connection's thread."""
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise self._errors.unavailable(f"the SQLite connection to {self.path} is not open")
        loop = asyncio.get_running_loop()
        self._on_thread += 1
        try:
            return await loop.run_in_executor(executor, fn, conn, *args)
        finally:
            self._on_thread -= 1

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the caller's thread, at once: for reads, which
        in WAL mode never wait for a writer. While the connection's thread is busy
        with it, on that thread after it."""
        if self._on_thread:
            return await self.run(fn, *args)
        return fn(self.raw, *args)

    @property
    def raw(self) -> sqlite3.Connection:
        """The connection itself, for short statements on the caller's thread while
        nothing runs on the connection's own (the caller makes sure of that)."""
        if self._conn is None:
            raise self._errors.unavailable(f"the SQLite connection to {self.path} is not open")
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)


_RESTART_FRAMES = 1000  # SQLite's own wal_autocheckpoint


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Copy committed WAL frames into the database; returns SQLite's (busy, frames in
    the WAL, frames checkpointed).

    Usually without blocking writers or readers (``PASSIVE``). But under a steady
    stream of commits such a checkpoint never catches the last frame, so the WAL is
    never started over from its beginning: it keeps growing, and an fsync of a file
    that grew costs more than one of a file written in place (about 1.5 times the
    CPU and time of a single-event commit here). Once the WAL holds
    ``_RESTART_FRAMES`` frames, the checkpoint holds new writers back (``RESTART``,
    waiting at most ``busy_timeout`` of this connection) while it copies what is
    left, so the next commit writes the WAL from its start again.
    """
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if frames >= _RESTART_FRAMES:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    return int(busy), int(frames), int(done)


class Checkpointer:
    """Copies the WAL into the database file every ``interval`` seconds, on a
    connection and a thread of its own (``wal_autocheckpoint`` is off on every
    connection, so commits never wait for it). Without it the WAL would grow until
    the last connection closes, and reads would slow down as it grows."""

    def __init__(self, path: str, *, interval: float, busy_timeout: float, errors: Errors) -> None:
        self.path = path
        self.interval = interval
        # a RESTART checkpoint holds writers back while it waits: briefly, or next time
        self._conn = Connection(
            path,
            name="checkpoint",
            synchronous="normal",
            busy_timeout=min(busy_timeout, 0.2),
            errors=errors,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._conn.open()
        self._task = asyncio.create_task(self._loop(), name=f"nervus-checkpoint {self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._conn.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._conn.run(checkpoint)
            except sqlite3.Error:
                log.warning("checkpointing the WAL of %s failed", self.path, exc_info=True)


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _run_batch(conn: sqlite3.Connection, ops: list[Operation], busy_timeout: float) -> list[object]:
    """Run every operation in one write transaction. If one fails, the transaction is
    rolled back and each operation runs again in a transaction of its own, so one
    failing operation does not undo the others (savepoints would cost two more
    statements per operation on every batch, not only on failure)."""
    try:
        return _transaction(conn, ops, busy_timeout)
    except _OperationFailed as failed:
        if len(ops) == 1:
            return [_Failed(failed.error)]
    results: list[object] = []
    for op in ops:
        try:
            results.append(_transaction(conn, [op], busy_timeout)[0])
        except _OperationFailed as failed:
            results.append(_Failed(failed.error))
    return results


class _OperationFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _transaction(
    conn: sqlite3.Connection, ops: list[Operation], busy_timeout: float
) -> list[object]:
    retry_busy(conn, "BEGIN IMMEDIATE", busy_timeout)
    try:
        results: list[object] = []
        for op in ops:
            try:
                results.append(op(conn))
            except Exception as exc:
                raise _OperationFailed(exc) from exc
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class Writer:
    """Coalesces write operations from many callers into few transactions.

    The writer has a thread and a connection of its own. The thread takes every
    operation queued so far, runs them in one transaction, hands the results back
    to the event loop and at once takes what was queued meanwhile: while one
    transaction commits, the next one fills up. The thread is a daemon, so an
    application that never closes its transport still exits (SQLite discards a
    transaction that did not commit).
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        busy_timeout: float,
        on_commit: Callable[[], None],
        errors: Errors,
        on_loop: bool = True,
    ) -> None:
        self.path = path
        self._errors = errors
        self._busy_timeout = busy_timeout
        self._on_commit = on_commit
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: list[tuple[Operation, asyncio.Future[Any]]] = []
        self._relaxed_queued = 0  # queued operations that need no fsync of their own
        self._busy = False  # a batch is running (on the thread, or on the loop)
        self._flush_scheduled = False
        self._on_loop = on_loop
        self._conn: sqlite3.Connection | None = None
        self._sync_configured = synchronous.upper()
        self._sync_current = self._sync_configured
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self.transactions = 0  # committed so far; shows how well writes coalesce

    @property
    def running(self) -> bool:
        return self._stopped is not None and not self._stopping

    async def open(self) -> None:
        """Start the thread and open its connection (errors are raised here)."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._loop, self._stopping = loop, False
        self._stopped = loop.create_future()
        thread = threading.Thread(
            target=self._serve, args=(opened,), name="nervus-sqlite-writer", daemon=True
        )
        thread.start()
        try:
            await opened
        except BaseException:
            self._stopped = None
            raise

    async def submit(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``op`` inside a write transaction; returns its result once committed.

        ``durable=False`` (consumer positions, lease renewals) lets a transaction
        made only of such operations commit with ``synchronous=NORMAL``: it skips
        its own fsync, holding the lock for less time, and becomes durable with
        the next fsync of the WAL. A power loss can lose it; a process crash
        cannot. Losing a position means a redelivery, which at-least-once allows.
        """
        if not self.running:
            raise self._errors.unavailable(f"the SQLite writer of {self.path} is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append((op, fut))
            if not durable:
                self._relaxed_queued += 1
            if not self._on_loop:
                self._wakeup.notify()
                now = False
            else:
                # Nothing else ready to run: no other write can join this one before
                # the flush would run, so it runs now, and the loop gets its turn after.
                now = len(self._queue) == 1 and not self._busy and loop_is_idle(loop)
                if not now and not self._flush_scheduled and not self._busy:
                    # decide once every caller of this turn of the loop has queued
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)
        if now:
            self._flush()
            if fut.done():
                await asyncio.sleep(0)  # the turn a caller of a coroutine expects
                return fut.result()
        return await fut

    def _flush(self) -> None:
        """Run what is queued here, on the event loop's thread, when the writer
        thread is idle and the transaction cannot wait long: it needs no fsync, or it
        is one operation and the loop has nothing else to run (a thread round trip
        costs more than a lone transaction's own work). Otherwise hand it to the
        thread, where concurrent writes share the fsync."""
        with self._lock:
            self._flush_scheduled = False
            if self._busy or not self._queue:
                return
            relaxed = self._relaxed_queued == len(self._queue)
            syncs = self._sync_configured == "FULL" and not relaxed
            here = self._conn is not None and (
                not syncs or (len(self._queue) == 1 and loop_is_idle(self._loop))
            )
            if not here:
                self._wakeup.notify()
                return
            batch, self._queue = self._queue, []
            self._relaxed_queued = 0
            self._busy = True
        results: list[object] | BaseException
        try:
            results = self._run(batch, relaxed, busy_timeout=0.0)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                results = exc
            else:  # another process writes: the thread waits for it, not the loop
                with self._lock:
                    self._busy = False
                    self._queue[:0] = batch
                    self._relaxed_queued += len(batch) if relaxed else 0
                    self._wakeup.notify()
                return
        except Exception as exc:
            results = exc
        with self._lock:
            self._busy = False
            if self._queue:
                self._wakeup.notify()
        self._settle(batch, results)

    def _run(
        self,
        batch: list[tuple[Operation, asyncio.Future[Any]]],
        relaxed: bool,
        *,
        busy_timeout: float,
    ) -> list[object]:
        conn = self._conn
        assert conn is not None
        configured = self._sync_configured
        wanted = "NORMAL" if relaxed and configured == "FULL" else configured
        if wanted != self._sync_current:
            conn.execute(f"PRAGMA synchronous={wanted}")
            self._sync_current = wanted
        return _run_batch(conn, [op for op, _ in batch], busy_timeout)

    async def close(self) -> None:
        """Commit what is queued, then stop the thread and close its connection."""
        stopped = self._stopped
        if stopped is None or self._stopping:
            return
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        await stopped
        self._stopped = None

    def _serve(self, opened: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = open_connection(
                self.path,
                writer=True,
                synchronous=self._sync_configured,
                busy_timeout=self._busy_timeout,
            )
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, opened, exc)
            return
        self._conn = conn
        loop.call_soon_threadsafe(_resolve, opened, None)
        try:
            while True:
                with self._lock:
                    while (self._busy or not self._queue) and not self._stopping:
                        self._wakeup.wait()
                    if not self._queue:
                        break
                    batch, self._queue = self._queue, []
                    relaxed = self._relaxed_queued == len(batch)
                    self._relaxed_queued = 0
                    self._busy = True
                try:
                    results: list[object] | BaseException = self._run(
                        batch, relaxed, busy_timeout=self._busy_timeout
                    )
                except Exception as exc:
                    results = exc
                with self._lock:
                    self._busy = False
                loop.call_soon_threadsafe(self._settle, batch, results)
        finally:
            self._conn = None
            conn.close()
            loop.call_soon_threadsafe(_resolve, self._stopped, None)

    def _settle(
        self,
        batch: list[tuple[Operation, asyncio.Future[Any]]],
        results: list[object] | BaseException,
    ) -> None:
        if isinstance(results, BaseException):
            error = self._errors.convert(results, self.path)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        self.transactions += 1
        self._on_commit()
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue  # the caller gave up waiting; the write stands
            if isinstance(result, _Failed):
                fut.set_exception(self._errors.convert(result.error, self.path))
            else:
                fut.set_result(result)


def _resolve(fut: asyncio.Future[None] | None, error: BaseException | None) -> None:
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
