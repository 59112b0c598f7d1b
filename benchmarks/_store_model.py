"""The store benchmark's domain, written once per side: an order placed, then items
added to it. About 200 bytes of JSON per event on every side.

nervus and the raw drivers share the typed events (msgspec structs); eventsourcing
gets the same order as an ``Aggregate`` whose command methods trigger one event each,
in its ``Application``, the way its documentation writes them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from nervus import Event

SOURCE = "benchmarks.store"
NOTE = "deliver to the back door, ring twice, leave with the neighbour if away"
ITEM_LIMIT = 1_000_000  # the decision of a load-decide-append cycle: never reached


class OrderPlaced(Event, type="bench.store.order.placed.v1", key="order_id"):
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int
    currency: str
    note: str


class ItemAdded(Event, type="bench.store.order.item_added.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int
    note: str


EVENT_CLASSES: dict[str, type[OrderPlaced] | type[ItemAdded]] = {
    OrderPlaced.__message_type__: OrderPlaced,
    ItemAdded.__message_type__: ItemAdded,
}


def stream_name(n: int) -> str:
    return f"order-{n:010d}"


def placed(n: int) -> OrderPlaced:
    return OrderPlaced(
        order_id=stream_name(n),
        customer_id=f"customer-{n % 9973:06d}",
        sku=f"SKU-{n % 512:05d}-BLUE-XL",
        quantity=1 + n % 5,
        amount_cents=1999 + n % 10000,
        currency="EUR",
        note=NOTE,
    )


def item(n: int, k: int) -> ItemAdded:
    return ItemAdded(
        order_id=stream_name(n),
        sku=f"SKU-{(n + k) % 512:05d}-RED-M",
        quantity=1 + k % 3,
        amount_cents=499 + k,
        note=NOTE,
    )


class OrderState:
    """The folded state a command decides on: items and their total."""

    __slots__ = ("items", "quantity", "total_cents")

    def __init__(self) -> None:
        self.items = 0
        self.quantity = 0
        self.total_cents = 0

    def apply(self, e: OrderPlaced | ItemAdded) -> None:
        self.items += 1
        self.quantity += e.quantity
        self.total_cents += e.amount_cents

    def may_add(self, quantity: int) -> bool:
        return self.quantity + quantity <= ITEM_LIMIT


def fold(events: list[OrderPlaced | ItemAdded]) -> OrderState:
    state = OrderState()
    for e in events:
        state.apply(e)
    return state


class RefusedError(Exception):
    """The decision refused the command (never happens with these limits)."""


# -- the raw side's rows: the store's columns, filled the straightforward way ------


def raw_row(stream: str, version: int, e: OrderPlaced | ItemAdded) -> tuple[Any, ...]:
    """(stream_id, version, id, type, source, time, subject, content_type, dataschema,
    correlation_id, causation_id, traceparent, tracestate, data)"""
    event_id = str(uuid.uuid4())
    return (
        stream,
        version,
        event_id,
        e.__message_type__,
        SOURCE,
        datetime.now(UTC).isoformat(),
        None,
        "application/json",
        None,
        event_id,
        None,
        None,
        None,
        msgspec.json.encode(e),
    )


RAW_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_CLASSES.items()
}


# -- eventsourcing's side -----------------------------------------------------------


class Order(Aggregate):
    @event("Placed")
    def __init__(
        self,
        customer_id: str,
        sku: str,
        quantity: int,
        amount_cents: int,
        currency: str,
        note: str,
    ) -> None:
        self.customer_id = customer_id
        self.currency = currency
        self.items = 1
        self.quantity = quantity
        self.total_cents = amount_cents
        self.note = note
        self.first_sku = sku

    @event("ItemAdded")
    def add_item(self, sku: str, quantity: int, amount_cents: int, note: str) -> None:
        self.items += 1
        self.quantity += quantity
        self.total_cents += amount_cents
        self.last_sku = sku
        self.note = note


class Orders(Application[uuid.UUID]):
    """Commands issued one per call, as an application service would."""

    def place(self, n: int) -> uuid.UUID:
        p = placed(n)
        order = Order(p.customer_id, p.sku, p.quantity, p.amount_cents, p.currency, p.note)
        self.save(order)
        return order.id

    def new_order(self, n: int, items: int) -> Order:
        """An order with ``items`` events, not saved (the seeding saves many at once)."""
        p = placed(n)
        order = Order(p.customer_id, p.sku, p.quantity, p.amount_cents, p.currency, p.note)
        for k in range(1, items):
            i = item(n, k)
            order.add_item(i.sku, i.quantity, i.amount_cents, i.note)
        return order

    def add_item(self, order_id: uuid.UUID, n: int, k: int) -> None:
        order: Order = self.repository.get(order_id)
        i = item(n, k)
        if order.quantity + i.quantity > ITEM_LIMIT:
            raise RefusedError(order_id)
        order.add_item(i.sku, i.quantity, i.amount_cents, i.note)
        self.save(order)
