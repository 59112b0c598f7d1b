"""The work of the outbox benchmark: one store, one transport, the user's transaction
with and without the outbox, and the relay publishing what it enqueued.

The user's transaction inserts one business row (an order) through a service
transaction (what ``service.transaction()`` opens outside a handler); with the
outbox it also calls ``tx.publish`` of one typed ``OrderPlaced`` event (about 200
bytes of JSON), which the relay later publishes. The relay is ``OutboxRelay`` as a
service runs it, in this process, publishing through ``transport.publish``; the
publish function stamps each message as the broker accepts it (the call returns).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks._event import SOURCE, make_event
from nervus.runtime import OutboxRelay
from nervus.runtime._outbox import open_transaction
from nervus.storage import EventStore, store_from_url
from nervus.transports import OutgoingMessage, Transport, from_url

BUSINESS_TABLE = (
    "CREATE TABLE IF NOT EXISTS {ns}bench_orders (id text PRIMARY KEY, customer text NOT NULL, "
    "sku text NOT NULL, quantity integer NOT NULL, amount_cents integer NOT NULL, "
    "placed double precision NOT NULL)"
)
BUSINESS_INSERT = (
    "INSERT INTO {ns}bench_orders (id, customer, sku, quantity, amount_cents, placed) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
BULK = 500  # events per untimed transaction that fills the backlog


def order_row(n: int) -> tuple[object, ...]:
    """The business row of order ``n``: what the event of order ``n`` describes."""
    return (
        f"order-{n:010d}",
        f"customer-{n % 9973:06d}",
        f"SKU-{n % 512:05d}-BLUE-XL",
        1 + n % 5,
        1999 + n % 10000,
        time.time(),
    )


@dataclass
class Timed:
    """Operations, wall seconds and CPU seconds (every thread of the process)."""

    operations: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0

    def add(self, other: Timed) -> None:
        self.operations += other.operations
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s

    def figures(self) -> dict[str, Any]:
        return {
            "transactions": self.operations,
            "per_s": round(self.operations / self.seconds),
            "us_per_transaction": round(self.seconds / self.operations * 1e6, 1),
            "cpu_us_per_transaction": round(self.cpu_s / self.operations * 1e6, 1),
        }


async def timed(work: Awaitable[int]) -> Timed:
    cpu, wall = time.process_time(), time.perf_counter()
    operations = await work
    return Timed(operations, time.perf_counter() - wall, time.process_time() - cpu)


@dataclass
class Published:
    """What the relay's publishes returned for: key -> when (``perf_counter``)."""

    at: dict[str, float] = field(default_factory=dict)
    calls: int = 0
    wanted: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, count: int) -> None:
        self.at.clear()
        self.calls = 0
        self.wanted = count
        self.done = asyncio.Event()


