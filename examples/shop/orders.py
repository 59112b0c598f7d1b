"""Orders: an event-sourced aggregate per order, and the order-history read model.

The storefront sends ``PlaceOrder`` commands; orders decides them against the
order's stream in its event store, and the store's relay publishes the events it
appended (the log is the outbox). Shipping and inventory's outcomes close the order
through in-process commands. The ``order-history`` projection keeps a table of
every order's status, updated in the same transaction as its checkpoint.
"""

from __future__ import annotations

from examples.shop.events import (
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PlaceOrder,
    ShipmentDispatched,
    StockRejected,
    StockReleased,
)
from nervus import Command, Context, Event, Service
from nervus.domain import Aggregate, Projection, ReadModelTransaction, evolve, handles
from nervus.errors import DomainError

service = Service("orders")


class CompleteOrder(
    Command, type="shop.order.complete.v1", key="order_id", channel="shop.order-commands"
):
    order_id: str


class CancelOrder(
    Command, type="shop.order.cancel.v1", key="order_id", channel="shop.order-commands"
):
    order_id: str
    reason: str


class Order(Aggregate):
    category = "order"
    status: str = "new"
    amount_cents: int = 0

    @evolve
    def _placed(self, event: OrderPlaced) -> None:
        self.status = "placed"
        self.amount_cents = event.amount_cents

    @evolve
    def _completed(self, event: OrderCompleted) -> None:
        self.status = "completed"

    @evolve
    def _cancelled(self, event: OrderCancelled) -> None:
        self.status = "cancelled"


@service.command(PlaceOrder, aggregate=Order)
def place(order: Order, command: PlaceOrder) -> list[Event]:
    if order.status != "new":
        raise DomainError(f"order {command.order_id} is already {order.status}")
    return [
        OrderPlaced(
            order_id=command.order_id,
            customer_id=command.customer_id,
            sku=command.sku,
            quantity=command.quantity,
            amount_cents=command.amount_cents,
        )
    ]


# Closing an order that is already closed decides nothing: the outcome events may
# be delivered again, and the order's first outcome stands.
@service.command(CompleteOrder, aggregate=Order)
def complete(order: Order, command: CompleteOrder) -> list[Event]:
    return [OrderCompleted(order_id=command.order_id)] if order.status == "placed" else []


@service.command(CancelOrder, aggregate=Order)
def cancel(order: Order, command: CancelOrder) -> list[Event]:
    if order.status != "placed":
        return []
    return [OrderCancelled(order_id=command.order_id, reason=command.reason)]


@service.on(ShipmentDispatched)
async def shipped(event: ShipmentDispatched, ctx: Context) -> None:
    await service.execute(CompleteOrder(order_id=event.order_id))


@service.on(StockRejected)
async def rejected(event: StockRejected, ctx: Context) -> None:
    await service.execute(CancelOrder(order_id=event.order_id, reason=event.reason))


@service.on(StockReleased)
async def released(event: StockReleased, ctx: Context) -> None:
    await service.execute(CancelOrder(order_id=event.order_id, reason="payment failed"))


class OrderHistory(Projection):
    """Every order with its status: what a customer-service screen would query."""

    name = "order-history"
    tables = {
        "order_history": "CREATE TABLE {order_history} (order_id TEXT PRIMARY KEY, "
        "customer_id TEXT NOT NULL, sku TEXT NOT NULL, quantity INTEGER NOT NULL, "
        "amount_cents INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT)"
    }

    @handles
    async def placed(self, event: OrderPlaced, tx: ReadModelTransaction) -> None:
        await tx.execute(
            "INSERT INTO {order_history} VALUES (?, ?, ?, ?, ?, 'placed', NULL)",
            event.order_id,
            event.customer_id,
            event.sku,
            event.quantity,
            event.amount_cents,
        )

    @handles
    async def completed(self, event: OrderCompleted, tx: ReadModelTransaction) -> None:
        await tx.execute(
            "UPDATE {order_history} SET status = 'completed' WHERE order_id = ?", event.order_id
        )

    @handles
    async def cancelled(self, event: OrderCancelled, tx: ReadModelTransaction) -> None:
        await tx.execute(
            "UPDATE {order_history} SET status = 'cancelled', reason = ? WHERE order_id = ?",
            event.reason,
            event.order_id,
        )


service.projection(OrderHistory())
