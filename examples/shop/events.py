"""The shop's events. Each type name is stable; a changed shape gets a new version."""

from __future__ import annotations

from nervus import Command, Event


class PlaceOrder(
    Command, type="shop.order.place.v1", key="order_id", channel="shop.order-commands"
):
    """Sent by the storefront; executed by orders on the order aggregate."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int


class OrderPlaced(Event, type="shop.order.placed.v1", key="order_id"):
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int


class OrderCompleted(Event, type="shop.order.completed.v1", key="order_id"):
    order_id: str


class OrderCancelled(Event, type="shop.order.cancelled.v1", key="order_id"):
    order_id: str
    reason: str


class StockReserved(Event, type="shop.stock.reserved.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int


class StockRejected(Event, type="shop.stock.rejected.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int
    reason: str


class StockReleased(Event, type="shop.stock.released.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int


class PaymentCaptured(Event, type="shop.payment.captured.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int


class PaymentFailed(Event, type="shop.payment.failed.v1", key="order_id"):
    order_id: str
    reason: str


class ShipmentDispatched(Event, type="shop.shipment.dispatched.v1", key="order_id"):
    order_id: str
    sku: str
    quantity: int
    tracking_code: str


class NotificationSent(Event, type="shop.notification.sent.v1", key="order_id"):
    order_id: str
    kind: str


ALL = (
    PlaceOrder,
    OrderPlaced,
    OrderCompleted,
    OrderCancelled,
    StockReserved,
    StockRejected,
    StockReleased,
    PaymentCaptured,
    PaymentFailed,
    ShipmentDispatched,
    NotificationSent,
)
