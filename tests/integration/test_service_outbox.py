"""The transactional outbox and inbox of a service, on the embedded store and the
in-memory transport."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportError, TransportUnavailable
from nervus.runtime._outgoing import encode
from nervus.storage import store_from_url
from nervus.transports import Delivery, OutgoingMessage, from_url
from nervus.transports.memory import MemoryTransport


class Transfer(Event, type="ob.money.transfer-requested.v1", key="account"):
    transfer_id: str
    account: str
    cents: int


class Debited(Event, type="ob.money.debited.v1", key="account"):
    transfer_id: str
    account: str
    cents: int


def settings(url: str, store: str) -> Settings:
    return Settings(
        transport=url,
        store=store,
        backoff_initial=0.01,
        backoff_max=0.02,
        shutdown_timeout=5,
        publish_timeout=0.2,
    )


async def read(url: str, channel: str, at_least: int, within: float = 10.0) -> list[Delivery]:
    transport = from_url(url)
    await transport.connect()
    got: list[Delivery] = []
    try:
        sub = await transport.subscribe([channel], f"reader-{uuid.uuid4().hex[:8]}")
        async with asyncio.timeout(within):
            while len(got) < at_least:
                got.extend(await sub.fetch(1000, 0.05))
        got.extend(await sub.fetch(1000, 0.2))
    finally:
        await transport.close()
    return got


@pytest.fixture
def urls(store_url: str) -> tuple[str, str]:
    """A fresh in-memory broker, and a fresh store on SQLite or PostgreSQL."""
    return f"memory://{uuid.uuid4().hex}?partitions=4", store_url


async def balances(service: Service) -> dict[str, int]:
    async with service.transaction() as tx:
        rows = await tx.fetch(f"SELECT account, cents FROM {tx.namespace}balances ORDER BY account")
    return {str(a): int(c) for a, c in rows}  # type: ignore[call-overload]


async def create_table(service: Service) -> None:
    async with service.transaction() as tx:
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {tx.namespace}balances "
            "(account TEXT PRIMARY KEY, cents INTEGER)"
        )
        await tx.execute(f"INSERT INTO {tx.namespace}balances VALUES ('a', 1000), ('b', 1000)")


async def test_writes_and_published_events_commit_together(urls: tuple[str, str]) -> None:
    url, store = urls
    ledger = Service("ledger", settings=settings(url, store), outbox=True)
    async with ledger:
        await create_table(ledger)
        async with ledger.transaction() as tx:
            await tx.execute(
                f"UPDATE {tx.namespace}balances SET cents = cents - 100 WHERE account = 'a'"
            )
            await tx.publish(Debited(transfer_id="t1", account="a", cents=100))

        async def fails() -> None:
            async with ledger.transaction() as tx:
                await tx.execute(
                    f"UPDATE {tx.namespace}balances SET cents = cents - 500 WHERE account = 'b'"
                )
                await tx.publish(Debited(transfer_id="t2", account="b", cents=500))
                raise RuntimeError("the business rule said no")

        with pytest.raises(RuntimeError):
            await fails()
        assert await balances(ledger) == {"a": 900, "b": 1000}
        published = await read(url, "ob.money", 1)
        relay = ledger.outbox_relay
        assert relay is not None
        async with asyncio.timeout(5):
            while (await ledger.store.outbox_counts())[0]:
                await asyncio.sleep(0.01)
    assert [d.headers["ce_type"] for d in published] == ["ob.money.debited.v1"]
    assert published[0].key == "a"
    assert relay.published == 1


async def test_the_inbox_makes_a_redelivered_message_take_effect_once(
    urls: tuple[str, str],
) -> None:
    url, store = urls
    ledger = Service("ledger", settings=settings(url, store))
    runs = 0

    @ledger.on(Transfer, inbox=True)
    async def debit(event: Transfer, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        async with ctx.transaction() as tx:
            await tx.execute(
                f"UPDATE {tx.namespace}balances SET cents = cents - ? WHERE account = ?",
                event.cents,
                event.account,
            )
            await tx.publish(
                Debited(transfer_id=event.transfer_id, account=event.account, cents=event.cents)
            )

    async with ledger:
        await create_table(ledger)
        transport = from_url(url)
        await transport.connect()
        channel, message = encode(Transfer(transfer_id="t1", account="a", cents=250), source="x")
        again = OutgoingMessage(message.key, dict(message.headers), message.body)
        await transport.publish(channel, [message, again])  # one message, delivered twice
        await transport.close()
        debited = await read(url, "ob.money", 3)  # the transfer twice, the debit once
        async with asyncio.timeout(5):
            while ledger.inbox.duplicates < 1:
                await asyncio.sleep(0.01)
        assert await balances(ledger) == {"a": 750, "b": 1000}
        assert await ledger.store.handled("ledger", message.headers["ce_id"])
    assert runs == 1
    (debit_event,) = [d for d in debited if d.headers["ce_type"] == "ob.money.debited.v1"]
    assert debit_event.headers["ce_causationid"] == message.headers["ce_id"]


async def test_a_handler_failing_after_its_commit_does_not_repeat_the_effect(
    urls: tuple[str, str],
) -> None:
    url, store = urls
    ledger = Service("ledger", settings=settings(url, store))
    runs = 0

    @ledger.on(Transfer, inbox=True)
    async def debit(event: Transfer, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        async with ctx.transaction() as tx:
            await tx.execute(
                f"UPDATE {tx.namespace}balances SET cents = cents - ? WHERE account = ?",
                event.cents,
                event.account,
            )
        raise RuntimeError("crashed after the commit")

    async with ledger:
        await create_table(ledger)
        client = Service("client", settings=settings(url, store))
        await client.publish(Transfer(transfer_id="t9", account="b", cents=40))
        async with asyncio.timeout(5):
            while ledger.inbox.duplicates < 1:
                await asyncio.sleep(0.01)
        assert await balances(ledger) == {"a": 1000, "b": 960}
        await client.stop()
    assert runs == 1  # the retry found the message in the inbox


class RefusingTransport(MemoryTransport):
    """The in-memory broker, refusing messages keyed 'too-big' and, while ``down``,
    every publish (a broker outage)."""

    down = False

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        if self.down:
            raise TransportUnavailable("the broker is down")
        if any(m.key == "too-big" for m in messages):
            raise TransportError("message too large for the broker", channel=channel)
        await super().publish(channel, messages)


async def test_a_refused_message_is_set_aside_and_an_outage_waited_out(
    urls: tuple[str, str],
) -> None:
    url, store = urls
    transport = RefusingTransport(url.removeprefix("memory://").split("?")[0])
    ledger = Service("ledger", settings=settings(url, store), transport=transport, outbox=True)
    async with ledger:
        async with ledger.transaction() as tx:
            await tx.publish(Debited(transfer_id="t1", account="a", cents=1))
            await tx.publish(Debited(transfer_id="t2", account="too-big", cents=2))
            await tx.publish(Debited(transfer_id="t3", account="a", cents=3))
        fine = await read(url, "ob.money", 2)
        (dead, reason), *_ = await ledger.store.outbox_dead_letters()
        assert dead.key == "too-big" and "too large" in reason
        transport.down = True
        async with ledger.transaction() as tx:
            await tx.publish(Debited(transfer_id="t4", account="a", cents=4))
        relay = ledger.outbox_relay
        assert relay is not None
        async with asyncio.timeout(5):
            while relay.error is None:
                await asyncio.sleep(0.01)
        assert (await ledger.store.outbox_counts())[0] == 1  # waiting, not dropped
        assert "outbox relay" in " ".join(ledger.health().problems)
        transport.down = False
        later = await read(url, "ob.money", 3)
    assert [d.key for d in fine] == ["a", "a"]
    assert sorted(d.headers["ce_id"] for d in later) == sorted(
        [*(d.headers["ce_id"] for d in fine), later[-1].headers["ce_id"]]
    )


async def test_a_service_whose_relay_runs_elsewhere_uses_its_inbox(urls: tuple[str, str]) -> None:
    url, store = urls
    ledger = Service("ledger", settings=settings(url, store), relay=False)  # NERVUS_RELAY=0
    runs = 0

    @ledger.on(Transfer, inbox=True)
    async def debit(event: Transfer, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        async with ctx.transaction() as tx:
            await tx.execute(
                f"UPDATE {tx.namespace}balances SET cents = cents - ? WHERE account = ?",
                event.cents,
                event.account,
            )

    async with ledger:
        assert ledger.outbox_relay is None
        await create_table(ledger)
        transport = from_url(url)
        await transport.connect()
        channel, message = encode(Transfer(transfer_id="t1", account="a", cents=70), source="x")
        again = OutgoingMessage(message.key, dict(message.headers), message.body)
        await transport.publish(channel, [message, again])
        await transport.close()
        async with asyncio.timeout(5):
            while ledger.inbox.duplicates < 1:
                await asyncio.sleep(0.01)
        assert await balances(ledger) == {"a": 930, "b": 1000}
    assert runs == 1


async def test_handlers_opening_their_first_transactions_at_once(urls: tuple[str, str]) -> None:
    url, store = urls
    ledger = Service("ledger", settings=settings(url, store))  # no inbox: connects on first use
    written = 0

    @ledger.on(Transfer)
    async def record(event: Transfer, ctx: Context) -> None:
        nonlocal written
        async with ctx.transaction() as tx:
            await tx.execute(f"INSERT INTO {tx.namespace}transfers VALUES (?)", event.transfer_id)
        written += 1

    # the table exists beforehand (through another store object: the service's own
    # connects on its handlers' first transactions); concurrent CREATE TABLE IF NOT
    # EXISTS is not safe on PostgreSQL
    async with store_from_url(store) as other, other.transaction() as tx:
        await tx.execute(f"CREATE TABLE {tx.namespace}transfers (transfer_id TEXT)")
    async with ledger:
        await ledger.publish_many(
            Transfer(transfer_id=f"t{n}", account=f"a{n}", cents=1) for n in range(40)
        )
        async with asyncio.timeout(10):
            while written < 40:
                await asyncio.sleep(0.01)
        async with ledger.transaction() as tx:
            rows = await tx.fetch(f"SELECT count(*) FROM {tx.namespace}transfers")
    assert rows[0][0] == 40