class OutboxBench:
    """A store and a transport of their own (fresh names), and the work on them."""

    def __init__(self, store_url: str, transport_url: str, channel_prefix: str = "") -> None:
        self.store: EventStore = store_from_url(store_url)
        self.transport: Transport = from_url(transport_url)
        self.channel_prefix = channel_prefix
        self.published = Published()
        self.channels: set[str] = set()
        self._insert = ""
        self._relay: OutboxRelay | None = None
        self._relay_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.store.connect()
        await self.transport.connect()
        async with self.store.transaction() as tx:
            await tx.execute(BUSINESS_TABLE.format(ns=tx.namespace))
            self._insert = BUSINESS_INSERT.format(ns=tx.namespace)

    async def close(self) -> None:
        await self.stop_relay()
        await self.transport.close()
        await self.store.close()

    # -- the user's transaction ------------------------------------------------------

    async def transaction(self, n: int, outbox: bool) -> float:
        """Insert order ``n`` (and with ``outbox``, publish its event) in one service
        transaction; returns when it committed (``perf_counter``)."""
        async with open_transaction(self.store, source=SOURCE, cause=None, inbox=None) as tx:
            await tx.execute(self._insert, *order_row(n))
            if outbox:
                await tx.publish(make_event(n))
        return time.perf_counter()

    async def one_at_a_time(self, start: int, count: int, outbox: bool) -> int:
        for n in range(start, start + count):
            await self.transaction(n, outbox)
        return count

    async def concurrent(self, start: int, count: int, width: int, outbox: bool) -> int:
        numbers = iter(range(start, start + count))

        async def issue() -> None:
            for n in numbers:
                await self.transaction(n, outbox)

        await asyncio.gather(*(issue() for _ in range(width)))
        return count

    async def fill(self, start: int, count: int) -> None:
        """Enqueue ``count`` events (no business rows), ``BULK`` per transaction."""
        for first in range(start, start + count, BULK):
            async with open_transaction(self.store, source=SOURCE, cause=None, inbox=None) as tx:
                for n in range(first, min(first + BULK, start + count)):
                    await tx.publish(make_event(n))

    # -- the relay -------------------------------------------------------------------

    async def _publish(self, channel: str, messages: list[OutgoingMessage]) -> None:
        target = self.channel_prefix + channel
        self.channels.add(target)
        await self.transport.publish(target, messages)
        now = time.perf_counter()
        published = self.published
        published.calls += 1
        for m in messages:
            published.at[m.key or ""] = now
        if len(published.at) >= published.wanted:
            published.done.set()

    def start_relay(self) -> OutboxRelay:
        self._relay = OutboxRelay(self.store, self._publish)
        self._relay_task = asyncio.create_task(self._relay.run(), name="outbox-relay")
        return self._relay

    async def settle(self, timeout: float) -> None:
        """Wait until the relay has marked every published event sent."""
        async with asyncio.timeout(timeout):
            while True:
                seen = self.store.change_count
                if not await self.pending():
                    return
                await self.store.wait_for_change(seen, 0.01)

    async def stop_relay(self) -> None:
        task, self._relay_task = self._relay_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_published(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.published.done.wait(), timeout)
        except TimeoutError:
            error = self._relay.error if self._relay is not None else None
            raise RuntimeError(
                f"the relay published {len(self.published.at)} of {self.published.wanted} "
                f"events within {timeout:.0f} s" + (f" ({error})" if error else "")
            ) from None

    async def pending(self) -> int:
        return (await self.store.outbox_counts())[0]

    # -- the figures that need the relay ---------------------------------------------

    async def drain(self, start: int, count: int, timeout: float) -> dict[str, Any]:
        """A backlog of ``count`` committed events, then the relay started: how fast it
        publishes them (the relay alone, no writers)."""
        await self.fill(start, count)
        self.published.expect(count)
        cpu, wall = time.process_time(), time.perf_counter()
        self.start_relay()
        await self.wait_published(timeout)
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await self.settle(timeout)
        await self.stop_relay()
        return {
            "events": count,
            "events_per_s": round(count / seconds),
            "publish_calls": self.published.calls,
            "cpu_us_per_event": round(cpu / count * 1e6, 1),
        }

    async def end_to_end(
        self, start: int, count: int, width: int, timeout: float
    ) -> dict[str, Any]:
        """``width`` writers run ``count`` outbox transactions while the relay runs: events
        per second from the first transaction's start to the last broker acceptance."""
        self.published.expect(count)
        self.start_relay()
        committed: dict[str, float] = {}
        numbers = iter(range(start, start + count))

        async def issue() -> None:
            for n in numbers:
                committed[f"order-{n:010d}"] = await self.transaction(n, True)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(issue() for _ in range(width)))
        written = time.perf_counter() - wall
        await self.wait_published(timeout)
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await self.settle(timeout)
        await self.stop_relay()
        lags = latencies(committed, self.published.at)
        return {
            "events": count,
            "writers": width,
            "events_per_s": round(count / seconds),
            "transactions_per_s": round(count / written),
            "publish_calls": self.published.calls,
            "cpu_us_per_event": round(cpu / count * 1e6, 1),
            "commit_to_publish_p50_ms": percentile_ms(lags, 50),
            "commit_to_publish_p99_ms": percentile_ms(lags, 99),
        }

    async def latency(
        self, start: int, rate: float, duration: float, timeout: float, in_flight: int
    ) -> dict[str, Any]:
        """Outbox transactions started at ``rate`` per second for ``duration`` seconds
        (each in a task of its own, on schedule whatever the earlier ones do, at most
        ``in_flight`` open at once: a store slower than ``rate`` starts them late rather
        than queueing thousands), the relay running: the time from each commit to its
        event's broker acceptance."""
        total = int(rate * duration)
        self.published.expect(total)
        self.start_relay()
        await asyncio.sleep(0.2)  # the relay is waiting, as in a running service
        committed: dict[str, float] = {}
        durations: list[float] = []
        slots = asyncio.Semaphore(in_flight)

        async def one(n: int, due: float) -> None:
            async with slots:
                done = await self.transaction(n, True)
            committed[f"order-{n:010d}"] = done
            durations.append(done - due)

        tasks: list[asyncio.Task[None]] = []
        loop_start = time.perf_counter()
        issued = 0
        while issued < total:
            now = time.perf_counter()
            due_count = min(total, int((now - loop_start) * rate) + 1)
            while issued < due_count:
                due = loop_start + issued / rate
                tasks.append(asyncio.create_task(one(start + issued, due)))
                issued += 1
            await asyncio.sleep(max(0.0, loop_start + issued / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        issued_for = time.perf_counter() - loop_start  # until the last commit
        await self.wait_published(timeout)
        await self.settle(timeout)
        await self.stop_relay()
        lags = latencies(committed, self.published.at)
        return {
            "rate_per_s": rate,
            "duration_s": duration,
            "events": total,
            "in_flight_at_most": in_flight,
            "committed_per_s": round(total / issued_for),
            "publish_calls": self.published.calls,
            "p50_ms": percentile_ms(lags, 50),
            "p90_ms": percentile_ms(lags, 90),
            "p99_ms": percentile_ms(lags, 99),
            "max_ms": round(max(lags) * 1e3, 2),
            "transaction_p50_ms": percentile_ms(durations, 50),
            "transaction_p99_ms": percentile_ms(durations, 99),
        }


def latencies(committed: dict[str, float], published: dict[str, float]) -> list[float]:
    missing = committed.keys() - published.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} committed events were never published")
    return [published[key] - at for key, at in committed.items()]


def percentile_ms(values: Sequence[float], p: int) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return round(ordered[0] * 1e3, 2)
    return round(statistics.quantiles(ordered, n=100, method="inclusive")[p - 1] * 1e3, 2)
