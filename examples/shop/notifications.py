"""Notifications: tells the customer how each order ended."""

from __future__ import annotations

from examples.shop.events import NotificationSent, OrderCancelled, OrderCompleted
from nervus import Context, Service

service = Service("notifications")


@service.on(OrderCompleted)
async def completed(event: OrderCompleted, ctx: Context) -> None:
    await ctx.publish(NotificationSent(order_id=event.order_id, kind="order-completed"))


@service.on(OrderCancelled)
async def cancelled(event: OrderCancelled, ctx: Context) -> None:
    await ctx.publish(NotificationSent(order_id=event.order_id, kind="order-cancelled"))
