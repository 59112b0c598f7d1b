"""The PostgreSQL event store beyond the shared suite: no reader of the global log
skips an event that committed after a later position became visible."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from conftest import postgres_schema
from nervus.core import Envelope
from nervus.errors import ConfigurationError, EventIdConflict, StoreUnavailable
from nervus.storage import ANY, NO_STREAM, RecordedEvent, store_from_url
from nervus.storage.postgres import PostgresEventStore
from nervus.storage.postgres._settings import split_store_url

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def event(n: int) -> Envelope:
    return Envelope.new(type="test.thing.happened.v1", source="test", data=b'{"n":%d}' % n)


@pytest.fixture
async def store_url(postgres_url: str) -> AsyncIterator[str]:
    async with postgres_schema(postgres_url, "nervus_store") as url:
        yield url


def open_store(url: str, *, serialize_appends: bool = True) -> PostgresEventStore:
    dsn, settings = split_store_url(url, "NERVUS_STORE")
    return PostgresEventStore(dsn, settings, serialize_appends=serialize_appends)


async def first_commits_last(url: str, *, serialize_appends: bool) -> dict[str, object]:
    """Two appenders: the first takes a position, then holds its transaction open
    while the second appends and a reader (polling and subscribed) looks at the
    global log; then the first commits. Returns what the readers saw."""
    store = open_store(url, serialize_appends=serialize_appends)
    await store.connect()
    try:
        await store.append("setup", [event(0)], NO_STREAM)
        start = await store.head()
        seen: list[RecordedEvent] = []

        async def subscriber() -> None:
            async for batch in store.subscribe(start):
                seen.extend(batch)
                if {e.stream_id for e in seen} >= {"first", "second"}:
                    return

        subscribed = asyncio.create_task(subscriber())
        first, second = event(1), event(2)
        async with store.transaction() as tx:
            first_result = await tx.append("first", [first], NO_STREAM)
            appending = asyncio.create_task(store.append("second", [second], NO_STREAM))
            await asyncio.sleep(0.5)  # the second appender commits now, if it can
            visible_meanwhile = await store.read_all(start)
        second_result = await appending
        # a reader that keeps a checkpoint reads after the last position it saw
        checkpoint = visible_meanwhile[-1].position if visible_meanwhile else start
        read_after_checkpoint = await store.read_all(checkpoint)
        try:
            async with asyncio.timeout(1.5):
                await subscribed
        except TimeoutError:
            pass  # the subscriber missed one: reported below
        return {
            "first": first_result.position,
            "second": second_result.position,
            "visible_meanwhile": [e.stream_id for e in visible_meanwhile],
            "after_checkpoint": [e.stream_id for e in read_after_checkpoint],
            "subscriber": [e.stream_id for e in seen],
        }
    finally:
        await store.close()


async def test_naive_sequence_positions_let_a_reader_skip_an_event(store_url: str) -> None:
    """The pitfall, shown on the design without the append lock: the second event's
    higher position is visible before the first event commits, so a reader that moved
    its checkpoint past it never reads the first one."""
    seen = await first_commits_last(store_url, serialize_appends=False)
    assert seen["first"] < seen["second"]  # type: ignore[operator]
    assert seen["visible_meanwhile"] == ["second"]
    assert "first" not in seen["after_checkpoint"]  # type: ignore[operator]
    assert seen["subscriber"] == ["second"]


async def test_no_reader_skips_an_event_that_committed_late(store_url: str) -> None:
    seen = await first_commits_last(store_url, serialize_appends=True)
    assert seen["first"] < seen["second"]  # type: ignore[operator]
    assert seen["visible_meanwhile"] == []  # the second append waited for the first
    assert seen["after_checkpoint"] == ["first", "second"]
    assert seen["subscriber"] == ["first", "second"]


async def test_many_concurrent_appenders_never_let_a_reader_skip(store_url: str) -> None:
    """Four stores (as four processes) append concurrently while a subscriber reads;
    it sees every event once, in position order, with no event appearing later
    below a position it already read."""
    stores = [store_from_url(store_url) for _ in range(4)]
    for store in stores:
        await store.connect()
    try:
        reader = stores[0]
        seen: list[RecordedEvent] = []
        total = 4 * 50 * 2

        async def subscriber() -> None:
            async for batch in reader.subscribe(0, batch=37):
                seen.extend(batch)
                if len(seen) >= total:
                    return

        subscribed = asyncio.create_task(subscriber())

        async def appender(n: int) -> None:
            store = stores[n]
            await asyncio.gather(
                *[store.append(f"p{n}-{k % 5}", [event(k), event(k)], ANY) for k in range(50)]
            )

        await asyncio.gather(*[appender(n) for n in range(4)])
        async with asyncio.timeout(10):
            await subscribed
        everything = await reader.read_all(0, limit=10_000)
        assert [e.id for e in seen] == [e.id for e in everything]
        assert len(everything) == total
    finally:
        for store in stores:
            await store.close()


async def test_a_transaction_commits_appends_with_the_callers_writes(store_url: str) -> None:
    store = store_from_url(store_url)
    assert isinstance(store, PostgresEventStore)
    await store.connect()
    try:
        schema = store.settings.schema
        await store._fetch("create", f"CREATE TABLE {schema}.balances (id text, cents int)")
        async with store.transaction() as tx:
            await tx.append("account-1", [event(1)], NO_STREAM)
            await tx.connection.execute(f"INSERT INTO {schema}.balances VALUES ('account-1', 100)")

        async def fails_after_writing() -> None:
            async with store.transaction() as tx:
                await tx.append("account-2", [event(2)], NO_STREAM)
                await tx.connection.execute(
                    f"INSERT INTO {schema}.balances VALUES ('account-2', 5)"
                )
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            await fails_after_writing()
        assert [e.stream_id for e in await store.read_all()] == ["account-1"]
        rows = await store._fetch("read", f"SELECT id FROM {schema}.balances")
        assert [r[0] for r in rows] == ["account-1"]
        # a refused append inside a transaction leaves the rest of it
        stored = await store.read_stream("account-1")
        async with store.transaction() as tx:
            with pytest.raises(EventIdConflict):
                await tx.append("account-3", [stored[0].envelope], NO_STREAM)
            await tx.append("account-3", [event(3)], NO_STREAM)
        assert await store.stream_version("account-3") == 1
    finally:
        await store.close()


async def test_bad_url_and_unreachable_server_fail_clearly(postgres_url: str) -> None:
    with pytest.raises(ConfigurationError, match="schema"):
        store_from_url(f"{postgres_url}?schema=Bad-Name")
    with pytest.raises(ConfigurationError, match="pool_size"):
        store_from_url(f"{postgres_url}?pool_size=0")
    with pytest.raises(ConfigurationError, match="wake_interval"):
        store_from_url(f"{postgres_url}?wake_interval=5")
    store = store_from_url("postgresql://nervus:secret@127.0.0.1:1/nervus?connect_timeout=2")
    with pytest.raises(StoreUnavailable) as caught:
        await store.connect()
    assert "127.0.0.1:1" in str(caught.value) and "secret" not in str(caught.value)


async def test_an_outbox_row_committed_late_is_published_late_not_skipped(
    store_url: str,
) -> None:
    store = store_from_url(store_url)
    await store.connect()
    try:
        async with store.transaction() as early:
            await early.enqueue("c", "k", {"ce_id": "early"}, b"")  # the lower id
            async with store.transaction() as late:
                await late.enqueue("c", "k", {"ce_id": "late"}, b"")
            first = await store.outbox_batch()
            assert [m.headers["ce_id"] for m in first] == ["late"]
            await store.outbox_sent([m.id for m in first], at=1.0)
        second = await store.outbox_batch()
        assert [m.headers["ce_id"] for m in second] == ["early"]
        assert second[0].id < first[0].id
    finally:
        await store.close()
