"""The shop's auditor: reads every channel as its own consumer group, follows each
order to its end, counts events per channel and dead letters, and checks the books."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from examples.shop import events
from examples.shop.events import (
    NotificationSent,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PlaceOrder,
    ShipmentDispatched,
    StockReleased,
    StockReserved,
)
from examples.shop.inventory import INITIAL_STOCK
from nervus import Service
from nervus.codecs import JSON_CODEC
from nervus.core import channel_of
from nervus.transports import OutgoingMessage, Subscription, Transport, dead_letter_channel

AUDIT_GROUP = "shop-audit"
_TRACKED = {
    cls.__message_type__: cls
    for cls in (
        OrderCompleted,
        OrderCancelled,
        NotificationSent,
        StockReserved,
        StockReleased,
        ShipmentDispatched,
    )
}


@dataclass
class Books:
    reserved: int
    released: int
    shipped: int
    stock_taken: int  # initial stock minus what inventory holds now
    orders_completed_in_db: int
    orders_cancelled_in_db: int
    problems: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return not self.problems


class Audit:
    def __init__(self, total: int, consumers: Mapping[str, Service]) -> None:
        self.total = total
        self._consumers = consumers
        self._placed_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.outcome: dict[str, str] = {}
        self.notified: set[str] = set()
        self.per_channel: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.reserved: dict[str, int] = {}
        self.released: dict[str, int] = {}
        self.shipped: dict[str, int] = {}
        self._subscription: Subscription | None = None
        self._reservations: list[tuple[Mapping[str, str], bytes, str | None]] = []
        self._wanted_reservations = 1 << 30  # until inject_duplicates says how many
        self._enough_reservations = asyncio.Event()

    def channels(self) -> tuple[list[str], list[str]]:
        """The shop's channels, and the dead-letter channel of every consumer group."""
        event_channels = {channel_of(cls) for cls in events.ALL}
        dead = sorted(
            {
                dead_letter_channel(r.channel, r.group)
                for svc in self._consumers.values()
                for r in svc.registrations
            }
        )
        return sorted(event_channels), dead

    def expected_dead_letters(self, poison: int) -> int:
        """A poison message of an unknown type is dead-lettered by every group reading
        its channel; one of a known type with a broken payload by every group that
        handles that type (the others skip it without decoding)."""
        registrations = [r for svc in self._consumers.values() for r in svc.registrations]
        readers = {r.group for r in registrations if r.channel == channel_of(OrderPlaced)}
        handlers = {r.group for r in registrations if r.event_type is OrderPlaced}
        unknown = poison // 2
        return unknown * len(readers) + (poison - unknown) * len(handlers)

    async def start(self, transport: Transport) -> None:
        events, dead = self.channels()
        for channel in [*events, *dead]:
            await transport.ensure_channel(channel)
        self._subscription = await transport.subscribe([*events, *dead], AUDIT_GROUP)

    async def inject_poison(self, transport: Transport, count: int) -> None:
        """Messages no service can decode: a truncated payload, an unknown type."""
        for n in range(count):
            kind = "shop.order.placed.v1" if n % 2 == 0 else "shop.order.teleported.v1"
            headers = {
                "ce_specversion": "1.0",
                "ce_id": f"poison-{n}",
                "ce_type": kind,
                "ce_source": "/shop/poison",
                "content-type": "application/json",
            }
            await transport.publish(
                channel_of(OrderPlaced),
                [OutgoingMessage(key=f"poison-{n}", headers=headers, body=b'{"order_id": ')],
            )

    async def inject_duplicates(self, transport: Transport, count: int, within: float) -> int:
        """Deliver ``count`` reservations a second time, as a broker may after a lost
        acknowledgement: same id, same body. Payments' inbox must answer each once."""
        copies: list[OutgoingMessage] = []
        self._wanted_reservations = count
        if len(self._reservations) < count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._enough_reservations.wait(), within)
        for headers, body, key in self._reservations[:count]:
            copies.append(OutgoingMessage(key=key, headers=dict(headers), body=body))
        if copies:
            await transport.publish(channel_of(StockReserved), copies)
        return len(copies)

    def placed_at(self, batch: list[PlaceOrder], at: float) -> None:
        for order in batch:
            self._placed_at[order.order_id] = at

    @property
    def finished(self) -> int:
        return len(self.outcome)

    async def watch(
        self, *, timeout: float, crashed: Callable[[], list[str]], expected_dead_letters: int
    ) -> bool:
        """Follow the log until every order is final and notified, or time runs out."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        assert self._subscription is not None
        deadline = time.monotonic() + timeout
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as progress:
            task = progress.add_task("orders settled", total=self.total)
            while time.monotonic() < deadline:
                deliveries = await self._subscription.fetch(1000, 0.2)
                now = time.perf_counter()
                for d in deliveries:
                    self._record(d.channel, d.headers, d.body, now)
                if deliveries:
                    await self._subscription.ack(deliveries)
                progress.update(task, completed=self.finished)
                if (
                    self.finished >= self.total
                    and len(self.notified) >= self.total
                    and sum(self.dead_letters.values()) >= expected_dead_letters
                ):
                    # Channels are read side by side, so an order's last event can be
                    # read before an earlier one on another channel: drain until quiet.
                    await self._drain(deadline)
                    return True
                dead = crashed()
                if dead:
                    progress.console.print(f"[red]services exited early: {', '.join(dead)}")
                    return False
        return False

    async def _drain(self, deadline: float, quiet: int = 3) -> None:
        """Read until ``quiet`` fetches in a row find nothing (or the deadline)."""
        assert self._subscription is not None
        empty = 0
        while empty < quiet and time.monotonic() < deadline:
            deliveries = await self._subscription.fetch(1000, 0.2)
            if not deliveries:
                empty += 1
                continue
            empty = 0
            now = time.perf_counter()
            for d in deliveries:
                self._record(d.channel, d.headers, d.body, now)
            await self._subscription.ack(deliveries)

    def _record(self, channel: str, headers: Mapping[str, str], body: bytes, now: float) -> None:
        self.per_channel[channel] += 1
        if channel.endswith(".dlq"):
            self.dead_letters[headers.get("nervus_dlq_reason", "?")] += 1
            return
        cls = _TRACKED.get(headers.get("ce_type", ""))
        if cls is None:
            return
        event = JSON_CODEC.decode(body, cls)
        order_id: str = event.order_id  # type: ignore[attr-defined]
        if isinstance(event, OrderCompleted | OrderCancelled):
            if order_id not in self.outcome:
                self.outcome[order_id] = (
                    "completed" if isinstance(event, OrderCompleted) else "cancelled"
                )
                placed = self._placed_at.get(order_id)
                if placed is not None:
                    self.latencies.append(now - placed)
        elif isinstance(event, NotificationSent):
            self.notified.add(order_id)
        elif isinstance(event, StockReserved):
            self.reserved[order_id] = event.quantity
            if len(self._reservations) < 100:
                self._reservations.append((headers, body, order_id))
                if len(self._reservations) >= self._wanted_reservations:
                    self._enough_reservations.set()
        elif isinstance(event, StockReleased):
            self.released[order_id] = event.quantity
        elif isinstance(event, ShipmentDispatched):
            self.shipped[order_id] = event.quantity

    def books(
        self, *, stock_available: Mapping[str, int] | None, order_statuses: Mapping[str, int]
    ) -> Books:
        """Stock reserved must equal stock released plus stock shipped, order by order,
        and inventory's table and the orders' read model (``order_statuses``: orders
        per status) must agree with the events."""
        problems = []
        both = set(self.released) & set(self.shipped)
        if both:
            problems.append(f"{len(both)} orders both released and shipped")
        open_ = set(self.reserved) - set(self.released) - set(self.shipped)
        if open_:
            problems.append(f"{len(open_)} reservations neither released nor shipped")
        reserved, released, shipped = (
            sum(self.reserved.values()),
            sum(self.released.values()),
            sum(self.shipped.values()),
        )
        if reserved != released + shipped:
            problems.append(f"reserved {reserved} != released {released} + shipped {shipped}")
        if stock_available is None:
            problems.append("inventory never created its tables")
            return Books(reserved, released, shipped, 0, 0, 0, problems)
        taken = sum(INITIAL_STOCK.values()) - sum(stock_available.values())
        if taken != shipped:
            problems.append(f"inventory holds {taken} units fewer than at start, shipped {shipped}")
        status = order_statuses
        done = Counter(self.outcome.values())
        for key in ("completed", "cancelled"):
            if status.get(key, 0) != done[key]:
                problems.append(
                    f"the order-history read model has {status.get(key, 0)} {key}, "
                    f"events say {done[key]}"
                )
        if status.get("placed", 0):
            problems.append(f"the order-history read model has {status['placed']} still open")
        return Books(
            reserved=reserved,
            released=released,
            shipped=shipped,
            stock_taken=taken,
            orders_completed_in_db=status.get("completed", 0),
            orders_cancelled_in_db=status.get("cancelled", 0),
            problems=problems,
        )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
            await asyncio.sleep(0)
