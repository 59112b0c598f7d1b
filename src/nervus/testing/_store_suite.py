"""The event store conformance suite: the same scenarios for every store.

A store's test module subclasses ``EventStoreConformance`` and provides the
``store_url`` fixture (a fresh, empty store for each scenario)::

    class TestSqliteStore(EventStoreConformance):
        @pytest.fixture
        def store_url(self, tmp_path) -> str:
            return f"sqlite:///{tmp_path}/store.db"

Every scenario opens its stores with ``store_from_url(store_url)``; two stores
opened on one URL stand for two processes sharing the database.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
import pytest

from nervus.core import Envelope
from nervus.errors import ConcurrencyError, EventIdConflict, StoreError
from nervus.storage import ANY, NO_STREAM, EventStore, RecordedEvent, Snapshot, store_from_url

_counter = itertools.count()


def events(n: int, *, kind: str = "test.thing.happened.v1") -> list[Envelope]:
    """``n`` envelopes with distinct ids and numbered JSON bodies."""
    return [
        Envelope.new(type=kind, source="conformance", data=b'{"n":%d}' % next(_counter))
        for _ in range(n)
    ]


def ids(recorded: Sequence[RecordedEvent] | Sequence[Envelope]) -> list[str]:
    return [e.id for e in recorded]


class EventStoreConformance:
    """Scenarios every event store passes; subclass it and provide ``store_url``."""

    live_timeout: float = 10.0  # how long a subscriber may take to see a new event

    @pytest.fixture
    def store_url(self) -> str:
        """The URL of an empty store; override it in the subclass."""
        raise NotImplementedError("provide a store_url fixture in the subclass")

    @asynccontextmanager
    async def open_store(self, url: str) -> AsyncIterator[EventStore]:
        store = store_from_url(url)
        await store.connect()
        try:
            yield store
        finally:
            await store.close()

    @pytest.fixture
    async def store(self, store_url: str) -> AsyncIterator[EventStore]:
        async with self.open_store(store_url) as store:
            yield store

    # -- appending and reading a stream -----------------------------------------------

    async def test_append_and_read_stream_keeps_every_attribute(self, store: EventStore) -> None:
        first = Envelope.new(type="test.order.placed.v1", source="orders", data=b'{"a":1}')
        second = Envelope.new(
            type="test.order.paid.v1",
            source="payments",
            data=b"\x00binary\xff",
            subject="order-1",
            cause=first,
            datacontenttype="application/octet-stream",
            dataschema="https://example.com/paid.json",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate="vendor=1",
        )
        result = await store.append("order-1", [first, second], NO_STREAM)
        assert (result.stream_id, result.version) == ("order-1", 2)
        read = await store.read_stream("order-1")
        assert [(e.stream_id, e.version) for e in read] == [("order-1", 1), ("order-1", 2)]
        assert read[1].position == result.position > read[0].position > 0
        for stored, original in zip(read, [first, second], strict=True):
            # the stream id is the partition key of a stored event (the relay's key)
            assert stored.envelope == msgspec.structs.replace(original, partitionkey="order-1")
        assert await store.stream_version("order-1") == 2

    async def test_expected_version_is_checked(self, store: EventStore) -> None:
        await store.append("s", events(3), NO_STREAM)
        for wrong in (0, 1, 2, 4, 7):
            with pytest.raises(ConcurrencyError) as caught:
                await store.append("s", events(1), wrong)
            assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
                "s",
                wrong,
                3,
            )
            assert "s" in str(caught.value) and str(wrong) in str(caught.value)
        assert await store.stream_version("s") == 3
        assert (await store.append("s", events(2), 3)).version == 5
        assert (await store.append("s", events(1), ANY)).version == 6
        with pytest.raises(ConcurrencyError):
            await store.append("new", events(1), 1)  # no gap at the start of a stream
        assert await store.read_stream("new") == []

    async def test_bad_arguments_are_refused(self, store: EventStore) -> None:
        with pytest.raises(ValueError, match="no events"):
            await store.append("s", [], NO_STREAM)
        with pytest.raises(ValueError, match="expected_version"):
            await store.append("s", events(1), -3)
        with pytest.raises(ValueError, match="limit"):
            await store.read_all(0, limit=0)

    async def test_appending_the_same_events_again_is_a_no_op(self, store: EventStore) -> None:
        batch = events(3)
        first = await store.append("s", batch, NO_STREAM)
        await store.append("s", events(2), 3)
        # a retried command after a lost reply: same ids, stale expected version
        assert await store.append("s", batch, NO_STREAM) == first
        assert await store.append("s", batch, ANY) == first
        assert await store.append("s", batch[:1], ANY) == (
            await store.append("s", batch[:1], NO_STREAM)
        )
        assert [e.version for e in await store.read_stream("s")] == [1, 2, 3, 4, 5]
        assert await store.head() == (await store.read_all())[-1].position

    async def test_an_event_id_stored_elsewhere_is_a_conflict(self, store: EventStore) -> None:
        batch = events(2)
        await store.append("a", batch, NO_STREAM)
        with pytest.raises(EventIdConflict) as caught:
            await store.append("b", batch[:1], NO_STREAM)
        assert caught.value.event_id == batch[0].id and "'a'" in caught.value.stored_at
        with pytest.raises(EventIdConflict):  # a new event followed by a stored one
            await store.append("a", [*events(1), batch[1]], 2)
        with pytest.raises(EventIdConflict):  # stored events plus a new one
            await store.append("a", [*batch, *events(1)], ANY)
        assert ids(await store.read_stream("a")) == ids(batch)
        assert await store.read_stream("b") == []

    async def test_read_stream_forwards_backwards_and_in_pages(self, store: EventStore) -> None:
        batch = events(10)
        await store.append("s", batch, NO_STREAM)
        await store.append("other", events(2), NO_STREAM)
        assert ids(await store.read_stream("s")) == ids(batch)
        assert ids(await store.read_stream("s", from_version=4, limit=3)) == ids(batch[3:6])
        assert ids(await store.read_stream("s", backwards=True)) == ids(batch[::-1])
        backwards = await store.read_stream("s", from_version=5, backwards=True, limit=2)
        assert [e.version for e in backwards] == [5, 4]
        assert await store.read_stream("s", from_version=11) == []
        assert await store.read_stream("missing") == []
        assert await store.stream_version("missing") == 0

    # -- the global log ---------------------------------------------------------------

    async def test_read_all_in_position_order(self, store: EventStore) -> None:
        assert await store.head() == 0
        assert await store.read_all() == []
        appended = []
        for n in range(6):
            stream = f"s{n % 3}"
            batch = events(2)
            await store.append(stream, batch, ANY)
            appended += batch
        everything = await store.read_all()
        assert ids(everything) == ids(appended)
        positions = [e.position for e in everything]
        assert positions == sorted(set(positions))
        assert await store.head() == positions[-1]
        page = await store.read_all(positions[3], limit=4)
        assert ids(page) == ids(appended[4:8])

    async def test_concurrent_appends_keep_their_own_checks(self, store: EventStore) -> None:
        await store.append("contested", events(1), NO_STREAM)
        outcomes = await asyncio.gather(
            *[store.append("contested", events(1), 1) for _ in range(20)],
            *[store.append(f"free-{n}", events(2), NO_STREAM) for n in range(30)],
            return_exceptions=True,
        )
        contested, free = outcomes[:20], outcomes[20:]
        winners = [o for o in contested if not isinstance(o, BaseException)]
        losers = [o for o in contested if isinstance(o, ConcurrencyError)]
        assert len(winners) == 1 and len(losers) == 19, outcomes
        assert all(not isinstance(o, BaseException) for o in free), free
        assert await store.stream_version("contested") == 2
        everything = await store.read_all(limit=10_000)
        assert len(everything) == 1 + 1 + 60
        by_position = {e.position: e for e in everything}
        for result in free:
            assert not isinstance(result, BaseException)
            last = by_position[result.position]
            assert (last.stream_id, last.version) == (result.stream_id, 2)

    async def test_many_concurrent_appends_to_one_stream_with_any(self, store: EventStore) -> None:
        batches = [events(3) for _ in range(40)]
        await asyncio.gather(*[store.append("busy", batch, ANY) for batch in batches])
        stored = await store.read_stream("busy")
        assert [e.version for e in stored] == list(range(1, 121))
        # each append's events stay together and in order
        starts = {b[0].id: b for b in batches}
        for n in range(0, 120, 3):
            batch = starts[stored[n].id]
            assert ids(stored[n : n + 3]) == ids(batch)

    async def test_a_large_append(self, store: EventStore) -> None:
        batch = events(5000)
        result = await store.append("big", batch, NO_STREAM)
        assert result.version == 5000
        assert ids(await store.read_stream("big")) == ids(batch)

    async def test_another_connection_sees_appends_and_conflicts(self, store_url: str) -> None:
        async with self.open_store(store_url) as one, self.open_store(store_url) as two:
            await one.append("shared", events(2), NO_STREAM)
            assert await two.stream_version("shared") == 2
            await two.append("shared", events(1), 2)
            with pytest.raises(ConcurrencyError) as caught:
                await one.append("shared", events(1), 2)
            assert caught.value.actual == 3

    async def test_events_survive_reopening(self, store_url: str) -> None:
        batch = events(4)
        async with self.open_store(store_url) as store:
            await store.append("kept", batch, NO_STREAM)
        async with self.open_store(store_url) as store:
            assert ids(await store.read_stream("kept")) == ids(batch)
            assert (await store.append("kept", events(1), 4)).version == 5

    # -- subscriptions ----------------------------------------------------------------

    async def _collect(
        self, store: EventStore, after: int, count: int, batch: int = 1000
    ) -> list[RecordedEvent]:
        seen: list[RecordedEvent] = []
        async with asyncio.timeout(self.live_timeout):
            async for page in store.subscribe(after, batch=batch):
                seen += page
                if len(seen) >= count:
                    break
        return seen

    async def test_subscribe_catches_up_then_goes_live(self, store: EventStore) -> None:
        old = events(25)
        for n in range(0, 25, 5):
            await store.append(f"s{n}", old[n : n + 5], NO_STREAM)
        new = events(10)
        collector = asyncio.create_task(self._collect(store, 0, 35, batch=7))
        await asyncio.sleep(0.1)
        for n in range(10):
            await store.append("live", new[n : n + 1], ANY)
            await asyncio.sleep(0.005)
        seen = await collector
        assert ids(seen) == ids(old + new)
        # from a later position: only what follows it
        later = await self._collect(store, seen[24].position, 10)
        assert ids(later) == ids(new)

    async def test_subscriber_sees_appends_of_another_connection(self, store_url: str) -> None:
        async with self.open_store(store_url) as reader, self.open_store(store_url) as writer:
            head = await reader.head()
            collector = asyncio.create_task(self._collect(reader, head, 12))
            await asyncio.sleep(0.2)  # the subscriber has caught up and waits
            appended: list[Envelope] = []
            for n in range(4):
                batch = events(3)
                await writer.append(f"w{n}", batch, NO_STREAM)
                appended += batch
                await asyncio.sleep(0.05)
            assert ids(await collector) == ids(appended)

    async def test_concurrent_appenders_and_a_subscriber_agree(self, store_url: str) -> None:
        """While two connections append concurrently, a live subscriber sees every
        event exactly once, in the order ``read_all`` gives afterwards."""
        async with (
            self.open_store(store_url) as reader,
            self.open_store(store_url) as one,
            self.open_store(store_url) as two,
        ):

            async def append_many(store: EventStore, name: str) -> None:
                await asyncio.gather(
                    *[store.append(f"{name}-{n % 7}", events(2), ANY) for n in range(60)]
                )

            collector = asyncio.create_task(self._collect(reader, 0, 240, batch=50))
            await asyncio.gather(append_many(one, "one"), append_many(two, "two"))
            seen = await collector
            assert ids(seen) == ids(await reader.read_all(limit=1000))
            assert len(set(ids(seen))) == 240

    # -- snapshots and checkpoints ----------------------------------------------------

    async def test_snapshots_keep_the_newest(self, store: EventStore) -> None:
        assert await store.load_snapshot("s") is None
        await store.save_snapshot(Snapshot("s", 10, "test.state.v1", b"ten"))
        await store.save_snapshot(Snapshot("s", 5, "test.state.v1", b"five"))  # older: ignored
        assert await store.load_snapshot("s") == Snapshot("s", 10, "test.state.v1", b"ten")
        await store.save_snapshot(Snapshot("s", 20, "test.state.v2", b"twenty"))
        assert await store.load_snapshot("s") == Snapshot("s", 20, "test.state.v2", b"twenty")
        assert await store.read_stream("s") == []  # a snapshot is not an event

    async def test_checkpoints(self, store: EventStore) -> None:
        assert await store.load_checkpoint("relay") == 0
        await store.save_checkpoint("relay", 42)
        await store.save_checkpoint("projection", 7)
        await store.save_checkpoint("relay", 43)
        assert await store.load_checkpoint("relay") == 43
        assert await store.load_checkpoint("projection") == 7

    async def test_connects_racing_each_other_open_the_store_once(self, store_url: str) -> None:
        store = store_from_url(store_url)
        try:
            await asyncio.gather(*(store.connect() for _ in range(8)))
            async with store.transaction() as tx:  # a working store: nothing swapped under it
                await tx.append("raced", events(1), NO_STREAM)
            assert await store.stream_version("raced") == 1
        finally:
            await store.close()

    async def test_a_closed_store_refuses_work(self, store_url: str) -> None:
        store = store_from_url(store_url)
        with pytest.raises(StoreError, match="connect"):
            await store.append("s", events(1), NO_STREAM)
        await store.connect()
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            await store.read_all()

    # -- transactions -----------------------------------------------------------------

    async def test_a_transaction_commits_events_rows_and_checkpoints_together(
        self, store: EventStore
    ) -> None:
        async with store.transaction() as tx:
            table = f"{tx.namespace}conformance_rows"  # the store's own schema
            await tx.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, amount INTEGER)")
        batch = events(2)
        async with store.transaction() as tx:
            assert tx.dialect in ("sqlite", "postgresql")
            result = await tx.append("tx-1", batch, NO_STREAM)
            assert result.version == 2
            assert await tx.execute(f"INSERT INTO {table} VALUES (?, ?)", "a", 10) == 1
            assert await tx.move_checkpoint("tx-test", 0, result.position)
            assert await tx.load_checkpoint("tx-test") == result.position
            assert await tx.fetch(f"SELECT id, amount FROM {table}") == [("a", 10)]

        class Undo(Exception):
            pass

        async def write_then_fail() -> None:
            async with store.transaction() as tx:
                await tx.append("tx-2", events(1), NO_STREAM)
                await tx.execute(f"INSERT INTO {table} VALUES (?, ?)", "b", 20)
                await tx.move_checkpoint("tx-test", result.position, result.position + 100)
                raise Undo

        with pytest.raises(Undo):
            await write_then_fail()
        assert ids(await store.read_all()) == ids(batch)
        assert await store.load_checkpoint("tx-test") == result.position
        async with store.transaction() as tx:
            assert await tx.fetch(f"SELECT id FROM {table} ORDER BY id") == [("a",)]

    async def test_a_refused_append_leaves_the_rest_of_the_transaction(
        self, store: EventStore
    ) -> None:
        await store.append("taken", events(1), NO_STREAM)
        kept = events(1)
        async with store.transaction() as tx:
            with pytest.raises(ConcurrencyError):
                await tx.append("taken", events(1), NO_STREAM)
            stored = await store.read_stream("taken")
            with pytest.raises(EventIdConflict):
                await tx.append("elsewhere", [stored[0].envelope], NO_STREAM)
            await tx.append("kept", kept, NO_STREAM)
        assert ids(await store.read_stream("kept")) == ids(kept)
        assert await store.read_stream("elsewhere") == []
        assert await store.stream_version("taken") == 1

    async def test_moving_a_checkpoint_is_compare_and_set(self, store_url: str) -> None:
        async with self.open_store(store_url) as one, self.open_store(store_url) as two:
            async with one.transaction() as tx:
                assert await tx.move_checkpoint("cas", 0, 5)
                assert not await tx.move_checkpoint("cas", 0, 6)

            async def move(store: EventStore, to: int) -> bool:
                async with store.transaction() as tx:
                    moved = await tx.move_checkpoint("cas", 5, to)
                    await asyncio.sleep(0.05)  # hold it: the other one meets it
                    return moved

            outcomes = await asyncio.gather(move(one, 6), move(two, 7))
            assert sorted(outcomes) == [False, True]
            assert await one.load_checkpoint("cas") == (6 if outcomes[0] else 7)

    async def test_list_checkpoints_by_prefix(self, store: EventStore) -> None:
        await store.save_checkpoint("projection:a", 1)
        await store.save_checkpoint("projection:b", 2)
        await store.save_checkpoint("relay:main", 3)
        assert await store.list_checkpoints("projection:") == {"projection:a": 1, "projection:b": 2}
        assert len(await store.list_checkpoints()) == 3

    async def test_a_subscriber_sees_appends_of_a_transaction(self, store: EventStore) -> None:
        head = await store.head()
        collector = asyncio.create_task(self._collect(store, head, 3))
        await asyncio.sleep(0.1)
        batch = events(3)
        async with store.transaction() as tx:
            await tx.append("from-tx", batch, NO_STREAM)
        assert ids(await collector) == ids(batch)

    # -- the outbox and the inbox -----------------------------------------------------

    async def test_the_outbox_keeps_what_a_transaction_enqueued(self, store: EventStore) -> None:
        async with store.transaction() as tx:
            await tx.enqueue("shop.order", "o-1", {"ce_id": "1", "ce_type": "a.b.c.v1"}, b"one")
            await tx.enqueue("shop.payment", None, {"ce_id": "2"}, b"\x00two")

        class Undo(Exception):
            pass

        async def enqueue_then_fail() -> None:
            async with store.transaction() as tx:
                await tx.enqueue("shop.order", "o-9", {"ce_id": "9"}, b"never")
                raise Undo

        with pytest.raises(Undo):
            await enqueue_then_fail()
        async with store.transaction() as tx:
            await tx.enqueue("shop.order", "o-1", {"ce_id": "3"}, b"three")
        pending = await store.outbox_batch()
        assert [(m.channel, m.key, m.headers["ce_id"], m.body) for m in pending] == [
            ("shop.order", "o-1", "1", b"one"),
            ("shop.payment", None, "2", b"\x00two"),
            ("shop.order", "o-1", "3", b"three"),
        ]
        assert pending[0].headers == {"ce_id": "1", "ce_type": "a.b.c.v1"}
        assert [m.id for m in pending] == sorted(m.id for m in pending)
        assert [m.id for m in await store.outbox_batch(limit=2)] == [m.id for m in pending[:2]]
        assert await store.outbox_counts() == (3, 0)
        await store.outbox_sent([pending[0].id, pending[1].id], at=1000.0)
        assert [m.body for m in await store.outbox_batch()] == [b"three"]
        assert await store.outbox_counts() == (1, 2)
        await store.outbox_sent([pending[2].id], at=2000.0)
        assert await store.outbox_purge(sent_before=1500.0) == 2
        assert await store.outbox_counts() == (0, 1)
        assert await store.outbox_batch() == []

    async def test_an_unpublishable_message_moves_to_the_dead_letters(
        self, store: EventStore
    ) -> None:
        async with store.transaction() as tx:
            await tx.enqueue("c", "k1", {"ce_id": "big"}, b"x" * 1000)
            await tx.enqueue("c", "k2", {"ce_id": "fine"}, b"ok")
        big, _ = await store.outbox_batch()
        await store.outbox_reject(big, "message too large for the broker", at=5.0)
        assert [m.headers["ce_id"] for m in await store.outbox_batch()] == ["fine"]
        assert await store.outbox_counts() == (1, 0)
        (dead,) = await store.outbox_dead_letters()
        assert dead == (big, "message too large for the broker")

    async def test_the_inbox_records_a_message_once_per_group(self, store: EventStore) -> None:
        async with store.transaction() as tx:
            assert await tx.record_handled("payments", "m-1")
            assert not await tx.record_handled("payments", "m-1")
            assert await tx.record_handled("audit", "m-1")

        async def record_then_fail() -> None:
            async with store.transaction() as tx:
                assert await tx.record_handled("payments", "m-2")
                raise RuntimeError("the effect failed")

        with pytest.raises(RuntimeError):
            await record_then_fail()
        assert await store.handled("payments", "m-1")
        assert await store.handled("audit", "m-1")
        assert not await store.handled("payments", "m-2")  # rolled back with the effect
        async with store.transaction() as tx:
            assert not await tx.record_handled("payments", "m-1")
        assert await store.inbox_purge(before=0.0) == 0
        assert await store.inbox_purge(before=4_000_000_000.0) == 2
        assert not await store.handled("payments", "m-1")

    async def test_a_waiter_is_woken_by_an_enqueue_elsewhere(self, store_url: str) -> None:
        async with self.open_store(store_url) as relay, self.open_store(store_url) as app:
            seen = relay.change_count
            await relay.wait_for_change(seen, 0.01)  # starts listening
            seen = relay.change_count
            waiter = asyncio.create_task(relay.wait_for_change(seen, self.live_timeout))
            await asyncio.sleep(0.1)
            async with app.transaction() as tx:
                await tx.enqueue("c", None, {"ce_id": "w"}, b"")
            started = asyncio.get_running_loop().time()
            await waiter
            assert asyncio.get_running_loop().time() - started < self.live_timeout / 2
            assert [m.headers["ce_id"] for m in await relay.outbox_batch()] == ["w"]
