"""SQLite plumbing: where reads, writes and transactions run, and what they share."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nervus.core import Envelope
from nervus.errors import StoreError, StoreUnavailable
from nervus.sql._sqlite import Connection, Errors, Writer
from nervus.storage import NO_STREAM, store_from_url

ERRORS = Errors(StoreUnavailable, StoreError)


@contextlib.asynccontextmanager
async def _opened(path: Path, *, on_loop: bool = True) -> AsyncIterator[Writer]:
    """A running writer on ``path`` whose table ``t`` exists."""
    writer = Writer(
        str(path),
        synchronous="full",
        busy_timeout=5.0,
        on_commit=lambda: None,
        errors=ERRORS,
        on_loop=on_loop,
    )
    await writer.open()
    try:
        await writer.submit(_create)
        yield writer
    finally:
        await writer.close()


def _insert(value: int):
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        return threading.current_thread().name

    return op


def _create(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")


def _values(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return sorted(v for (v,) in conn.execute("SELECT v FROM t"))
    finally:
        conn.close()


async def test_a_lone_write_on_an_idle_loop_commits_on_the_loops_thread(tmp_path: Path) -> None:
    async with _opened(tmp_path / "w.db") as writer:
        ran_on = await writer.submit(_insert(1))
    assert ran_on == threading.current_thread().name
    assert _values(tmp_path / "w.db") == [1]


async def test_commit_on_loop_off_keeps_every_write_on_the_writer_thread(tmp_path: Path) -> None:
    async with _opened(tmp_path / "w.db", on_loop=False) as writer:
        ran_on = await writer.submit(_insert(1))
    assert ran_on == "nervus-sqlite-writer"


async def test_writes_of_one_turn_share_a_transaction_on_the_writer_thread(
    tmp_path: Path,
) -> None:
    async with _opened(tmp_path / "w.db") as writer:
        before = writer.transactions
        ran_on = await asyncio.gather(*(writer.submit(_insert(n)) for n in range(50)))
        transactions = writer.transactions - before
    assert set(ran_on) == {"nervus-sqlite-writer"}
    assert transactions == 1
    assert _values(tmp_path / "w.db") == list(range(50))


async def test_a_lone_write_is_not_run_on_the_loop_while_other_work_is_ready(
    tmp_path: Path,
) -> None:
    async with _opened(tmp_path / "w.db") as writer:
        loop = asyncio.get_running_loop()
        # a callback ready in the same turn: the loop has other work to do
        loop.call_soon(lambda: loop.call_soon(lambda: None))
        ran_on = await writer.submit(_insert(1))
    assert ran_on == "nervus-sqlite-writer"


async def test_a_write_waiting_for_another_process_does_not_hold_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    async with _opened(path) as writer:
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            pending = asyncio.ensure_future(writer.submit(_insert(7)))
            ticks = 0
            for _ in range(20):  # the loop keeps running while the write waits
                await asyncio.sleep(0.01)
                ticks += 1
            assert not pending.done()
            other.execute("COMMIT")
            ran_on = await asyncio.wait_for(pending, 5)
        finally:
            other.close()
    assert ticks == 20
    assert ran_on == "nervus-sqlite-writer"
    assert _values(path) == [7]


async def test_a_failing_lone_write_raises_to_its_caller_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    async with _opened(tmp_path / "w.db") as writer:

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (v) VALUES (1)")
            conn.execute("INSERT INTO missing_table VALUES (1)")

        with pytest.raises(StoreError, match="missing_table"):
            await writer.submit(broken)
        await writer.submit(_insert(2))
    assert _values(tmp_path / "w.db") == [2]  # the failed write left nothing


async def test_writes_queued_while_the_thread_commits_go_in_its_next_transaction(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    async with _opened(tmp_path / "w.db") as writer:

        def slow(conn: sqlite3.Connection) -> str:
            release.wait(5)
            return _insert(0)(conn)

        first = asyncio.gather(writer.submit(slow), writer.submit(_insert(1)))
        await asyncio.sleep(0.05)  # the thread runs the first two
        later = asyncio.ensure_future(writer.submit(_insert(2)))  # queued meanwhile
        await asyncio.sleep(0.05)
        assert not later.done()
        release.set()
        await first
        ran_on = await later
    assert ran_on == "nervus-sqlite-writer"
    assert _values(tmp_path / "w.db") == [0, 1, 2]


async def test_writes_that_need_no_fsync_run_on_the_loop_even_together(tmp_path: Path) -> None:
    async with _opened(tmp_path / "w.db") as writer:
        ran_on = await asyncio.gather(
            *(writer.submit(_insert(n), durable=False) for n in range(20))
        )
    assert set(ran_on) == {threading.current_thread().name}
    assert _values(tmp_path / "w.db") == list(range(20))


async def test_a_read_runs_on_the_callers_thread_unless_the_connection_is_busy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    sqlite3.connect(path).close()
    conn = Connection(str(path), name="test", synchronous="full", busy_timeout=5, errors=ERRORS)
    await conn.open()
    release = threading.Event()

    def where(_: sqlite3.Connection) -> str:
        return threading.current_thread().name

    def hold(_: sqlite3.Connection) -> None:
        release.wait(5)

    try:
        assert await conn.read(where) == threading.current_thread().name
        holding = asyncio.ensure_future(conn.run(hold))
        await asyncio.sleep(0.05)
        reading = asyncio.ensure_future(conn.read(where))
        await asyncio.sleep(0.05)
        assert not reading.done()  # waits for the thread, never uses it alongside
        release.set()
        await holding
        assert (await reading).startswith("nervus-sqlite-test")
    finally:
        release.set()
        await conn.close()


async def test_a_store_transaction_waiting_for_another_writer_leaves_the_loop_free(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    store = store_from_url(f"sqlite:///{path}")
    await store.connect()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock

        async def write() -> None:
            async with store.transaction() as tx:
                await tx.append("s-1", [Envelope.new(type="t", source="s", data=b"{}")], NO_STREAM)

        pending = asyncio.ensure_future(write())
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not pending.done()
        other.execute("COMMIT")
        await asyncio.wait_for(pending, 5)
        assert await store.stream_version("s-1") == 1
    finally:
        other.close()
        await store.close()
