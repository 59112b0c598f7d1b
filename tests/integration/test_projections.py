"""Projections on SQLite and PostgreSQL: read models and checkpoints commit together,
rebuilds swap generations under readers, unknown types stop or are skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nervus import Envelope, Event
from nervus.codecs import JSON_CODEC
from nervus.domain import (
    Projection,
    ProjectionRunner,
    ReadModelTransaction,
    handles,
    projection_statuses,
)
from nervus.errors import UnknownEventType
from nervus.storage import ANY, EventStore, store_from_url


class Deposited(Event, type="test.projection.deposited.v1"):
    account: str
    cents: int


class Withdrawn(Event, type="test.projection.withdrawn.v1"):
    account: str
    cents: int


class Ignored(Event, type="test.projection.ignored.v1"):
    account: str


class Balances(Projection):
    name = "balances"
    tables = {
        "balances": "CREATE TABLE {balances} (account TEXT PRIMARY KEY, cents INTEGER NOT NULL, "
        "events INTEGER NOT NULL)"
    }

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

    @handles
    async def deposited(self, event: Deposited, tx: ReadModelTransaction) -> None:
        await self._add(tx, event.account, event.cents)

    @handles
    async def withdrawn(self, event: Withdrawn, tx: ReadModelTransaction) -> None:
        if event.account == self.fail_on:
            raise RuntimeError(f"refusing {event.account}")
        await self._add(tx, event.account, -event.cents)

    async def _add(self, tx: ReadModelTransaction, account: str, cents: int) -> None:
        changed = await tx.execute(
            "UPDATE {balances} SET cents = cents + ?, events = events + 1 WHERE account = ?",
            cents,
            account,
        )
        if not changed:
            await tx.execute("INSERT INTO {balances} VALUES (?, ?, 1)", account, cents)


def envelope(event: Event) -> Envelope:
    return Envelope.new(
        type=type(event).__message_type__, source="test", data=JSON_CODEC.encode(event)
    )


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    store = store_from_url(store_url)
    await store.connect()
    yield store
    await store.close()


async def balances(store: EventStore, runner: ProjectionRunner) -> dict[str, tuple[int, int]]:
    async with store.transaction() as tx:
        rows = await tx.fetch(f"SELECT account, cents, events FROM {runner.table('balances')}")
    return {str(a): (int(c), int(n)) for a, c, n in rows}  # type: ignore[call-overload]


async def deposit_many(store: EventStore, accounts: int, each: int) -> None:
    for n in range(each):
        await asyncio.gather(
            *[
                store.append(f"acct-{a}", [envelope(Deposited(account=f"a{a}", cents=n + 1))], ANY)
                for a in range(accounts)
            ]
        )


async def test_catch_up_builds_the_read_model_with_its_checkpoint(store: EventStore) -> None:
    await deposit_many(store, accounts=5, each=4)
    await store.append("acct-0", [envelope(Withdrawn(account="a0", cents=3))], ANY)
    await store.append("noise", [envelope(Ignored(account="a0"))], ANY)
    runner = ProjectionRunner(store, Balances(), batch=7)
    assert await runner.catch_up() == 21  # the ignored event is passed over
    assert await balances(store, runner) == {
        "a0": (10 - 3, 5),
        **{f"a{a}": (10, 4) for a in range(1, 5)},
    }
    status = await runner.status()
    assert (status.name, status.generation, status.lag) == ("balances", 1, 0)
    assert status.position == await store.head()
    assert await runner.catch_up() == 0  # nothing applied twice
    assert [s.name for s in await projection_statuses(store)] == ["balances"]


async def test_two_runners_never_apply_an_event_twice(store_url: str) -> None:
    stores = [store_from_url(store_url) for _ in range(3)]
    for s in stores:
        await s.connect()
    try:
        writer = stores[0]
        await ProjectionRunner(writer, Balances()).setup()
        runners = [ProjectionRunner(s, Balances(), batch=5) for s in stores[1:]]
        tasks = [asyncio.create_task(r.run()) for r in runners]
        await deposit_many(writer, accounts=4, each=15)
        head = await writer.head()
        async with asyncio.timeout(20):
            while (await runners[0].status()).position < head:
                await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        total = sum(range(1, 16))
        assert await balances(writer, runners[0]) == {f"a{a}": (total, 15) for a in range(4)}
        assert sum(r.applied for r in runners) == 60
    finally:
        for s in stores:
            await s.close()


async def test_a_failing_handler_rolls_its_batch_back_and_is_retried(store: EventStore) -> None:
    await deposit_many(store, accounts=2, each=2)
    await store.append("acct-1", [envelope(Withdrawn(account="a1", cents=1))], ANY)
    failing = ProjectionRunner(store, Balances(fail_on="a1"), batch=100)
    with pytest.raises(RuntimeError, match="refusing a1"):
        await failing.catch_up()
    assert (await failing.status()).position == 0  # the whole batch rolled back
    assert await balances(store, failing) == {}
    task = asyncio.create_task(failing.run())
    async with asyncio.timeout(5):
        while failing.error is None:
            await asyncio.sleep(0.01)
    assert "refusing a1" in failing.error
    failing.projection.fail_on = None  # type: ignore[attr-defined]
    async with asyncio.timeout(10):
        while (await failing.status()).lag:
            await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await balances(store, failing) == {"a0": (3, 2), "a1": (2, 3)}


async def test_unknown_types_stop_the_projection_unless_it_skips_them(store: EventStore) -> None:
    await deposit_many(store, accounts=1, each=1)
    gone = Envelope.new(type="test.projection.removed.v1", source="old", data=b"{}")
    await store.append("acct-0", [gone], ANY)
    with pytest.raises(UnknownEventType, match=r"removed\.v1.*'acct-0' version 2"):
        await ProjectionRunner(store, Balances()).catch_up()

    class LenientBalances(Balances):
        skip_unknown = True

    await store.append("acct-0", [envelope(Deposited(account="a0", cents=5))], ANY)
    runner = ProjectionRunner(store, LenientBalances())
    assert await runner.catch_up() == 2
    assert await balances(store, runner) == {"a0": (6, 2)}


async def test_a_rebuild_swaps_generations_while_readers_read(store_url: str) -> None:
    store = store_from_url(store_url)
    await store.connect()
    try:
        await deposit_many(store, accounts=3, each=10)
        live = ProjectionRunner(store, Balances(), batch=10)
        await live.catch_up()
        expected = {f"a{a}": (55, 10) for a in range(3)}
        assert await balances(store, live) == expected
        follower = asyncio.create_task(live.run())
        seen_wrong: list[object] = []
        reading = True

        async def reader() -> None:
            while reading:
                now = await balances(store, live)
                if set(now) != {"a0", "a1", "a2"}:  # a missing or half-built table
                    seen_wrong.append(now)
                await asyncio.sleep(0)

        readers = asyncio.create_task(reader())
        rebuilt = await ProjectionRunner(store, Balances(), batch=4).rebuild()
        assert rebuilt == 2
        await store.append("acct-0", [envelope(Deposited(account="a0", cents=100))], ANY)
        async with asyncio.timeout(10):
            while (await live.status()).lag:
                await asyncio.sleep(0.05)
        reading = False
        await readers
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        assert seen_wrong == []
        assert await balances(store, live) == {**expected, "a0": (155, 11)}
        status = await live.status()
        assert (status.generation, status.lag) == (2, 0)
    finally:
        await store.close()
